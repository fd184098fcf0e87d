"""``iif-train`` for ``torchrun --max-restarts`` tests: the first time (no marker file), rank 1 dies as it starts
iteration 2, as a process killed by a node's OOM killer would; after the restart it runs normally."""
import os
from pathlib import Path

import iif.train
from iif.methods.iif import IIF

MARKER = Path(os.environ["IIF_TEST_CRASH_MARKER"])
_fit_step = IIF.fit_step


def fit_step(self, iteration):
    if iteration == 2 and os.environ.get("RANK") == "1" and not MARKER.exists():
        MARKER.touch()
        os._exit(9)
    return _fit_step(self, iteration)


IIF.fit_step = fit_step
iif.train.main()
