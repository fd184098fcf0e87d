"""Where a run computes (``device=cpu|cuda|cuda:N``) and the random state of that device.

``cuda`` means this process's GPU: ``cuda:LOCAL_RANK`` in a run of several processes (torchrun and submitit export
``LOCAL_RANK``), ``cuda:0`` otherwise. The networks, the sampler's states and the training minibatches live on the
device; the replay buffer, the evaluation's exact target and the metrics stay on the CPU.
"""
from __future__ import annotations

import os

import torch

from iif.utils import ConfigError


def local_gpu(local_rank: int) -> int:
    """The GPU index of the process of local rank ``local_rank``: ``local_rank`` when the process sees every GPU of
    its node, 0 when it sees only its own (a site that binds one GPU per task, ``CUDA_VISIBLE_DEVICES``)."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise ConfigError(f"process of local rank {local_rank} sees {count} GPUs (CUDA_VISIBLE_DEVICES="
                      f"{os.environ.get('CUDA_VISIBLE_DEVICES')}): start one process per GPU")


def resolve(spec: str, local_rank: int = 0) -> torch.device:
    """The device of ``device=<spec>`` for the process of local rank ``local_rank``; selects it as the current
    CUDA device (collectives and ``torch.cuda`` calls then use it). One clear error for an unusable spec."""
    spec = str(spec)
    if spec == "cpu":
        return torch.device("cpu")
    if spec != "cuda" and not spec.startswith("cuda:"):
        raise ConfigError(f"device={spec}: expected cpu, cuda (this process's GPU) or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={spec}, but CUDA is not available here (torch.cuda.is_available() is False: no "
                          "GPU, or a CPU-only torch build); use device=cpu")
    try:
        device = torch.device("cuda", local_gpu(local_rank)) if spec == "cuda" else torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device={spec}: expected cpu, cuda or cuda:N") from None
    if device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={spec} needs GPU {device.index}, but this process sees "
                          f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
    torch.cuda.set_device(device)
    return device


def rng_state(device: torch.device) -> dict:
    """The run's random state: the CPU generator's, and the GPU's when the run computes on one."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict | torch.Tensor, device: torch.device) -> None:
    """Restore :func:`rng_state` (a bare tensor: a checkpoint written before GPU support, CPU state only)."""
    if isinstance(state, torch.Tensor):
        state = {"cpu": state, "cuda": None}
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def describe(device: torch.device) -> str:
    """What a run computed on, for its results (``cpu``, or the GPU's name): time and memory figures mean nothing
    without it."""
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return "cpu"
