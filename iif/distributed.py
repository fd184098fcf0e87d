"""One run across several processes (data parallel): ``torchrun``, or a Slurm job with several tasks.

Design: **the ranks share one random stream.** Every rank seeds the global torch RNG alike (and rank 0's state is
broadcast at start-up), draws the random numbers of the *whole* batch and keeps its own rows (:meth:`World.shard`).
So the result of a run does not depend on the number of processes: two processes with ``N/2`` trajectories each
compute what one process computes with ``N`` (up to the order of floating-point sums). Drawing the noise of the
whole batch costs ``O(N D)`` random numbers per step and rank, small next to the network evaluations it feeds.

What is sharded and what is replicated in IIF (Algorithm 1):

1. trajectories: each rank runs its ``N / W`` rows of the batch (the expensive part);
2. rewards and log-weights are gathered, so ``c``, the acceptance draws and the accepted set are the same on every
   rank, and so is the replay buffer (each rank holds the whole buffer);
3. a training minibatch is drawn whole on every rank (indices, times, noise); each rank computes the loss of its
   ``b / W`` rows and the gradients are averaged across ranks (one all-reduce per optimiser step), so the
   parameters, the optimiser state and the EMA stay identical;
4. rank 0 writes the run directory (config, metrics, checkpoints, figure) and the W&B run; the others write nothing.

The online methods split their optimiser steps the same way: each process runs its rows of ``method.batch_size``
trajectories and the gradients are averaged (``pathwise``: backpropagation through its rows; ``vargrad``: its rows'
terms with the whole batch's mean ``ell``; ``am``: its rows' regression with the whole batch's clipping quantile).
Methods with ``data_parallel = False`` (``dpok``, the untrained ones) are refused in a run of several processes.

The process group is set up from the environment torchrun exports (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``), or, in a Slurm job of several tasks started by submitit, from submitit's job environment.
Backends: torch's default, ``gloo`` for CPU tensors and ``nccl`` for CUDA tensors (``device=cuda``: each process
computes on ``cuda:LOCAL_RANK``); ``IIF_DIST_BACKEND`` forces one.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import random
from pathlib import Path

import torch
import torch.distributed as dist

Tensor = torch.Tensor
log = logging.getLogger(__name__)


class World:
    """The processes of one run; ``World()`` is the single-process world (every method is then a no-op).

    Attributes:
        rank: this process's index in ``0..size-1``; size: number of processes ``W``; local_rank: its index on its
            node (its GPU with ``device=cuda``).
    """

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0):
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} outside a world of {size} processes")
        self.rank, self.size, self.local_rank = rank, size, local_rank

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory and the experiment log."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size})"

    # ------------------------------------------------------------------ sharding
    def shard(self, n: int) -> slice:
        """This rank's rows ``[rank n / W, (rank + 1) n / W)`` (rounded down) of a global batch of ``n``."""
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def gather(self, x: Tensor, n: int) -> Tensor:
        """All ranks' shards of a batch of ``n`` (``x`` is this rank's ``[len(shard(n)), ...]``) concatenated in rank
        order: ``[n, ...]`` on every rank."""
        if self.size == 1:
            return x
        sizes = [(r + 1) * n // self.size - r * n // self.size for r in range(self.size)]
        if x.shape[0] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank} holds {x.shape[0]} rows of a batch of {n}, not {sizes[self.rank]}")
        pad = max(sizes)  # all_gather needs equal shapes: uneven shards are padded (equal ones are sent as they are)
        buf = x.contiguous()
        if x.shape[0] < pad:
            buf = torch.zeros((pad, *x.shape[1:]), dtype=x.dtype, device=x.device)
            buf[: x.shape[0]] = x
        parts = [torch.empty_like(buf) for _ in range(self.size)]
        dist.all_gather(parts, buf)
        return torch.cat([p[:k] for p, k in zip(parts, sizes)])

    # ------------------------------------------------------------------ reductions
    def mean_(self, tensors: list[Tensor]) -> None:
        """In place: each tensor becomes its mean over ranks (one flattened all-reduce, e.g. the gradients)."""
        if self.size == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over ranks (float64; e.g. the budget counters)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: dict[str, float]) -> dict[str, float]:
        """Each value's maximum over ranks (e.g. the peak memory of the largest process)."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: dict[str, float], op) -> dict[str, float]:
        """``values`` reduced over ranks by ``op`` (a ``torch.distributed.ReduceOp``), in one float64 all-reduce."""
        if self.size == 1:
            return dict(values)
        keys = list(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t, op=op)
        return {k: v for k, v in zip(keys, t.tolist())}

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over ranks (e.g. a loss logged by every process for its rows)."""
        return {k: v / self.size for k, v in self.sum(values).items()}

    def check_divisible(self, name: str, value: int) -> None:
        """A batch whose loss is averaged over processes must split evenly (else the average is not the batch's)."""
        if value % self.size:
            raise ValueError(f"{name}={value} must be divisible by the {self.size} processes of this run (each "
                             f"computes the loss of {name} / {self.size} rows)")

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def check_replicated(self, tensors: dict[str, Tensor], what: str) -> None:
        """Raise if the ranks disagree on ``tensors`` (e.g. the base model's weights after loading them): a run whose
        ranks start from different models would average gradients of different problems without an error."""
        if self.size == 1:
            return
        sums = torch.stack([t.detach().double().sum() for t in tensors.values()] or [torch.zeros((), dtype=torch.float64)])
        ref = sums.clone()
        dist.broadcast(ref, src=0)
        bad = [name for name, a, b in zip(tensors, sums, ref) if not torch.allclose(a, b, rtol=1e-6, atol=1e-9)]
        flag = torch.tensor([float(bool(bad))])
        dist.all_reduce(flag)
        if flag.item() > 0:
            raise RuntimeError(f"{what} differs between the processes of this run (rank {self.rank}: "
                               f"{', '.join(bad[:3]) or 'another rank'}); they must start identical")


_WORLD = World()
_START: _dt.datetime | None = None


def world() -> World:
    """The world of this process (set up by :func:`init_from_env`; single-process otherwise)."""
    return _WORLD


def env_world_size() -> int:
    """Processes of this run as the launcher announces them: torchrun's ``WORLD_SIZE``, or the tasks of a submitit
    Slurm job (1 outside both)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return int(os.environ.get("SLURM_NTASKS", "1"))
    return 1


def master_port(job_id: str, ephemeral: tuple[int, int] | None = None) -> int:
    """Rank 0's rendezvous port in a multi-task Slurm job: drawn from the job id, so every task derives the same one,
    and outside the kernel's ephemeral range (``ip_local_port_range``), where outgoing connections take their local
    ports. submitit's own choice, anywhere in 20000-60000, failed once in a test with EADDRINUSE on a port held by
    such a connection (the other task then waits for rank 0 until the time-out)."""
    if ephemeral is None:
        try:
            lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        except (OSError, ValueError):
            lo, hi = 32768, 60999  # Linux's default
    else:
        lo, hi = ephemeral
    ranges = [r for r in ((20000, lo - 1), (hi + 1, 65535)) if r[1] - r[0] >= 1000]
    low, high = max(ranges, key=lambda r: r[1] - r[0]) if ranges else (20000, 60000)
    return random.Random(f"iif-{job_id}").randint(low, high)


def init_from_env() -> World:
    """Join the process group that the launcher set up in the environment (idempotent); single process if none.

    torchrun exports ``RANK``/``WORLD_SIZE``/``MASTER_*``; in a submitit Slurm job of several tasks they are
    exported from submitit's job environment first. Rank 0's start time is shared (see :func:`start_time`).
    """
    global _WORLD, _START
    if dist.is_initialized() or env_world_size() == 1:
        return _WORLD
    if "WORLD_SIZE" not in os.environ:  # a submitit task: export what env:// initialisation reads
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        os.environ.setdefault("MASTER_PORT", str(master_port(JobEnvironment().job_id)))  # read back by submitit
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():  # this process's GPU, before any collective (and for device=cuda)
        from iif.device import local_gpu

        torch.cuda.set_device(local_gpu(local_rank))
    backend = os.environ.get("IIF_DIST_BACKEND")  # None: gloo for CPU tensors, nccl for CUDA tensors
    timeout = _dt.timedelta(minutes=int(os.environ.get("IIF_DIST_TIMEOUT_MIN", "30")))
    # The rendezvous store, under a prefix of this attempt: after torchrun restarts the workers (--max-restarts)
    # the store still holds the dead workers' addresses, and gloo would try to connect to them.
    store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"iif/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=size, timeout=timeout)
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local_rank)
    _START = _WORLD.broadcast(_launcher_start_time() or _dt.datetime.now())
    log.info("process %d of %d (%s backend; rendezvous at %s:%s)", _WORLD.rank, _WORLD.size,
             backend or ("gloo for CPU, nccl for CUDA tensors" if torch.cuda.is_available() else "gloo"),
             os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
    return _WORLD


def _launcher_start_time() -> _dt.datetime | None:
    """Under torchrun: when the torchrun agent (this worker's parent) started. It is the same after
    ``--max-restarts`` restarts the workers, so the restarted run resolves the same run directory and resumes from
    its checkpoint; None elsewhere or where ``/proc`` cannot tell (the start time is then now)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        fields = Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5): start time in clock ticks after boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return _dt.datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def shutdown() -> None:
    """Leave the process group (at the end of a run)."""
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def start_time() -> _dt.datetime:
    """``now``, or in a run of several processes rank 0's start time (under torchrun: its agent's, which survives
    worker restarts), so that every rank resolves the same run directory (the ``iif.now`` resolver of
    ``conf/config.yaml``)."""
    return _START or _dt.datetime.now()
