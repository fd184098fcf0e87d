"""``wandb``: Weights & Biases, offline by default (no account, no network)."""
from __future__ import annotations

import os


class WandbLogger:
    """Logs the resolved config, scalars per iteration and figures to a W&B run inside the run directory.

    A resumed run (same run directory) continues the same W&B run: its id is stored in the checkpoint.

    Args:
        mode: ``offline`` (default; ``wandb sync`` uploads later), ``online`` or ``disabled``.
        project, entity, group, tags: W&B run fields (group defaults to the experiment's name; the run's chosen
            options are added to ``tags``).
    """

    MODES = ("offline", "online", "disabled")

    def __init__(self, mode: str = "offline", project: str = "iif", entity: str | None = None,
                 group: str | None = None, tags: list[str] | None = None):
        if mode not in self.MODES:
            raise ValueError(f"logger.mode must be one of {self.MODES}, got '{mode}'")
        self.mode, self.project, self.entity = mode, project, entity
        self.group, self.tags = group, list(tags or [])
        self.run = None
        self.run_id: str | None = None

    def start(self, run_dir: str, config: dict, name: str, group: str, run_id: str | None = None,
              tags: list[str] = ()) -> None:
        """``tags`` (the run's chosen options) are added after the configured ``logger.tags``."""
        import wandb

        tags = list(dict.fromkeys([*self.tags, *(t[:64] for t in tags)]))  # W&B limits a tag to 64 characters
        drop_inherited_service()
        self.run = wandb.init(
            mode=self.mode, project=self.project, entity=self.entity, group=self.group or group,
            tags=tags, name=name, config=config, dir=os.fspath(run_dir), id=run_id, resume="allow",
        )
        self.run_id = self.run.id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_figure(self, key: str, fig, step: int) -> None:
        import wandb

        self.run.log({key: wandb.Image(fig)}, step=step)

    def finish(self, exit_code: int = 0) -> None:
        """Finish the run; on return its run file is complete. ``run.finish`` ends by only informing the W&B service
        (wandb 0.31: ``inform_finish`` is published, not awaited), which closes the file later, so a reader right
        after it could find the file without its records (seen once in CI: no run record); stopping the service
        (``wandb.teardown``, which waits for its process) closes it first. A service still serving another run of
        this process (a notebook's own run) is left running."""
        if self.run is not None:
            import wandb

            self.run.finish(exit_code=exit_code)
            self.run = None
            if wandb.run is None:
                wandb.teardown()


def drop_inherited_service() -> None:
    """Forget a W&B service this process inherited (``WANDB_SERVICE``, which wandb exports to the environment of the
    process that starts a service, so that every subprocess and every Slurm job submitted from it connects to it).
    A run should own its service: through a shared one, a run killed and requeued (or resumed by hand) finds its
    stream still open there, and its resume fails with "run ID ... is in use" for as long as the owner lives. The
    variable is ``<version>-<owner pid>-<transport>-<address>``; this process's own service is kept."""
    token = os.environ.get("WANDB_SERVICE")
    if token is None:
        return
    parts = token.split("-")
    if len(parts) < 2 or parts[1] != str(os.getpid()):
        del os.environ["WANDB_SERVICE"]
