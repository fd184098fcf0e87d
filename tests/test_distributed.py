"""One run across processes (``iif.distributed``), on CPU with the gloo backend.

The design claim under test: the ranks share one random stream and each runs its rows of every batch, so two
processes compute what one process computes with the whole batch (the same config: ``method.n_samples`` and
``method.batch_size`` are the run's totals). The runs are real: ``torchrun`` (``python -m torch.distributed.run``)
starting ``iif.train`` twice, against ``iif.train`` in one process; the primitives run in spawned gloo groups.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import kill_fit_step_at
from iif import distributed
from iif.distributed import World
from iif.methods.iif import IIF
from iif.checks import check_world
from iif.config import compose
from iif.train import train
from iif.utils import ConfigError

pytestmark = pytest.mark.slow  # multi-process, Slurm, CLI or pretraining: minutes; `make test` runs it

# small, but long enough that training moves the model well past the tolerance (mode_tv 0.44 -> 0.40)
ARGS = ["experiment=toy2d", "method=iif", "base_model=gmm_exact", "iterations=4", "checkpoint_every=1", "logger=none",
        "torch_threads=1", "method.n_samples=1024", "method.batch_size=512", "method.grad_steps=30",
        "method.optimizer.lr=1e-2", "buffer.prefill=1024", "sampler.n_steps=50", "evaluation.n_samples=4000"]
COMPARED = ["mode_tv", "top_mode_frac", "energy_distance", "reward_mean", "sc_loss", "kl_path"]
COUNTS = ["base_nfe", "reward_evals", "reward_grad_evals"]


def bounded(cmd: list[str], env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on time-out kill the whole session (torchrun's workers included), so a hung
    collective fails the test instead of hanging it. Collectives themselves time out after 2 minutes."""
    proc = subprocess.Popen(cmd, env={**env, "IIF_DIST_TIMEOUT_MIN": "2"}, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... did not end within {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(args: list[str], env: dict, cwd: Path, nproc: int = 2, launcher_args: tuple[str, ...] = (),
             module: tuple[str, ...] = ("-m", "iif.train")) -> subprocess.CompletedProcess:
    return bounded([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    *launcher_args, *module, *args], env, cwd)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    """Two run directories hold the same run: every logged number but the wall clock (to float-summation
    tolerance), the budget counts exactly, the final samples and the trained guidance weights."""
    ra, rb = rows(a), rows(b)
    assert [r["iteration"] for r in ra] == [r["iteration"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            if k != "wall_s":
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7), (x["iteration"], k)
    fa, fb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for k in COMPARED:
        assert fb[k] == pytest.approx(fa[k], rel=1e-6, abs=1e-9), k
    assert [fa[k] for k in COUNTS] == [fb[k] for k in COUNTS]
    xa, xb = (torch.load(d / "samples.pt", weights_only=True) for d in (a, b))
    torch.testing.assert_close(xb, xa, rtol=1e-5, atol=1e-5)
    ga, gb = (torch.load(d / "checkpoint.pt", weights_only=True)["state"]["trainer"]["module"] for d in (a, b))
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-5)  # Adam amplifies float noise where g ~ 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run in one process, with the whole batch."""
    cwd = tmp_path_factory.mktemp("one")
    env = {**os.environ, "WANDB_MODE": "offline", "CI": "1",
           "IIF_CACHE": str(tmp_path_factory.getbasetemp() / "cache")}
    proc = bounded([sys.executable, "-m", "iif.train", *ARGS, f"hydra.run.dir={cwd / 'run'}"], env, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "run"


def test_two_processes_compute_the_run_of_one(reference, tmp_path, cli_env):
    """torchrun with 2 processes = 1 process with the whole batch; rank 0 alone writes one run directory (named by
    rank 0's start time, so both processes resolve the same one) and one W&B run, and says how the batch is split."""
    proc = torchrun([*ARGS, "logger=wandb"], cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in tmp_path.glob("outputs/runs/*/*/metrics.json")]
    assert len(list(tmp_path.glob("outputs/runs/*/*"))) == 1, "the processes resolved different run directories"
    assert_same_run(reference, run_dir)
    assert json.loads((run_dir / "metrics.json").read_text())["processes"] == 2
    assert json.loads((reference / "metrics.json").read_text())["mode_tv"] < 0.42  # the model did move (base: 0.44)
    log = (run_dir / "train.log").read_text()
    assert "2 processes; 50 sampling steps; n_samples 1024 (512 per process), batch_size 512 (256 per process)" in log
    assert log.count("final metrics") == 1  # only rank 0 logs at INFO
    assert len(list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    assert len(list(run_dir.glob(".hydra/config.yaml"))) == 1


def test_a_run_resumes_with_another_number_of_processes(reference, tmp_path, cli_env, monkeypatch):
    """A checkpoint does not depend on the number of processes: a one-process run killed after iteration 2
    resumes under torchrun with 2 processes and ends as the uninterrupted run (budget counts included)."""
    run_dir = tmp_path / "run"
    original = kill_fit_step_at(monkeypatch, IIF, 2)
    cfg, choices = compose([a for a in ARGS if not a.startswith("torch_threads")])  # keep pytest's thread count
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run_dir, choices)
    monkeypatch.setattr(IIF, "fit_step", original)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["iteration"] == 2
    proc = torchrun([*ARGS, f"hydra.run.dir={run_dir}"], cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in (run_dir / "train.log").read_text()
    assert_same_run(reference, run_dir)


def test_torchrun_restart_after_a_dead_process_resumes_in_the_same_run_directory(reference, tmp_path, cli_env):
    """``torchrun --max-restarts=1``: rank 1 dies at iteration 2; torchrun stops rank 0 and starts both again; they
    resolve the same run directory (the agent's start time names it), resume from its checkpoint and end as the
    uninterrupted run."""
    marker = tmp_path / "crashed"
    proc = torchrun(ARGS, {**cli_env, "IIF_TEST_CRASH_MARKER": str(marker)}, tmp_path,
                    launcher_args=("--max-restarts=1",), module=(str(Path(__file__).parent / "_crash_once.py"),))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists(), "the worker did not crash: the test tests nothing"
    run_dirs = list(tmp_path.glob("outputs/runs/*/*"))
    assert len(run_dirs) == 1, f"the restarted workers started a new run directory: {run_dirs}"
    run_dir = run_dirs[0]
    assert "resuming" in (run_dir / "train.log").read_text()
    assert_same_run(reference, run_dir)


@pytest.mark.parametrize("method", ["pathwise", "vargrad", "am"])
def test_online_methods_across_two_processes_compute_the_run_of_one(method, tmp_path, cli_env):
    """Each process backpropagates (pathwise), accumulates the variance gradient (vargrad, with the whole batch's
    mean ell) or regresses the adjoint (am, with the whole batch's clipping quantile) on its rows: the same run."""
    args = ["experiment=toy2d", f"method={method}", "base_model=gmm_exact", "debug=fast", "iterations=3",
            "logger=none", "torch_threads=1", "method.batch_size=64", "method.grad_steps=3",
            *(["method.clip_quantile=0.9"] if method == "am" else [])]
    one = bounded([sys.executable, "-m", "iif.train", *args, f"hydra.run.dir={tmp_path / 'one'}"], cli_env, tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([*args, f"hydra.run.dir={tmp_path / 'two'}"], cli_env, tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    # Iteration 1 is the same computation up to float summation order (~1e-7). After it, float differences of the
    # sharded batch are amplified (measured, relative): am (float32 adjoints through the base VJP, the clipping
    # quantile of gathered terms) 7e-7 after iteration 1, 1.5e-4 after 3; pathwise's gradient norm (float32 through
    # the whole chain, a heavy-tailed sum over paths) 6e-8, 1.2e-6, then 1.6e-5 (analytic KL) or 4.3e-4 (STL) after 3;
    # everything else ~1e-7. A wrong shard, a missing or doubled factor would show at O(1) from iteration 1.
    ra, rb = rows(tmp_path / "one"), rows(tmp_path / "two")
    for x, y in zip(ra, rb, strict=True):
        rel = 1e-5 if x["iteration"] == 1 else 1e-3
        for k in x.keys() - {"wall_s"}:  # grad_norm included: the norm of the averaged gradient
            assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-6), (method, x["iteration"], k)
    rel = 1e-3
    fa, fb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    for k in ("mode_tv", "energy_distance", "reward_mean", "sc_loss"):
        assert fb[k] == pytest.approx(fa[k], rel=rel), (method, k)
    assert [fa[k] for k in COUNTS] == [fb[k] for k in COUNTS]


def test_a_method_that_runs_in_one_process_is_refused_under_torchrun(tmp_path, cli_env):
    proc = torchrun(["experiment=toy2d", "method=dpok", "base_model=gmm_exact", "debug=fast", "logger=none",
                     f"hydra.run.dir={tmp_path / 'run'}"], cli_env, cwd=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("iif-train: error:")]
    assert errors == ["iif-train: error: method 'dpok' runs in one process, and this run has 2 (torchrun "
                      "--nproc_per_node, or resources.tasks_per_node); run it with one process, or use a "
                      "data-parallel method (iif, reward_only, pathwise, vargrad, am)"], proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_check_world_and_batch_divisibility(monkeypatch):
    cfg, choices = compose(["experiment=toy2d", "method=dpok", "base_model=gmm_exact"])
    with pytest.raises(ConfigError, match="method 'dpok' runs in one process, and this run has 3"):
        check_world(cfg, choices, World(0, 3))
    for method in ("pathwise", "vargrad", "am"):
        check_world(*compose(["experiment=toy2d", f"method={method}", "base_model=gmm_exact"]), World(2, 3))
    check_world(cfg, choices, World())  # one process: any method
    cfg, choices = compose(["experiment=toy2d", "method=reward_only", "base_model=gmm_exact"])
    check_world(cfg, choices, World(1, 3))
    monkeypatch.setattr(distributed, "_WORLD", World(0, 3))
    with pytest.raises(ValueError, match=r"method.batch_size=512 must be divisible by the 3 processes"):
        IIF(None, None, None, torch.nn.Linear(2, 2), None, batch_size=512)


# ------------------------------------------------------------------------------------- the primitives
def _primitives(rank: int, size: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    w = World(rank, size)
    n = 7  # uneven shards: 2, 2, 3 rows
    full = torch.arange(n * 3, dtype=torch.float64).view(n, 3)
    result = {"shard": (w.shard(n).start, w.shard(n).stop), "gathered": w.gather(full[w.shard(n)], n)}
    grads = [torch.full((2, 2), float(rank)), torch.full((3,), 10.0 * rank)]
    w.mean_(grads)
    result["mean"] = grads
    result["sum"] = w.sum({"a": rank + 1, "b": 0.5})
    result["max"] = w.max({"a": float(rank), "b": -float(rank)})
    result["broadcast"] = w.broadcast({"rank": rank})
    w.check_replicated({"same": torch.ones(3)}, "a replicated tensor")
    try:
        w.check_replicated({"differs": torch.full((3,), float(rank))}, "the base model's weights")
    except RuntimeError as e:
        result["error"] = str(e)
    torch.save(result, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_world_primitives_on_three_gloo_processes(tmp_path):
    size = 3
    mp.spawn(_primitives, args=(size, str(tmp_path / "init"), str(tmp_path)), nprocs=size, join=True)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(size)]
    full = torch.arange(21, dtype=torch.float64).view(7, 3)
    assert [r["shard"] for r in results] == [(0, 2), (2, 4), (4, 7)]  # a partition of the 7 rows
    for r in results:
        torch.testing.assert_close(r["gathered"], full, rtol=0, atol=0)
        torch.testing.assert_close(r["mean"][0], torch.full((2, 2), 1.0))  # (0 + 1 + 2) / 3
        torch.testing.assert_close(r["mean"][1], torch.full((3,), 10.0))
        assert r["sum"] == {"a": 6.0, "b": 1.5}
        assert r["max"] == {"a": 2.0, "b": 0.0}
        assert r["broadcast"] == {"rank": 0}
        assert "the base model's weights differs between the processes of this run" in r["error"]


def test_master_port_is_shared_by_the_tasks_of_a_job_and_outside_the_ephemeral_range():
    """Every task of a job derives the same port from the job id; it lies outside the range the kernel gives to
    outgoing connections (a port there was once taken, and the job's rank 0 failed with EADDRINUSE)."""
    from iif.distributed import master_port

    ports = {master_port(str(job)) for job in range(200)}
    assert master_port("138") == master_port("138") and len(ports) > 150  # deterministic, spread
    lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert all(not lo <= p <= hi and 20000 <= p <= 65535 for p in ports)
    for ephemeral in ((32768, 60999), (20000, 60999), (1024, 65535)):  # Linux's default, a low one, everything
        p = master_port("7_3", ephemeral)
        assert (not ephemeral[0] <= p <= ephemeral[1]) or ephemeral == (1024, 65535)
        assert 20000 <= p <= 65535


# ------------------------------------------------------------------------------- sharded computations
def test_sampler_rows_are_the_rows_of_the_whole_batch():
    """What one process runs with ``rows`` is exactly those rows of the whole batch (the same noises)."""
    cfg, _ = compose(["experiment=toy2d", "base_model=gmm_exact", "sampler.n_steps=20", "logger=none"])
    from iif.build import build

    comp = build(cfg)
    sampler, guidance, base = comp.method.sampler, comp.method.guidance, comp.base
    torch.manual_seed(3)
    whole = sampler.sample(base, guidance, 10, keep_states=True)
    for rows in (slice(0, 3), slice(3, 7), slice(7, 10)):
        torch.manual_seed(3)
        part = sampler.sample(base, guidance, 10, keep_states=True, rows=rows)
        torch.testing.assert_close(part.x0, whole.x0[rows], rtol=0, atol=1e-6)
        torch.testing.assert_close(part.log_rnd, whole.log_rnd[rows], rtol=0, atol=1e-9)
        torch.testing.assert_close(part.noises, whole.noises[:, rows], rtol=0, atol=0)
        torch.testing.assert_close(part.states, whole.states[:, rows], rtol=0, atol=1e-6)


def test_iif_loss_of_the_shards_averages_to_the_loss_of_the_batch():
    """Per-process losses on equal shards (same draws) average to the whole minibatch's loss, and so do their
    gradients (what the all-reduce computes)."""
    cfg, _ = compose(["experiment=toy2d", "base_model=gmm_exact", "method=iif", "logger=none"])
    from iif.build import build

    method = build(cfg).method
    x0 = torch.randn(8, 2)
    params = list(method.guidance.parameters())

    def loss_and_grad(rows):
        torch.manual_seed(5)
        loss = method.loss(x0, rows=rows)
        return loss.detach(), torch.autograd.grad(loss, params)

    whole, g_whole = loss_and_grad(slice(None))
    parts = [loss_and_grad(slice(0, 4)), loss_and_grad(slice(4, 8))]
    torch.testing.assert_close((parts[0][0] + parts[1][0]) / 2, whole)
    for k in range(len(params)):
        torch.testing.assert_close((parts[0][1][k] + parts[1][1][k]) / 2, g_whole[k], rtol=1e-5, atol=1e-7)
