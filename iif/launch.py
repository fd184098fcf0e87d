"""Hydra callbacks of the submitit launchers (``launcher=slurm|slurm_local``; registered in ``conf/launcher/``).

- :class:`LaunchChecks`, in the submitting process: a launcher config that cannot work stops after composition and
  before the sweeper creates the sweep directory or calls ``sbatch``, with one line on stderr
  (``iif-train: error: ...``) and exit status 2, like the training loop's own start-up errors.
- :class:`RequeueGuard`, in each job: a job that Slurm is taking down reports no result, so that a requeued job
  reruns instead of ending the sweep.

Resuming after a requeue needs nothing else: submitit re-runs the pickled job, whose config carries the sweep
directory already resolved (Hydra copies the ``${iif.now:...}`` cache into each job's config and the cache is pickled
with it), so the job lands in the same run directory and :func:`iif.train.train` continues from ``checkpoint.pt``
and the same W&B run.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

SITE_CHOICE = "site@hydra.launcher"  # how conf/launcher/slurm.yaml includes conf/site/<name>.yaml


class LaunchChecks(Callback):
    """Fail fast on a launcher config that would submit jobs that cannot run.

    Args:
        launcher: the ``launcher`` option that registered this callback (named in the messages).
    """

    def __init__(self, launcher: str):
        self.launcher = launcher

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        """Without ``-m`` Hydra runs the job in this process and ignores the launcher: refuse, rather than train on
        a login node."""
        _fail(f"launcher={self.launcher} submits jobs only in multirun mode: add -m "
              f"(e.g. iif-train -m launcher={self.launcher} ...), or use launcher=local for a run here")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Every problem found in the composed config, reported before the sweep starts."""
        launcher = config.hydra.launcher
        site = config.hydra.runtime.choices.get(SITE_CHOICE)
        if site not in (None, "local") and site not in site_options():  # `optional`: Hydra skips a missing file
            _fail(f"site '{site}' not found: no conf/site/{site}.yaml (options: {', '.join(site_options())})")
        if "partition" in launcher and not launcher.partition:
            _fail(f"launcher={self.launcher} needs a SLURM partition and none is set: copy conf/site/example.yaml "
                  f"to conf/site/local.yaml and set `partition:` there, or add hydra.launcher.partition=NAME "
                  f"(`sinfo -s` lists the partitions)")


class RequeueGuard(Callback):
    """In a job: once Slurm has sent SIGTERM (requeue, preemption, cancellation, the end of the time limit), a
    failure of the job is the take-down's doing and must not become the job's result.

    Slurm signals every process of the job. submitit ignores SIGTERM in the training process (it waits for the
    SIGKILL that follows, or checkpoints on its own USR2), but helper processes die at once, the W&B service among
    them, and the next ``wandb.log`` raises. Hydra would return that error and submitit would pickle it as the
    job's result: the sweep would fail while Slurm reruns the job. So after a SIGTERM a failed job exits at once
    without a result; the rerun of a requeued job resumes from its checkpoint (a cancelled job stays cancelled).
    """

    def __init__(self):
        self.terminating = False

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        previous = signal.getsignal(signal.SIGTERM)

        def note_sigterm(signum, frame):
            self.terminating = True
            if callable(previous):  # submitit's handler: log it and carry on
                previous(signum, frame)

        signal.signal(signal.SIGTERM, note_sigterm)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if self.terminating and job_return.status == JobStatus.FAILED:
            log.warning("job failed after SIGTERM (%r): Slurm is taking it down; exiting without a result",
                        job_return._return_value)
            logging.shutdown()
            os._exit(143)  # 128 + SIGTERM, no submitit result pickle


def site_options() -> list[str]:
    """The ``site`` configs on Hydra's search path (``conf/site/*.yaml``, and those of ``--config-dir``)."""
    from hydra.core.global_hydra import GlobalHydra

    return GlobalHydra.instance().config_loader().get_group_options("site")


def _fail(message: str) -> None:
    print(f"iif-train: error: {message}", file=sys.stderr)
    sys.exit(2)
