"""The pretrained CI-scale networks that ship with the package (``iif/weights/``, made by ``scripts/ship_weights.py``):
the CI-scale configuration of table1 and figure2 resolves to them (a config change that would silently pretrain
again fails here), they load into the networks that configuration builds, they stay under 20 MB with their provenance,
and the command that made them reproduces a compatible checkpoint (same key but the step count, same tensors)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from iif.build import build
from iif.config import compose
from iif.pretrain import SHIPPED
from iif.specs import load_spec, run_overrides, settings_of

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import ship_weights  # noqa: E402


def ci_components(artifact: str, setting: list[str], extra=()):
    cfg, _ = compose([*run_overrides(load_spec(artifact), "ci", [*setting, *extra]), "logger=none"])
    return build(cfg)


def pretrained_parts(comp):
    return [p for p in (comp.base, comp.reward) if getattr(p, "pretrain", None) is not None]


@pytest.mark.parametrize("artifact", ["table1", "figure2"])
def test_ci_scale_resolves_to_the_shipped_weights_and_loads_them(artifact):
    """With an empty cache (the tests' IIF_CACHE), every pretrained network of the CI scale is found among the shipped
    entries, whose recorded key is the one this configuration computes now, and loads without pretraining."""
    for setting in settings_of(load_spec(artifact)).values():
        comp = ci_components(artifact, setting)
        parts = pretrained_parts(comp)
        assert parts, "the CI scale pretrains nothing?"
        for part in parts:
            path = Path(part.cache_path())
            assert path.parent.parent == SHIPPED, f"{type(part).__name__}: no shipped entry {path.parent.name}"
            meta = json.loads((path.parent / "meta.json").read_text())
            extra = part._pretrain_key() if hasattr(part, "_pretrain_key") else None
            assert meta["key"] == json.loads(json.dumps(part.pretrain.key(part.net, extra)))
            assert meta["made_by"]["command"].startswith("python scripts/ship_weights.py")
            before = {k: v.clone() for k, v in part.net.state_dict().items()}
            assert part.pretrain.load_or_train(part.net, extra) == path.parent  # a load: no data needed
            after = part.net.state_dict()
            assert any(not torch.equal(before[k], after[k]) for k in before)
            shipped = torch.load(path, weights_only=True)
            assert all(torch.equal(shipped[k], after[k].cpu()) for k in shipped)


def test_shipped_weights_are_small_and_have_their_provenance():
    entries = sorted(p for p in SHIPPED.iterdir() if p.is_dir())
    assert entries, "no shipped weights"
    total = sum(f.stat().st_size for e in entries for f in e.iterdir())
    assert total <= 20 * 2**20
    for entry in entries:
        meta = json.loads((entry / "meta.json").read_text())
        assert {"command", "equivalent", "torch", "diffusers"} <= meta["made_by"].keys()
        assert "seed" in meta["key"]["train"]


def test_shipped_false_ignores_the_shipped_entries():
    """``shipped: false`` ignores the shipped entries (what the ship command uses, so it never copies an old copy)."""
    comp = ci_components("table1", ["reward.classes=[3]"], ["reward.pretrain.shipped=false"])
    path = Path(comp.reward.cache_path())
    assert path.parent.parent != SHIPPED and not path.exists()


@pytest.mark.slow
def test_the_ship_command_reproduces_a_compatible_checkpoint(fake_mnist, tmp_path):
    """``scripts/ship_weights.py table1 --scale ci`` with two training steps (on the tests' fake digits) writes entries
    whose key differs from the shipped one only in the step count and whose tensors have the shipped names, shapes
    and dtypes; the shipped provenance names the same command."""
    few = ["base_model.pretrain.steps=2", "reward.pretrain.steps=2", "reward.pretrain.min_test_acc=0"]
    assert ship_weights.main(["table1", "--scale", "ci", "--dest", str(tmp_path / "w"), "--", *few]) == 0
    made = {e.name.split("-")[0]: e for e in (tmp_path / "w").iterdir()}
    shipped = {e.name.split("-")[0]: e for e in SHIPPED.iterdir() if e.is_dir()}
    assert made.keys() == shipped.keys() == {"denoiser", "classifier"}
    for name, entry in made.items():
        new, old = (json.loads((e / "meta.json").read_text()) for e in (entry, shipped[name]))
        assert new["key"]["train"].pop("steps") == 2
        old["key"]["train"].pop("steps")
        assert new["key"] == old["key"]
        assert new["made_by"]["command"].split(" -- ")[0] == old["made_by"]["command"].split(" -- ")[0]
        a, b = (torch.load(e / "weights.pt", weights_only=True) for e in (entry, shipped[name]))
        assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
