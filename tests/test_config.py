"""The composition of ``conf/``: what ``debug=fast`` sets, and who sets what (the precedence written at the top of
conf/config.yaml). Composition only: nothing is built or run."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from iif.config import CONF_DIR, compose

METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
BASE_MODELS = sorted(p.stem for p in (CONF_DIR / "base_model").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
PER_OPTION = ("method", "base_model", "buffer", "reward", "evaluation")  # groups with debug/<group>/<debug>_<option>.yaml
METHOD_SIZES = ("n_samples", "grad_steps", "batch_size")  # a method's sizes that debug=fast must shrink


def debug_values(group: str | None, option: str | None = None, debug: str = "fast") -> dict:
    """The leaves a debug file sets, ``{dotted key: value}`` (keys prefixed by ``group``): debug/<debug>.yaml, or
    debug/<group>/<debug>_<option>.yaml with the files of its defaults list (same folder) merged first."""
    path = CONF_DIR / "debug" / (f"{debug}.yaml" if group is None else f"{group}/{debug}_{option}.yaml")
    if not path.exists():
        return {}
    node = yaml.safe_load(path.read_text()) or {}
    values = {}
    for parent in node.pop("defaults", []):
        values.update(debug_values(group, parent.split("_", 1)[1], parent.split("_", 1)[0]))
    if node:
        values.update(leaves(OmegaConf.create(node), prefix=f"{group}." if group else ""))
    return values


def leaves(cfg, prefix: str = "") -> dict:
    """Every leaf of a config as ``{dotted key: value}`` (interpolations unresolved)."""
    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                yield from walk(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], node
    return dict(walk(OmegaConf.to_container(cfg, resolve=False), prefix))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("base_model", BASE_MODELS)
def test_debug_fast_only_sets_keys_the_composition_has(experiment, base_model):
    """For every experiment and base model, and every method with the experiment's own base model: debug=fast adds
    no key (a misspelt or misplaced key in conf/debug/ would silently be a new one, unused or refused by its
    constructor) and gives every size it knows its debug value. (A method's debug file sets only method keys and a
    base model's only base-model keys, so every method with every base model would repeat the same checks.)"""
    own_base = compose([f"experiment={experiment}"])[1]["base_model"]
    for method in METHODS if base_model == own_base else ["iif"]:
        overrides = [f"experiment={experiment}", f"method={method}", f"base_model={base_model}"]
        normal, choices = compose([*overrides, "debug=none"])
        fast, _ = compose([*overrides, "debug=fast"])
        normal, fast = leaves(normal), leaves(fast)
        assert fast.keys() == normal.keys(), (overrides, fast.keys() ^ normal.keys())
        expected = debug_values(None)
        for group in PER_OPTION:
            expected.update(debug_values(group, choices[group]))
        assert {k: fast[k] for k in expected} == expected, overrides
        assert {k for k in fast if fast[k] != normal[k]} <= expected.keys(), overrides
        assert all(f"method.{k}" in expected for k in METHOD_SIZES if f"method.{k}" in fast), overrides


def test_debug_files_name_existing_options():
    """debug/<group>/<debug>_<option>.yaml is merged only when <group>=<option> is chosen: a file for a misspelt
    option would never be used."""
    presets = {p.stem for p in (CONF_DIR / "debug").glob("*.yaml")}
    files = sorted((CONF_DIR / "debug").glob("*/*.yaml"))
    assert files, "no per-option debug files"
    for path in files:
        preset, option = path.stem.split("_", 1)
        assert preset in presets and (CONF_DIR / path.parent.name / f"{option}.yaml").exists(), path


@pytest.mark.slow
def test_cfg_job_prints_what_runs():
    """`iif-train --cfg job debug=fast` prints the debug sizes (composed by Hydra, not patched in afterwards)."""
    proc = subprocess.run([sys.executable, "-m", "iif.train", "--cfg", "job", "experiment=toy2d", "debug=fast",
                           "method=iif", "base_model=toy2d"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["iterations"] == 2 and cfg["checkpoint_every"] == 1 and cfg["sampler"]["n_steps"] == 20
    assert cfg["method"]["n_samples"] == 256 and cfg["method"]["grad_steps"] == 5
    assert cfg["base_model"]["train_steps"] == 200 and cfg["evaluation"]["n_samples"] == 1000
    assert "debug" not in cfg


def test_the_command_line_wins():
    """Over debug=fast, over the experiment's choice of options, and over the option's own values."""
    cfg, choices = compose(["debug=fast", "iterations=8", "method.n_samples=64", "base_model=gmm_exact",
                            "base_model.schedule.beta_max=10"])
    assert cfg.iterations == 8 and cfg.method.n_samples == 64 and cfg.method.grad_steps == 5
    assert choices["base_model"] == "gmm_exact" and cfg.base_model.schedule.beta_max == 10
    assert cfg.method.iterations == 8  # interpolated from the root


def test_experiments_choose_the_problem_and_set_no_root_key():
    """An experiment is a full preset: it chooses the problem's options (the root leaves them `???`), and of the
    root's own keys it sets only the problem's placeholders (`prior: ???`), never a value the root already gives."""
    root = OmegaConf.load(CONF_DIR / "config.yaml")
    defaults = yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"]
    problem_groups = [next(iter(d)) for d in defaults if isinstance(d, dict) and "???" in d.values()]
    assert set(problem_groups) == {"base_model", "reward", "guidance", "sampler", "conditions", "evaluation"}
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        preset = yaml.safe_load(path.read_text())
        chosen = {next(iter(d)).split()[-1].lstrip("/") for d in preset.pop("defaults", []) if isinstance(d, dict)}
        assert chosen >= set(problem_groups), (path.name, set(problem_groups) - chosen)
        for key in preset:
            assert key not in root or OmegaConf.is_missing(root, key), (path.name, key)
        cfg, choices = compose([f"experiment={path.stem}"])
        assert all(choices[g] is not None for g in problem_groups)
