"""``iif-prefetch``: what a composed config fetches from the Hugging Face hub (walking every ``_target_`` node), the
``snapshot_download`` calls it makes (replaced here: nothing is downloaded), and its one-line errors."""
from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from omegaconf import OmegaConf

from iif import prefetch
from iif.config import CONF_DIR
from iif.hub import HubDownload

CLIP_L14 = "openai/clip-vit-large-patch14"
CLIP_FILES = ["*.json", "*.txt", "*.safetensors"]


class WholeRepo:
    """A component that loads a whole repository at a revision (a target for the walk below)."""

    @classmethod
    def hub_downloads(cls, cfg):
        return [HubDownload(cfg.repo, None, "pretrained", revision=cfg.get("revision"))]


@pytest.fixture
def calls(monkeypatch):
    """The recorded ``snapshot_download`` keyword arguments; online (no offline variables) unless a test sets them."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # belt and braces: no real request
    made = []
    monkeypatch.setattr(prefetch, "snapshot_download", lambda **kw: made.append(kw) or f"/cache/{kw['repo_id']}")
    return made


def test_dry_run_prints_the_hub_weights_of_the_config_offline(calls, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert prefetch.main(["--dry-run", "reward=aesthetic"]) == 0
    out = capsys.readouterr().out
    assert f"{CLIP_L14}: *.json *.txt *.safetensors  (reward.pretrained)" in out
    assert "camenduru/improved-aesthetic-predictor: sac+logos+ava1-l14-linearMSE.pth  (reward.head)" in out
    assert calls == []


def test_fetch_walks_nested_targets_and_downloads_each_repository_once(calls, capsys):
    """Nested nodes (a dict under the reward, a list under the evaluation) are walked; the same repository from two
    nodes is fetched once with the union of their patterns; a whole-repository download at a revision stays so."""
    overrides = ["reward=aesthetic",
                 f"+reward.extra={{_target_:iif.rewards.clip.CLIPEncoder,pretrained:'{CLIP_L14}'}}",
                 "+evaluation.extras=[{_target_:iif.rewards.image_reward.ImageRewardScore,pretrained:THUDM/ImageReward},"
                 "{_target_:test_prefetch.WholeRepo,repo:org/whole,revision:v1}]"]
    assert prefetch.main(overrides) == 0
    assert calls == [
        dict(repo_id=CLIP_L14, revision=None, allow_patterns=CLIP_FILES),
        dict(repo_id="camenduru/improved-aesthetic-predictor", revision=None,
             allow_patterns=["sac+logos+ava1-l14-linearMSE.pth"]),
        dict(repo_id="THUDM/ImageReward", revision=None, allow_patterns=["ImageReward.pt", "med_config.json"]),
        dict(repo_id="google-bert/bert-base-uncased", revision=None, allow_patterns=["vocab.txt"]),
        dict(repo_id="org/whole", revision="v1", allow_patterns=None),
    ]
    out = capsys.readouterr().out
    assert "(reward.pretrained, reward.extra.pretrained)" in out and "(evaluation.extras[0].pretrained)" in out
    assert "org/whole@v1: all files" in out


def test_merging_a_whole_repository_with_some_of_its_files_fetches_it_whole():
    cfg = OmegaConf.create({"a": {"_target_": "iif.rewards.clip.CLIPEncoder", "pretrained": CLIP_L14},
                            "b": {"_target_": "test_prefetch.WholeRepo", "repo": CLIP_L14}})
    (d,), notes = prefetch.collect(cfg)
    assert d == HubDownload(CLIP_L14, None, "a.pretrained, b.pretrained") and notes == []


def test_tiny_and_local_models_fetch_nothing(calls, tmp_path, capsys):
    (tmp_path / "clip").mkdir()
    for overrides in (["experiment=toy2d"],
                      ["reward=clip_score", "conditions=prompts", "reward.pretrained=tiny"],
                      ["reward=aesthetic", f"reward.pretrained={tmp_path / 'clip'}", "reward.head=tiny"],
                      ["reward=image_reward", "reward.pretrained=tiny"]):
        assert prefetch.main(overrides) == 0, overrides
        assert "nothing to fetch" in capsys.readouterr().out
    assert calls == []


def test_offline_fetch_and_bad_overrides_fail_with_one_line(calls, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert prefetch.main(["reward=clip_score"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("iif-prefetch: error: HF_HUB_OFFLINE") and calls == []
    assert prefetch.main(["reward=no_such_reward"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "reward/no_such_reward" in err


def test_a_failed_download_is_one_line_and_the_others_go_on(calls, monkeypatch, capsys):
    def flaky(**kw):
        if kw["repo_id"] == CLIP_L14:
            raise OSError("connection reset")
        calls.append(kw)
        return "/cache"

    monkeypatch.setattr(prefetch, "snapshot_download", flaky)
    assert prefetch.main(["reward=aesthetic"]) == 1
    assert [c["repo_id"] for c in calls] == ["camenduru/improved-aesthetic-predictor"]
    err = capsys.readouterr().err.strip()
    assert err == f"iif-prefetch: error: {CLIP_L14} (reward.pretrained): OSError: connection reset"


def test_console_script(cli_env):
    """Declared in pyproject; `python -m iif.prefetch --dry-run` runs as a program, offline."""
    scripts = tomllib.loads((CONF_DIR.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["iif-prefetch"] == "iif.prefetch:main"
    proc = subprocess.run([sys.executable, "-m", "iif.prefetch", "--dry-run", "reward=image_reward"],
                          env={**cli_env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "THUDM/ImageReward: ImageReward.pt med_config.json  (reward.pretrained)" in proc.stdout


def test_the_missing_weight_error_names_the_runs_own_prefetch_command():
    """The one-line error of a missing hub weight, as it reaches the command line (re-wrapped as a plain
    ConfigError by the instantiation), gets the run's overrides in its remedy, quoted for a shell; other errors pass
    unchanged."""
    from iif.hub import missing_weights, with_prefetch_command
    from iif.utils import ConfigError

    error = ConfigError(str(missing_weights("base_model.pretrained", "org/model", OSError("offline"))))
    filled = with_prefetch_command(error, ["experiment=sd15_imagereward", 'conditions.prompts=["A cat."]'])
    assert "`iif-prefetch experiment=sd15_imagereward 'conditions.prompts=[\"A cat.\"]'`" in str(filled)
    assert "<the run's overrides>" not in str(filled) and isinstance(filled, ConfigError)
    other = ConfigError("method.n_samples must be >= 1, got 0")
    assert with_prefetch_command(other, ["x=1"]) is other
