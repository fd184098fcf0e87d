"""Text-to-image fine-tuning end to end on tiny random-weight SD-shaped and SD3-shaped models built in code
(``experiment=tiny_t2i``; nothing is downloaded): ``iif-reproduce table2`` at CI scale (a full IIF, DPOK,
adjoint-matching (full fine-tuning) and top-K iteration each through ``iif-train``); resume gives the run that was never interrupted; the prompt evaluator's
diversity against pairwise cosines written out; IIF's conditional loss and the full fine-tuning h against the UNet called directly;
the fine-tuned UNet and the LoRA file load into stock diffusers pipelines; ``iif-reproduce table2`` at CI scale."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from iif.build import build  # noqa: E402
from iif.config import compose  # noqa: E402
from iif.metrics.prompts import diversity  # noqa: E402
from iif.train import train  # noqa: E402

TINY = ["experiment=tiny_t2i", "debug=fast", "logger=none", "iterations=1", "sampler.n_steps=4", "buffer.prefill=0",
        "buffer.capacity=32", "evaluation.n_per_prompt=2", "evaluation.batch_size=4"]
# each method's smallest sizes (the table2 spec's CI sizes, smaller)
SIZES = {
    "iif": ["method.n_samples=4", "method.batch_size=2", "method.grad_steps=1", "method.acceptance.values=[0.5]",
            "method.cfg_in_loss=false"],
    "dpok": ["method.n_samples=2", "method.transitions=16", "method.grad_steps=1", "method.batch_size=4",
             "method.micro_batch_size=2", "method.value_batch_size=4", "method.value_steps=1", "method.value_hidden=8"],
    "am": ["guidance=full", "method.batch_size=2", "method.grad_steps=1", "method.loss_steps=2",
           "method.clip_quantile=0.9", "method.cfg_in_loss=false"],
    "topk": ["method.k=2"],
}


def test_diversity_is_one_minus_the_mean_pairwise_cosine():
    import numpy as np

    f = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    v = f.double().numpy()
    pairs = [v[i] @ v[j] / (np.linalg.norm(v[i]) * np.linalg.norm(v[j])) for i in range(7) for j in range(i + 1, 7)]
    assert diversity(f) == pytest.approx(1 - float(np.mean(pairs)), abs=1e-12)
    assert diversity(torch.ones(4, 3)) == pytest.approx(0.0, abs=1e-12)  # identical samples: no diversity
    with pytest.raises(ValueError, match="at least 2"):
        diversity(f[:1])


def test_resumed_iif_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    """2 iterations in one go, and a run killed in its second iteration then resumed (a fresh build, as a new process
    would) in the same directory: the same adapter, hence the same evaluation samples, bit for bit."""
    from conftest import kill_fit_step_at
    from iif.methods.iif import IIF

    cfg, choices = compose([*TINY, "method=iif", *SIZES["iif"], "checkpoint_every=1", "iterations=2"])
    whole = train(cfg, tmp_path / "whole", choices)
    original = kill_fit_step_at(monkeypatch, IIF, 1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", choices)
    monkeypatch.setattr(IIF, "fit_step", original)
    resumed = train(cfg, tmp_path / "resumed", choices)
    a = torch.load(tmp_path / "whole" / "samples.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "samples.pt", weights_only=True)
    assert torch.equal(a, b) and whole["reward_mean"] == resumed["reward_mean"]
    ckpt = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    module = ckpt["state"]["trainer"]["module"]
    assert module and all("lora" in k for k in module)  # only the adapter is checkpointed

    # docs/text-to-image-models.md's recipe: the resumed run's adapter as a diffusers LoRA file, into a stock pipeline
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from iif.base_models.stable_diffusion import SD_SCHEDULE, tiny_components

    method = build(cfg).method
    method.load_state_dict(ckpt["state"])
    with method.trainer.sampling_weights():
        method.guidance.save_adapter(tmp_path / "lora")
    parts = tiny_components(0)
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   unet=parts["unet"], scheduler=DDIMScheduler(**SD_SCHEDULE, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(tmp_path / "lora")
    base = method.base
    x, t = torch.randn(2, *base.sample_shape), torch.full((2,), 0.4)
    emb = _direct_embeddings(base, [base.texts[0]] * 2)
    k = (torch.round(t.double() * len(base.schedule.alphas_cumprod)) - 1).long()
    with torch.no_grad(), method.trainer.sampling_weights(), base.adapter_enabled():
        ours = base.unet(x, k, encoder_hidden_states=emb).sample
    with torch.no_grad():
        theirs = pipe.unet(x, k, encoder_hidden_states=emb).sample
        frozen = base.unet(x, k, encoder_hidden_states=emb).sample  # adapter off
    assert (ours - frozen).abs().max() > 1e-6  # the trained adapter is not zero
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def _direct_embeddings(base, texts):
    tok = base.tokenizer(texts, padding="max_length", max_length=base.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")
    with torch.no_grad():
        return base.text_encoder(tok.input_ids).last_hidden_state


def _tiny(*extra):
    cfg, _ = compose([*TINY, *extra])
    comp = build(cfg)
    comp.prepare()
    return comp


def _direct_unet(base, x, t, texts, network=None):
    """The UNet prediction at the prompts ``texts`` computed here: the tokenizer, the text encoder and the UNet called
    directly at diffusers timestep ``round(t T) - 1`` (no CFG)."""
    k = (torch.round(t.double() * len(base.schedule.alphas_cumprod)) - 1).long()
    return (network or base.unet)(x, k, encoder_hidden_states=_direct_embeddings(base, texts)).sample


def _prompts(base, cond):
    return [base.texts[int(i)] for i in cond]


def test_iif_conditional_loss_is_the_epsilon_loss_of_the_adapted_unet():
    """``cfg_in_loss=false``: the IIF loss is ``||eps - eps_A(x_t, t | c)||^2`` of the adapted UNet without CFG,
    recomputed here with the same draws (``t``, ``eps``) and the UNet called directly."""
    comp = _tiny("method=iif", *SIZES["iif"])
    method, base = comp.method, comp.base
    with torch.no_grad():  # a non-zero adapter
        for name, p in method.guidance.adapter_parameters().items():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    x0, cond = torch.randn(3, *base.sample_shape), torch.zeros(3, dtype=torch.long)
    torch.manual_seed(1)
    loss = method.loss(x0, cond)
    torch.manual_seed(1)
    t = method.time_sampler(3, base.schedule)
    eps = torch.randn_like(x0)
    a = base.schedule.alpha(t.double()).float().view(-1, 1, 1, 1)
    s = base.schedule.sigma(t.double()).float().view(-1, 1, 1, 1)
    xt = a * x0 + s * eps
    base.unet.enable_adapters()
    try:
        eps_a = _direct_unet(base, xt, t, _prompts(base, cond))
    finally:
        base.unet.disable_adapters()
    expected = ((eps - eps_a) ** 2).flatten(1).sum(1).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    assert method.cfg_in_loss is False and base.guidance_scale != 1  # CFG is on for sampling


def test_full_fine_tuning_h_is_zero_then_the_copy_and_loads_into_a_stock_pipeline(tmp_path):
    """``guidance=full``: a trainable copy of the UNet (every weight), ``h == 0`` at initialisation; after a change
    of the copy, ``h = (eps_base - eps_phi) / sigma`` with both sides (CFG included) computed here from the UNets;
    ``save_pretrained`` loads back with diffusers into a stock pipeline's UNet slot, equal outputs."""
    from diffusers import UNet2DConditionModel

    comp = _tiny("method=am", *SIZES["am"])
    guidance, base = comp.method.guidance, comp.base
    trainable = [p for p in guidance.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in base.unet.parameters())
    assert not any(p.requires_grad for p in base.parameters())
    x, t, cond = torch.randn(2, *base.sample_shape), torch.full((2,), 0.5), torch.tensor([0, 0])
    with torch.no_grad():
        assert torch.equal(guidance(x, t, None, cond), torch.zeros_like(x))
        for p in guidance.net.parameters():
            p.add_(0.01 * torch.randn_like(p))
        h = guidance(x, t, None, cond)
    w, sigma = base.guidance_scale, base.schedule.sigma(t.double()).float().view(-1, 1, 1, 1)

    def cfg_eps(unet):
        uncond = _direct_unet(base, x, t, [""] * x.shape[0], unet)
        c = _direct_unet(base, x, t, _prompts(base, cond), unet)
        return uncond + w * (c - uncond)

    with torch.no_grad():
        expected = (cfg_eps(base.unet) - cfg_eps(guidance.net)) / sigma
    assert h.abs().max() > 1e-4
    torch.testing.assert_close(h, expected, rtol=1e-4, atol=1e-4)
    guidance.save_pretrained(tmp_path / "unet")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    with torch.no_grad():
        texts = _prompts(base, cond)
        torch.testing.assert_close(_direct_unet(base, x, t, texts, loaded), _direct_unet(base, x, t, texts, guidance.net))


def test_prompt_evaluation_uses_fixed_seeds_and_leaves_the_training_stream_alone():
    comp = _tiny("method=base", "evaluation.n_per_prompt=3", 'conditions.prompts=["a cat","a red rabbit"]')
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = comp.evaluator(comp.method, run_seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    second = comp.evaluator(comp.method, run_seed=0)
    assert torch.equal(first.samples, second.samples) and first.metrics == second.metrics
    m = first.metrics
    assert first.samples.shape[0] == 6 and {"reward_p0", "reward_p1", "diversity_p0", "diversity_p1"} <= set(m)
    assert m["reward_mean"] == pytest.approx((m["reward_p0"] + m["reward_p1"]) / 2)
    other = comp.evaluator(comp.method, run_seed=1)
    assert not torch.equal(first.samples, other.samples)


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["ci", "ci_sd3"])
def test_table2_ci_scale_runs_an_iteration_of_every_method_and_writes_the_table(scale, tmp_path, monkeypatch):
    """`iif-reproduce table2 --scale ci|ci_sd3` for one prompt: a full iteration of IIF, DPOK, adjoint matching (full
    fine-tuning) and the base/top-K rows through `iif-train` on the tiny SD-shaped (DDIM) and SD3-shaped (flow SDE)
    models; the table's shape, the scale's note, finite numbers, the sample grids."""
    from iif.reproduce import main as reproduce

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "table2"
    # the SD3 shape: the trained methods only (the inference rows' plumbing is the SD shape's)
    methods = ["base", "topk", "cg_tweedie", "dpok", "am", "iif"] if scale == "ci" else ["dpok", "am", "iif"]
    assert reproduce(["table2", "--scale", scale, "--settings", "rabbit", "--methods", ",".join(methods), "--out",
                      str(out), "--jobs", "2", "--", "iterations=1", "evaluation.n_per_prompt=2",
                      "sampler.n_steps=5"]) == 0
    text = (out / "table.md").read_text()
    assert "it proves the plumbing" in text and "not the science" in text
    assert "PASS: every number of the table is finite" in text
    lines = (out / "table.csv").read_text().splitlines()
    assert lines[0].split(",") == ["method", "n", "rabbit/reward_mean", "rabbit/reward_mean_se", "rabbit/diversity",
                                   "rabbit/diversity_se", "device_hours", "device_hours_se", "train_peak_mem_mb",
                                   "train_peak_mem_mb_se"]
    assert [r.split(",")[0] for r in lines[1:]] == methods
    for method in ("dpok", "am", "iif"):
        run = out / "runs" / "rabbit" / f"{method}_seed0"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows] == [1] and rows[0]["base_nfe"] > 0
        final = json.loads((run / "metrics.json").read_text())
        assert final["base_model"] == ("sd3" if scale == "ci_sd3" else "sd15") and final["device"] == "cpu"
        assert final["train_peak_mem_mb"] > 0 and final["device_hours"] > 0
        samples = torch.load(run / "samples.pt", weights_only=True)
        assert samples.shape[0] == 2 and samples.shape[1] == 3 and torch.isfinite(samples).all()
    config = (out / "runs" / "rabbit" / "am_seed0" / "config.yaml").read_text()
    assert "iif.guidance.full.FullFineTuning" in config and "cfg_in_loss: false" in config
    assert (out / "figure_rabbit.png").stat().st_size > 0


def test_a_float32_full_copy_of_a_bfloat16_base_computes_in_float32():
    """``guidance=full`` on a half-precision base: the trainable copy is float32 and runs in float32 inside
    ``adapter_enabled`` (no dtype clash); ``h`` at initialisation is the base's bfloat16 rounding, small; the copy's
    gradients are float32."""
    comp = _tiny("method=am", *SIZES["am"], "base_model.dtype=bfloat16")
    guidance, base = comp.method.guidance, comp.base
    assert base.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in guidance.net.parameters())
    x, t, cond = torch.randn(2, *base.sample_shape), torch.full((2,), 0.5), torch.tensor([0, 0])
    h = guidance(x, t, None, cond)
    eps0 = base.eps(x, t, cond).detach()
    sigma = float(base.schedule.sigma(torch.tensor(0.5, dtype=torch.float64)))
    assert h.dtype == torch.float32 and torch.isfinite(h).all()
    # the base's bfloat16 rounding, amplified by CFG (w = 7.5), not a difference of weights: a few per cent
    assert (h * sigma).abs().max() <= 0.1 * eps0.abs().max()
    (h ** 2).sum().backward()
    grads = [p.grad for p in guidance.net.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)


def test_adjoint_matching_sd_setting_prompt_dropout_and_its_fine_tuning_chain():
    """AM's SD setting: on ``sampler=ddim_am`` (betas 0.002..0.009, the last step stochastic) a dropped step's loss is
    the loss of the same draws with every prompt replaced by the empty one (index -1), and differs from the kept
    one; a toy base, which has no empty condition, refuses ``prompt_dropout`` in one line."""
    comp = _tiny("method=am", *SIZES["am"], "sampler=ddim_am", "sampler.n_steps=4", "method.prompt_dropout=0.5")
    method, base = comp.method, comp.base
    assert all(k.std > 0 and k.guided for k in method.sampler.kernels(base))
    with torch.no_grad():
        for p in method.guidance.net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.manual_seed(0)
    traj = method.sampler.sample(base, method.guidance, 2, keep_states=True, cond=torch.tensor([0, 0]))
    a = method.lean_adjoint(traj)
    losses = {}
    for seed in range(20):  # find a dropped and a kept draw (the draw follows the steps' keys)
        torch.manual_seed(seed)
        keys = torch.rand(2, 4)  # noqa: F841 (the loss draws these first)
        dropped = float(torch.rand(())) < 0.5
        torch.manual_seed(seed)
        losses.setdefault(dropped, (seed, method.loss(traj, a)[0].item()))
    (seed, value), (_, kept) = losses[True], losses[False]
    method.prompt_dropout = 0.0
    empty = type(traj)(**{**vars(traj), "cond": torch.full_like(traj.cond, -1)})
    torch.manual_seed(seed)
    assert value == pytest.approx(method.loss(empty, a)[0].item(), rel=1e-5) and value != pytest.approx(kept)
    from iif.utils import ConfigError
    with pytest.raises((ValueError, ConfigError), match="empty condition"):
        build(compose(["experiment=toy2d", "method=am", "method.prompt_dropout=0.2", "debug=fast", "logger=none"])[0])
