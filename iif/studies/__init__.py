"""Analytic studies run by iif-reproduce: reproductions that are computations, not sweeps of training runs.

A study is a module with ``run(spec, scale: str, out_dir: Path) -> tuple[str, bool]`` (the markdown report and
whether every check passed), named by ``study:`` in ``experiments/<name>/spec.yaml``.
"""
