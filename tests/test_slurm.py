"""The SLURM path (``launcher=slurm|slurm_local``, ``resources``, ``conf/site``) against a real one-node Slurm.

The cluster tests start Slurm with ``scripts/start_local_slurm.sh`` (root; it apt-installs slurm-wlm and munge when
missing, about 12 s the first time) and stop it again at the end if it was not running before. They submit real job
arrays of the toy experiment and read what the jobs wrote: every run directory with its metrics; a job requeued by
``scontrol requeue`` (node failure, preemption) or signalled as timed out (submitit's own requeue with
``max_num_timeout``) continues from its checkpoint in the same run directory and the same W&B run.

Nothing here can hang: every wait has a deadline, the submitting process runs in its own session and is killed at
the end, and the jobs of each test (one job name per test) are cancelled. Without the accounting database submitit
would wait forever for a job that died without a result, hence the deadlines.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from iif.launch import LaunchChecks
from iif.config import CONF_DIR

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
START, STOP = ROOT / "scripts" / "start_local_slurm.sh", ROOT / "scripts" / "stop_local_slurm.sh"
# the node has the machine's 2 cores: one core and little memory per job lets two jobs run side by side
SLURM = ["launcher=slurm", "site@hydra.launcher=localhost", "resources.cpus_per_task=1", "resources.mem_gb=2",
         "torch_threads=1"]
TOY = ["experiment=toy2d", "base_model=gmm_exact", "debug=fast"]


# ------------------------------------------------------------------------------------------- helpers
def run_cli(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iif.train", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def wait_until(predicate, timeout: float, what: str, context=lambda: ""):
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{context()}")


def sh(*cmd: str, timeout: float = 30) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout


def scheduler_up() -> bool:
    if not shutil.which("scontrol"):
        return False
    try:
        return "UP" in sh("scontrol", "ping", timeout=10)
    except subprocess.TimeoutExpired:
        return False


def rows(run_dir: Path) -> list[str]:
    path = run_dir / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def checkpoint_iteration(run_dir: Path) -> int:
    path = run_dir / "checkpoint.pt"
    return torch.load(path, weights_only=True)["iteration"] if path.exists() else -1


class Sweep:
    """``iif-train -m launcher=slurm ...`` running in the background, its jobs named uniquely.

    Use as a context manager: on exit the submitting process is killed (with its session) if still running and the
    sweep's jobs are cancelled, so a failed test leaves nothing queued.
    """

    def __init__(self, tmp_path: Path, env: dict, args: list[str]):
        self.name = f"iif-test-{uuid.uuid4().hex[:8]}"
        self.sweeps = tmp_path / "sweeps"  # holds the sweep dir, named by ${now:...} as in the default config
        self.log = tmp_path / "launcher.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iif.train", "-m", *TOY, *SLURM, *args, f"hydra.launcher.name={self.name}",
                 f"hydra.sweep.dir={self.sweeps}/${{now:%H-%M-%S.%f}}"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> Sweep:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if self.job_ids():
            sh("scancel", f"--name={self.name}")
            try:
                wait_until(lambda: not self.job_ids(), 30, f"jobs {self.name} to leave the queue", self.context)
            except AssertionError:
                if exc_type is None:  # else keep the test's own failure
                    raise

    def job_ids(self) -> list[str]:
        return sh("squeue", "-h", f"--name={self.name}", "-o", "%i").split()

    def context(self) -> str:
        """What to print when a wait fails: the queue and the ends of the logs."""
        logs = sorted((self.sweeps).glob("*/.submitit/*/*_log.*"))
        text = [f"squeue:\n{sh('squeue')}", f"launcher log:\n{self.log.read_text()[-3000:]}"]
        text += [f"{p.name}:\n{p.read_text()[-2000:]}" for p in logs]
        return "\n".join(text)

    def run_dirs(self) -> list[Path]:
        return sorted(p.parent for p in self.sweeps.glob("*/*/config.yaml"))

    def finish(self, timeout: float) -> int:
        """Wait for the submitting process (it returns once every job has a result); its exit status."""
        wait_until(lambda: self.proc.poll() is not None, timeout, "the sweep to finish", self.context)
        return self.proc.returncode

    def release(self, job: str, timeout: float = 30) -> None:
        """A requeued job becomes eligible only ~120 s later (Slurm's fixed delay, Reason=BeginTime): start it
        2 s after it is back in the queue. Not at once: a job credential created in the same second as the node
        revoked the old one is refused ("Job credential revoked") and the job ends for good. (A later StartTime
        would wait for the scheduler's next periodic pass, up to a minute.)"""
        wait_until(lambda: sh("squeue", "-h", "-j", job, "-o", "%T %r").split() == ["PENDING", "BeginTime"],
                   timeout, f"job {job} to be requeued", self.context)
        time.sleep(2)
        sh("scontrol", "update", f"jobid={job}", "StartTime=now")


def interrupt_after_third_checkpoint(sweep: Sweep, interrupt) -> tuple[list[str], int]:
    """Wait until the sweep's one job has written its third checkpoint, call ``interrupt(job id)``, start the
    requeued job and wait for the sweep to end. Returns the job's metrics rows at the interruption and the
    checkpoint's iteration then."""
    run_dir = wait_until(sweep.run_dirs, 90, "the job to start", sweep.context)[0]
    at = wait_until(lambda: checkpoint_iteration(run_dir) >= 3 and checkpoint_iteration(run_dir), 60,
                    "the third checkpoint", sweep.context)  # the second read: the iteration, never lower
    before = rows(run_dir)
    (job,) = sweep.job_ids()
    interrupt(job)
    sweep.release(job)
    assert sweep.finish(timeout=150) == 0, sweep.context()
    return before, at


def assert_resumed(sweep: Sweep, before: list[str], at_least: int, iterations: int) -> None:
    """The job ran twice, in ONE run directory, the second time continuing from its checkpoint (rows written before
    the interruption kept byte for byte, wall clock included) in the same W&B run."""
    assert len(list(sweep.sweeps.iterdir())) == 1, "the rerun resolved ${now:...} again: a second sweep directory"
    (run_dir,) = sweep.run_dirs()
    starts = [p.read_text().count("Starting with JobEnvironment") for p in sweep.sweeps.glob("*/.submitit/*/*_log.out")]
    assert starts == [2], f"job starts per log file: {starts}"
    assert json.loads((run_dir / "metrics.json").read_text())["iterations"] == iterations
    after = rows(run_dir)
    assert [json.loads(r)["iteration"] for r in after] == list(range(1, iterations + 1))
    resumes = [int(k) for k in re.findall(r"resuming .* from iteration (\d+)", (run_dir / "train.log").read_text())]
    assert len(resumes) == 1 and at_least <= resumes[0] < iterations, f"train.log resumes: {resumes}"
    kept = min(resumes[0], len(before))
    assert after[:kept] == before[:kept], "rows before the checkpoint were recomputed, not kept"
    run_id = torch.load(run_dir / "checkpoint.pt", weights_only=True)["wandb_run_id"]
    wandb_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(name.endswith(f"-{run_id}") for name in wandb_runs), wandb_runs


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running one-node Slurm with partition ``debug``; started here (and stopped at the end) if it was not up."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root: scripts/start_local_slurm.sh installs and starts daemons")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and there is no apt-get to install it (scripts/start_local_slurm.sh)")
    was_up = scheduler_up()
    proc = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SLURM_PARTITION": "debug"})
    if proc.returncode != 0:
        pytest.fail(f"scripts/start_local_slurm.sh failed:\n{proc.stdout}\n{proc.stderr}")
    yield
    if not was_up:
        subprocess.run(["bash", str(STOP)], capture_output=True, timeout=120)


# ------------------------------------------------------------------------------ config, no cluster needed
@contextmanager
def hydra_config(overrides: list[str]):
    """The composed config with its ``hydra`` node, inside a Hydra context (as the callbacks see it)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield hydra_compose("config", overrides, return_hydra_config=True)


def test_launcher_and_resources_compose_into_the_submitit_configs():
    """`resources=` sizes reach the submitit launchers; with `launcher=local` they are only recorded."""
    with hydra_config(["launcher=slurm", "resources=gpu24", "site@hydra.launcher=example"]) as cfg:
        slurm = cfg.hydra.launcher
        assert slurm._target_.endswith("SlurmLauncher") and slurm.max_num_timeout > 0
        assert (slurm.gpus_per_node, slurm.cpus_per_task, slurm.mem_gb, slurm.tasks_per_node) == (1, 8, 32, 1)
        assert slurm.partition == "gpu" and "module load cuda/12.1" in slurm.setup  # from the example site file
    with hydra_config(["launcher=slurm", "resources=multi_gpu", "site@hydra.launcher=example"]) as cfg:
        slurm = cfg.hydra.launcher  # one run across the node's GPUs: one task (process) per GPU
        assert slurm.tasks_per_node == slurm.gpus_per_node == 4
    with hydra_config(["launcher=slurm_local", "resources=gpu80"]) as cfg:
        assert cfg.hydra.launcher._target_.endswith("LocalLauncher") and cfg.hydra.launcher.timeout_min == 720
    with hydra_config(["resources=gpu80"]) as cfg:
        assert cfg.hydra.runtime.choices.launcher == "local" and "timeout_min" not in cfg.hydra.launcher
        assert cfg.resources.gpus_per_node == 1  # recorded in the run's config.yaml, nothing else


@pytest.mark.parametrize("overrides,message", [
    (["hydra.launcher.partition=null"], "needs a SLURM partition and none is set: copy conf/site/example.yaml"),
    (["site@hydra.launcher=nope"], "site 'nope' not found: no conf/site/nope.yaml (options: example, localhost"),
], ids=["no-partition", "unknown-site"])
def test_launch_checks_name_the_cause(capsys, overrides, message):
    with hydra_config(["launcher=slurm", *overrides]) as cfg:
        with pytest.raises(SystemExit) as exit_:
            LaunchChecks("slurm").on_multirun_start(cfg)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("iif-train: error:") and message in err[0], err


def test_launch_checks_pass_a_working_config(capsys):
    with hydra_config(["launcher=slurm", "site@hydra.launcher=localhost"]) as cfg:
        LaunchChecks("slurm").on_multirun_start(cfg)  # returns: no SystemExit
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("args,message", [
    (["-m", "hydra.launcher.partition=null"], "needs a SLURM partition and none is set"),
    (["site@hydra.launcher=localhost"], "submits jobs only in multirun mode: add -m"),
], ids=["no-partition", "no-multirun"])
def test_bad_launcher_config_stops_the_cli_before_anything_is_written(tmp_path, cli_env, args, message):
    """From the command line: one `iif-train: error:` line, exit status 2, no sweep or run directory, no job."""
    sweep, run = tmp_path / "sweep", tmp_path / "run"
    proc = run_cli([*args, "launcher=slurm", *TOY, "logger=none", f"hydra.sweep.dir={sweep}",
                    f"hydra.run.dir={run}"], cli_env)
    assert proc.returncode == 2, proc.stderr
    err = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("iif-train: error:") and message in err[0], proc.stderr
    assert not sweep.exists() and not run.exists()


def test_slurm_local_runs_the_submitit_path_without_a_cluster(tmp_path, cli_env):
    """`launcher=slurm_local`: the job is pickled, run by submitit as a local process, and writes its run dir."""
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *TOY, "launcher=slurm_local", "method=iif", "logger=none", "torch_threads=1",
                    f"hydra.sweep.dir={sweep}"], cli_env)
    assert proc.returncode == 0, proc.stderr
    final = json.loads((sweep / "0_iif_seed0" / "metrics.json").read_text())
    assert final["method"] == "iif" and 0 <= final["mode_tv"] <= 1
    assert list(sweep.glob(".submitit/*/*_result.pkl"))


def reproduce_prepare_only(tmp_path, monkeypatch, launcher: list[str]) -> Path:
    """``iif-reproduce table1 --scale smoke --prepare-only -- <launcher>`` in this process, whose own
    ``iif.prepare.prepare`` is replaced by one that fails: whatever gets prepared was prepared by a job. Returns the
    job's folder."""
    import iif.prepare
    from iif.reproduce import main as reproduce

    def not_here(*args, **kwargs):
        raise AssertionError("the submitting process prepared the runs itself")

    monkeypatch.setattr(iif.prepare, "prepare", not_here)
    monkeypatch.setenv("IIF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert reproduce(["table1", "--scale", "smoke", "--settings", "single", "--prepare-only", "--out", str(out), "--",
                      *launcher]) == 0
    return out / "runs" / "single" / "prepare"


def assert_prepared_by_the_job(job_dir: Path, cache: Path) -> None:
    """The job's ``prepared.json`` names the base model, the classifier and the reference, each complete in
    ``cache``; submitit holds the job's result."""
    report = json.loads((job_dir / "prepared.json").read_text())
    names = sorted(Path(p).name.split("-")[0] for p in report["cache"])
    assert names == ["classifier", "denoiser", "reference"] and report["device"] == "cpu"
    assert all(Path(p).parent == cache for p in report["cache"])
    assert all((Path(p) / f).exists() for p, f in zip(sorted(report["cache"]),
                                                     ["weights.pt", "weights.pt", "reference.json"]))
    assert list(job_dir.glob(".submitit/*/*_result.pkl"))


def test_reproduce_prepares_in_a_job_of_the_launcher(tmp_path, monkeypatch, fake_mnist):
    """With a submitit launcher (``-- launcher=slurm_local``), ``iif-reproduce``'s pretraining and reference are one
    job of that launcher, not work of the submitting process (on a cluster: a GPU node, not the login node)."""
    job_dir = reproduce_prepare_only(tmp_path, monkeypatch, ["launcher=slurm_local", "torch_threads=1"])
    assert_prepared_by_the_job(job_dir, tmp_path / "cache")


# ------------------------------------------------------------------------------------------ on Slurm
def test_sweep_on_slurm_writes_every_run_directory(slurm_cluster, tmp_path, cli_env):
    """A two-job array (iif, reward_only) with the W&B logger: each job's run directory is complete."""
    with Sweep(tmp_path, cli_env, ["method=iif,reward_only", "logger=wandb"]) as sweep:
        assert sweep.finish(timeout=150) == 0, sweep.context()
    run_dirs = sweep.run_dirs()
    assert [p.name for p in run_dirs] == ["0_iif_seed0", "1_reward_only_seed0"]
    for run_dir, method in zip(run_dirs, ["iif", "reward_only"]):
        final = json.loads((run_dir / "metrics.json").read_text())
        assert final["method"] == method and 0 <= final["mode_tv"] <= 1
        assert [json.loads(r)["iteration"] for r in rows(run_dir)] == [1, 2]
        assert len(list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))) == 1
        assert "n_samples: 256" in (run_dir / "config.yaml").read_text()  # debug=fast reached the job
    scripts = "".join(p.read_text() for p in sweep.sweeps.glob("*/.submitit/*/*_submission.sh"))
    assert "#SBATCH --partition=debug" in scripts and "#SBATCH --array=0-1%2" in scripts


def test_one_run_across_two_slurm_tasks(slurm_cluster, tmp_path, cli_env):
    """`resources.tasks_per_node=2`: Slurm starts the job's two tasks (srun), which join one gloo process group from
    submitit's job environment and train ONE run; its numbers are those of one process with the whole batch."""
    with Sweep(tmp_path, cli_env, ["method=iif", "logger=none", "resources.tasks_per_node=2"]) as sweep:
        assert sweep.finish(timeout=150) == 0, sweep.context()
    (run_dir,) = sweep.run_dirs()
    assert "#SBATCH --ntasks-per-node=2" in "".join(p.read_text() for p in sweep.sweeps.glob("*/.submitit/*/*.sh"))
    task_logs = "".join(p.read_text() for p in sweep.sweeps.glob("*/.submitit/*/*_log.*"))
    assert "process 0 of 2 (gloo backend" in task_logs and "process 1 of 2 (gloo backend" in task_logs
    (port,) = set(re.findall(r"rendezvous at \S+:(\d+)\)", task_logs))  # both tasks: the job id's port
    lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert not lo <= int(port) <= hi  # iif.distributed.master_port, not in the range of outgoing connections
    two = json.loads((run_dir / "metrics.json").read_text())
    one_dir = tmp_path / "one"
    proc = run_cli([*TOY, "method=iif", "logger=none", "torch_threads=1", f"hydra.run.dir={one_dir}"], cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((one_dir / "metrics.json").read_text())
    assert two["processes"] == 2 and "processes" not in one
    for key in ("mode_tv", "energy_distance", "reward_mean", "sc_loss", "base_nfe", "reward_evals"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key


def test_failing_job_reports_its_error_instead_of_hanging(slurm_cluster, tmp_path, cli_env):
    """A start-up error inside a job (an impossible pairing) ends the sweep with that error, not an endless wait."""
    with Sweep(tmp_path, cli_env, ["reward=gmm_blackbox", "logger=none"]) as sweep:
        assert sweep.finish(timeout=90) != 0
    text = sweep.log.read_text()
    assert "ConfigError: guidance 'reward_informed' needs differentiable reward" in text, text[-2000:]
    assert sweep.run_dirs() == []  # the job removed its half-started run directory


def test_scontrol_requeue_resumes_from_the_checkpoint(slurm_cluster, tmp_path, cli_env):
    """`scontrol requeue` (as after a node failure) kills a running job (SIGTERM to all its processes, SIGKILL 5 s
    later) and queues it again; the rerun finds checkpoint.pt in the same run directory and continues from there,
    in the same W&B run."""
    with Sweep(tmp_path, cli_env, ["method=iif", "logger=wandb", "iterations=100", "checkpoint_every=1"]) as sweep:
        before, at = interrupt_after_third_checkpoint(sweep, lambda job: sh("scontrol", "requeue", job))
    assert_resumed(sweep, before, at_least=at, iterations=100)


def test_timed_out_job_is_requeued_by_submitit_and_resumes(slurm_cluster, tmp_path, cli_env):
    """The time-limit path: Slurm's warning signal (USR2; sent here by hand, as submitit's own tests do) makes
    submitit pickle the job again and requeue it, counting down max_num_timeout (3); the rerun resumes."""
    args = ["method=iif", "logger=wandb", "iterations=100", "checkpoint_every=1",
            "resources.timeout_min=5"]  # <= 10 min: submitit counts any USR2 as a time-out, not a preemption
    with Sweep(tmp_path, cli_env, args) as sweep:
        before, at = interrupt_after_third_checkpoint(sweep, lambda job: sh("scancel", "--signal=USR2", job))
    assert_resumed(sweep, before, at_least=at, iterations=100)
    log = "".join(p.read_text() for p in sweep.sweeps.glob("*/.submitit/*/*_log.out"))
    assert "this job is timed-out" in log and "(2 remaining timeouts)" in log, log[-2000:]


def test_reproduce_on_slurm_prepares_in_a_job_then_runs_the_methods(slurm_cluster, tmp_path, monkeypatch,
                                                                     fake_mnist):
    """``iif-reproduce table1 -- launcher=slurm``: the preparation is a Slurm job (its sbatch script), then the runs
    are a job array; the table is written from their run directories."""
    name = f"iif-test-{uuid.uuid4().hex[:8]}"
    launcher = [*SLURM, f"hydra.launcher.name={name}"]
    try:
        job_dir = reproduce_prepare_only(tmp_path, monkeypatch, launcher)
        assert_prepared_by_the_job(job_dir, tmp_path / "cache")
        assert "#SBATCH --partition=debug" in "".join(p.read_text() for p in job_dir.glob(".submitit/*/*.sh"))
        from iif.reproduce import main as reproduce

        out = tmp_path / "out"
        assert reproduce(["table1", "--scale", "smoke", "--settings", "single", "--seeds", "0", "--methods", "base",
                          "--out", str(out), "--", *launcher]) == 0
    finally:
        sh("scancel", f"--name={name}")
    (run,) = (out / "runs" / "single").glob("base_seed0/metrics.json")
    assert json.loads(run.read_text())["method"] == "base"
    assert "| base |" in (out / "table.md").read_text()
    assert list((out / "runs" / "single").glob(".submitit/*/*_submission.sh"))  # the run was a job too
