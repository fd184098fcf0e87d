"""Analytic studies run by iif-reproduce: reproductions that are computations, not sweeps of training runs.

A study is a module with ``run(spec, scale: str, out_dir: Path) -> tuple[str, bool]`` (the markdown report and
whether every check passed), named by ``study:`` in ``experiments/<name>/spec.yaml``.
"""
from __future__ import annotations

import math


def json_safe(x):
    """``x`` for ``json.dumps``, recursively: NaN -> None, ±inf -> "inf"/"-inf" (a study's numbers file)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x
