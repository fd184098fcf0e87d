"""The pretraining stage (iif/pretrain.py): cached by a hash of its configuration, complete entries only, the
classifier's accuracy floor; and the data sets it trains on."""
from __future__ import annotations

import json

import pytest
import torch

from iif.base_models.unet import UNetBase
from iif.data.sets import MNIST
from iif.pretrain import ClassifierPretraining, DenoiserPretraining, accuracy
from iif.rewards.classifier import ClassifierReward
from iif.schedules.vp import VPSchedule
from iif.utils import RunError


def _base(fake_mnist, tmp_path, steps=30, seed=0):
    data = MNIST(str(fake_mnist), size=8)
    pre = DenoiserPretraining(data, steps=steps, batch_size=16, seed=seed, cache_dir=str(tmp_path / "cache"))
    return UNetBase(VPSchedule(), (1, 8, 8), block_out_channels=(8, 16), norm_num_groups=4, pretrain=pre)


def test_denoiser_pretraining_is_cached_and_reused(fake_mnist, tmp_path):
    base = _base(fake_mnist, tmp_path)
    before = {k: v.clone() for k, v in base.net.state_dict().items()}
    base.prepare()
    entries = list((tmp_path / "cache").glob("denoiser-*"))
    assert len(entries) == 1
    files = {p.name for p in entries[0].iterdir()}
    assert {"weights.pt", "meta.json", "loss.png", "samples.png"} <= files
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["key"]["train"]["steps"] == 30 and meta["params"] > 0 and meta["final_loss"] > 0
    trained = base.net.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before)  # training changed the weights

    again = _base(fake_mnist, tmp_path)  # same configuration: loaded, not retrained
    (entries[0] / "loss.png").unlink()  # a retraining would write it again
    again.prepare()
    assert all(torch.equal(trained[k], again.net.state_dict()[k]) for k in trained)
    assert not (entries[0] / "loss.png").exists()

    other = _base(fake_mnist, tmp_path, seed=1)  # another configuration: another entry
    assert other.pretrain.entry(other.net, {"x": 1}) != again.pretrain.entry(again.net, {"x": 1})


def test_a_bfloat16_base_uses_the_float32_pretraining_and_predicts_close_to_it(fake_mnist, tmp_path):
    """``base_model.dtype=bfloat16``: the same cache entry as float32 (pretrained once, in float32), the frozen network
    then in bfloat16, its noise prediction returned in the samples' float32 and within bfloat16's precision of the
    float32 network's (relative error about 2^-8 a layer); a dtype it does not know is one error naming the option."""
    fp32 = _base(fake_mnist, tmp_path)
    fp32.prepare()
    data = MNIST(str(fake_mnist), size=8)
    pre = DenoiserPretraining(data, steps=30, batch_size=16, seed=0, cache_dir=str(tmp_path / "cache"))
    bf16 = UNetBase(VPSchedule(), (1, 8, 8), block_out_channels=(8, 16), norm_num_groups=4, pretrain=pre,
                    dtype="bfloat16")
    assert bf16.cache_path() == fp32.cache_path()
    (entry,) = (tmp_path / "cache").glob("denoiser-*")
    (entry / "loss.png").unlink()  # a retraining would write it again
    bf16.prepare()
    assert not (entry / "loss.png").exists()
    assert {p.dtype for p in bf16.net.parameters()} == {torch.bfloat16}
    x, t = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.linspace(0.05, 0.95, 64)
    with torch.no_grad():
        want, got = fp32.eps(x, t), bf16.eps(x, t)
    assert got.dtype == torch.float32
    rel = ((got - want).norm() / want.norm()).item()
    assert 1e-4 < rel < 0.05, rel  # not float32's arithmetic, and close to it
    from iif.metrics.classes import _digest  # an evaluator's cache key: a bfloat16 model is another model

    assert _digest(bf16.state_dict()) != _digest(fp32.state_dict())
    with pytest.raises(ValueError, match="base_model.dtype must be one of float32, float16, bfloat16, got 'bf16'"):
        UNetBase(VPSchedule(), (1, 8, 8), block_out_channels=(8, 16), norm_num_groups=4, dtype="bf16")


def test_an_interrupted_pretraining_resumes_to_the_uninterrupted_weights(fake_mnist, tmp_path, caplog):
    """Killed between two training-state checkpoints (after step 17, the last checkpoint at step 10), a second
    pretraining of the same configuration resumes at step 10 and ends with the weights and losses of a run that was
    never interrupted, bit for bit; the checkpoint is gone once the weights are written. The resumed run logs its
    pace at step 20 only (not at 10, where it began; not at 30, the end)."""
    straight = _base(fake_mnist, tmp_path / "a")
    straight.prepare()
    (entry,) = (tmp_path / "a" / "cache").glob("denoiser-*")
    assert not (entry / "partial.pt").exists()

    interrupted = _base(fake_mnist, tmp_path / "b")
    interrupted.pretrain.checkpoint_every = 10
    calls = {"n": 0}
    loss = interrupted.pretrain.loss

    def dies_at_step_18(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 18:
            raise KeyboardInterrupt  # a preemption: the process ends between checkpoints
        return loss(*args, **kwargs)

    interrupted.pretrain.loss = dies_at_step_18
    with pytest.raises(KeyboardInterrupt):
        interrupted.prepare()
    (folder,) = (tmp_path / "b" / "cache").glob("denoiser-*")
    assert folder.name == entry.name and not (folder / "weights.pt").exists()
    assert torch.load(folder / "partial.pt", weights_only=True)["step"] == 10

    resumed = _base(fake_mnist, tmp_path / "b")
    resumed.pretrain.checkpoint_every = 10
    caplog.clear()
    with caplog.at_level("INFO", logger="iif.pretrain"):
        resumed.prepare()
    paces = [r.getMessage() for r in caplog.records if "ms a step" in r.getMessage()]
    assert len(paces) == 1 and paces[0].startswith("pretrain denoiser: step 20/30, loss ")
    assert not (folder / "partial.pt").exists()
    a, b = straight.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta_a, meta_b = (json.loads((e / "meta.json").read_text()) for e in (entry, folder))
    assert meta_a["final_loss"] == meta_b["final_loss"]
    assert meta_b["resumed_at_step"] == 10 and "resumed_at_step" not in meta_a


def test_denoiser_loss_is_the_epsilon_loss_written_out(fake_mnist, tmp_path):
    base = _base(fake_mnist, tmp_path)
    x = torch.randn(4, 1, 8, 8)
    gen = torch.Generator().manual_seed(3)
    loss = base.pretrain.loss(base.net, x, None, gen, base=base)
    gen = torch.Generator().manual_seed(3)  # the same draws, by hand
    t = 1e-3 + (1 - 1e-3) * torch.rand(4, generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    sched = VPSchedule()
    a = sched.alpha(t.double()).float().view(-1, 1, 1, 1)
    s = sched.sigma(t.double()).float().view(-1, 1, 1, 1)
    pred = base.net(a * x + s * eps, 1000 * t).sample
    assert torch.allclose(loss, ((pred - eps) ** 2).mean(), rtol=1e-5)


def test_classifier_pretraining_learns_and_enforces_its_floor(fake_mnist, tmp_path):
    data = MNIST(str(fake_mnist), size=16)
    pre = ClassifierPretraining(data, steps=150, batch_size=32, lr=3e-3, cache_dir=str(tmp_path / "c"))
    reward = ClassifierReward(classes=[3], width=8, pretrain=pre)
    reward.prepare()
    acc = json.loads(next((tmp_path / "c").glob("classifier-*/meta.json")).read_text())["test_acc"]
    assert acc == accuracy(reward.net, *data.test()) and acc > 0.9  # the bar position is easy to read

    floor = ClassifierPretraining(data, steps=2, batch_size=8, min_test_acc=0.99, cache_dir=str(tmp_path / "d"))
    with pytest.raises(RunError, match="below min_test_acc"):
        ClassifierReward(classes=[3], width=8, pretrain=floor).prepare()
    assert not list((tmp_path / "d").glob("*/weights.pt"))  # nothing half-made looks complete


def test_data_sets_select_classes(fake_mnist):
    data = MNIST(str(fake_mnist), size=8)
    images, labels = data.test()
    assert images.shape == (100, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    even = data.of_classes("test", [0, 2, 4, 6, 8])
    assert even.shape[0] == int((labels % 2 == 0).sum()) == 50
    assert data.key() == {"dataset": "MNIST", "size": 8}  # the folder is not part of the cache key
