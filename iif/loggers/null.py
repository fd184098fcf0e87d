"""``none``: no external logger."""
from __future__ import annotations


class NullLogger:
    """Accepts everything, writes nothing (the run directory still gets metrics and figures)."""

    run_id: str | None = None

    def __init__(self, **_):
        pass

    def start(self, run_dir: str, config: dict, name: str, group: str, run_id: str | None = None,
              tags: list[str] = ()) -> None:
        self.run_id = run_id

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_figure(self, key: str, fig, step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass
