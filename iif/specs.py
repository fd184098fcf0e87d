"""Artifact specs, ``experiments/ARTIFACT/spec.yaml`` (docs/runs.md "Artifact specs"): what an artifact runs
(its experiment, settings, methods, seeds, scales and each method's sizes at a scale), and the Hydra overrides of
each of its runs, in the order they apply. ``iif-reproduce`` runs them (iif/reproduce.py) and reports them
(iif/report.py); scripts that rerun one run of an artifact compose the same overrides."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"


def load_spec(name: str):
    """``experiments/<name>/spec.yaml``, its ``only_on`` lists checked against its methods and settings."""
    path = EXPERIMENTS / name / "spec.yaml"
    if not path.exists():
        known = sorted(p.parent.name for p in EXPERIMENTS.glob("*/spec.yaml"))
        raise SystemExit(f"iif-reproduce: error: unknown artifact '{name}'; known: {', '.join(known)}")
    spec = OmegaConf.load(path)
    for method, where in (spec.get("only_on") or {}).items():
        if method not in spec.methods:
            raise SystemExit(f"iif-reproduce: error: {path}: only_on names '{method}', not one of the spec's methods")
        unknown = [s for s in where if s not in settings_of(spec)]
        if unknown:
            raise SystemExit(f"iif-reproduce: error: {path}: only_on.{method} names setting '{unknown[0]}'; the spec "
                             f"has {list(settings_of(spec))}")
    return spec


def methods_of(spec, setting: str) -> list[str]:
    """The spec's methods that run on ``setting``: all but those whose ``only_on`` list leaves it out (e.g. adjoint
    sampling, which needs a Gaussian base, only on the sampling problems)."""
    only = spec.get("only_on") or {}
    return [m for m in spec.methods if m not in only or setting in only[m]]


def experiment_of(spec, scale: str) -> str:
    """The spec's experiment preset: one name, or one per scale (``{ci: mnist_superres, paper: flowers_superres}``)."""
    return spec.experiment if isinstance(spec.experiment, str) else spec.experiment[scale]


def settings_of(spec) -> dict[str, list[str]]:
    """The spec's column groups ``{name: extra overrides}`` (e.g. table1's single class and even digits); a spec
    without ``settings`` has one unnamed group."""
    return {str(k): list(v) for k, v in (spec.get("settings") or {"": []}).items()}


def with_experiment(spec, scale: str, overrides: list[str]) -> list[str]:
    """``experiment=<the spec's>`` and then ``overrides``, unless they choose the experiment themselves (the settings
    of an artifact over several problems, e.g. logz's energies): then their choice, first (Hydra takes one value
    per key)."""
    own = [o for o in overrides if o.startswith("experiment=")]
    rest = [o for o in overrides if not o.startswith("experiment=")]
    return [own[-1] if own else f"experiment={experiment_of(spec, scale)}", *rest]


def run_overrides(spec, scale: str, extra: list[str] = (), method_overrides: list[str] = ()) -> list[str]:
    """The overrides of a run of the artifact at ``scale`` (besides ``method`` and ``seed``), in the order they
    apply: the experiment (the spec's, or a setting's), the spec's, the scale's, the method's (its sizes, a tuned
    value), then ``extra`` (a setting's and the user's: they win)."""
    return with_experiment(spec, scale, [*spec.overrides, *spec.scales[scale], *method_overrides, *extra])


def method_overrides(spec, scale: str, method: str) -> list[str]:
    """The spec's overrides of one method at one scale (its sizes: keys that other methods do not have)."""
    return list(((spec.get("method_overrides") or {}).get(scale) or {}).get(method) or [])
