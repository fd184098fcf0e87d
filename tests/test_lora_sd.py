"""Stable Diffusion with CFG (``base_model=sd15``) and the LoRA h-transform (``guidance=lora``) on tiny random-weight
SD-shaped components built in code: h == 0 at initialisation, the sampler's log-RND against an independent
reference (torch.distributions on our own DDIM means from the UNet run directly), one IIF iteration end to end,
only the adapter optimised and checkpointed, save/load round trips (checkpoint, diffusers LoRA files, a local
diffusers folder)."""
from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from iif.base_models.stable_diffusion import SD_SCHEDULE, StableDiffusionBase, tiny_components  # noqa: E402
from iif.buffers.fifo import FIFOBuffer  # noqa: E402
from iif.conditions.prompts import Prompts  # noqa: E402
from iif.guidance.lora import LoRAGuidance  # noqa: E402
from iif.methods.iif import IIF  # noqa: E402
from iif.rewards.base import Reward  # noqa: E402
from iif.samplers.ddim import DDIMSampler  # noqa: E402

PROMPTS = ["a photo of a cat", "a red rabbit"]
W = 3.0  # CFG scale
N_STEPS = 5


class Brightness(Reward):
    """Mean brightness of the decoded image (differentiable, offline)."""

    def __init__(self, base, temperature: float = 0.1):
        super().__init__(temperature)
        self.base = base

    def evaluate(self, x, cond=None):
        return self.base.decode(x).mean(dim=(1, 2, 3))


def _build(rank: int = 2, alpha: float = 4.0):
    base = StableDiffusionBase("tiny", PROMPTS, guidance_scale=W, seed=0)
    return base, LoRAGuidance(base, rank=rank, alpha=alpha, seed=1)


def _sampler():
    return DDIMSampler(N_STEPS, eta=1.0, steps_offset=1)


def _lora(guidance, part: str):
    return {n: p for n, p in guidance.net.named_parameters() if "lora" in n and part in n}


@torch.no_grad()
def _perturb(guidance, scale: float = 0.02, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    for p in _lora(guidance, "lora_B").values():
        p.copy_(scale * torch.randn(p.shape, generator=g))


def _state(n: int = 3, t: float = 0.6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    return x, torch.full((n,), t), torch.arange(n) % len(PROMPTS)


# ---------------------------------------------------------------------------------------------- reference
class _Reference:
    """CFG noise predictions and DDIM means computed here, from the UNet, the tokenizer and the text encoder directly
    (not through the base model or the sampler)."""

    def __init__(self, base):
        self.base, self.unet = base, base.unet
        tok = base.tokenizer(PROMPTS + [""], padding="max_length", max_length=base.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        with torch.no_grad():
            self.emb = base.text_encoder(tok.input_ids).last_hidden_state  # [3, L, D]; row 2: ""
        self.abar = base.schedule.alphas_cumprod  # SD's, float64
        self.T = len(self.abar)

    @torch.no_grad()
    def eps(self, x, t: float, cond, adapter: bool):
        flags = [(p, p.requires_grad) for p in self.unet.parameters()]
        self.unet.enable_adapters() if adapter else self.unet.disable_adapters()
        try:
            k = torch.full((2 * x.shape[0],), round(t * self.T) - 1)
            text = torch.cat([self.emb[2].expand(x.shape[0], -1, -1), self.emb[cond]])
            u, c = self.unet(torch.cat([x, x]), k, encoder_hidden_states=text).sample.chunk(2)
        finally:
            self.unet.disable_adapters()
            for p, f in flags:
                p.requires_grad_(f)
        return (u + W * (c - u)).double()

    def abar_at(self, t: float) -> float:
        k = round(t * self.T) - 1
        return 1.0 if k < 0 else float(self.abar[k])

    def ddim_mean(self, x, eps, t: float, s: float, eta: float = 1.0):
        """DDIM (Song et al. eq. 12): ``sqrt(abar_s) x0_hat + sqrt(1 - abar_s - c^2) eps``, and ``c``."""
        at, as_ = self.abar_at(t), self.abar_at(s)
        c2 = eta ** 2 * (1 - as_) / (1 - at) * (1 - at / as_)
        x0 = (x.double() - (1 - at) ** 0.5 * eps) / at ** 0.5
        return as_ ** 0.5 * x0 + (1 - as_ - c2) ** 0.5 * eps, c2 ** 0.5


# ---------------------------------------------------------------------------------------------- (a) initialisation
def test_h_is_zero_at_initialisation_and_the_guided_chain_is_the_base():
    base, guidance = _build()
    x, t, cond = _state()
    n = x.shape[0]
    with torch.no_grad():
        h_fresh = guidance(x, t, None, cond)  # evaluates the base and the adapted network
        nfe = base.nfe
        e0 = base.eps(x, t, cond)
        h = guidance(x, t, None, cond)  # evaluates the adapted network; reuses the base's evaluation just made
    # CFG: 2 evaluations per sample and network call
    assert nfe == 2 * n + 2 * n and base.nfe - nfe == 2 * n + 2 * n
    with torch.no_grad():
        with base.adapter_enabled():
            e_adapted = base.eps(x, t, cond)
    assert torch.equal(e_adapted, e0)  # B = 0: the adapted network is the base, bit for bit
    assert torch.equal(h, torch.zeros_like(h)) and torch.equal(h_fresh, torch.zeros_like(h))
    assert all(torch.equal(p, torch.zeros_like(p)) for p in _lora(guidance, "lora_B").values())

    sampler, cond = _sampler(), torch.tensor([1, 0])
    torch.manual_seed(11)
    guided = sampler.sample(base, guidance, 2, cond=cond)
    torch.manual_seed(11)
    plain = sampler.sample(base, None, 2, cond=cond)
    assert torch.equal(guided.log_rnd, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(guided.x0, plain.x0)


# ---------------------------------------------------------------------------------------------- (b) log-RND
def test_perturbed_adapter_log_rnd_equals_an_independent_reference():
    base, guidance = _build()
    ref = _Reference(base)
    x, t, cond = _state()
    with torch.no_grad():
        e_before = base.eps(x, t, cond)
        _perturb(guidance)
        e_after = base.eps(x, t, cond)
        h = guidance(x, t, None, cond)
        h_fresh = guidance(x, t, None, cond.clone())  # base not just evaluated at these tensors: evaluated anew
    assert torch.equal(e_after, e_before)  # the base's own calls run with the adapter off
    assert h.abs().max() > 1e-3
    torch.testing.assert_close(h, h_fresh)
    sigma = (1 - ref.abar_at(0.6)) ** 0.5
    torch.testing.assert_close(h.double(), (ref.eps(x, 0.6, cond, False) - ref.eps(x, 0.6, cond, True)) / sigma,
                               rtol=1e-4, atol=1e-5)

    sampler, n = _sampler(), 2
    cond = torch.tensor([0, 1])
    torch.manual_seed(5)
    traj = sampler.sample(base, guidance, n, cond=cond, keep_states=True)
    expected = torch.zeros(n, dtype=torch.float64)
    n_stochastic = 0
    for i, k in enumerate(sampler.kernels(base)):
        x_t, x_s = traj.states[i], traj.states[i + 1].double()
        mu_base, c = ref.ddim_mean(x_t, ref.eps(x_t, k.t, cond, adapter=False), k.t, k.s)
        mu_adapted, _ = ref.ddim_mean(x_t, ref.eps(x_t, k.t, cond, adapter=True), k.t, k.s)
        torch.testing.assert_close(traj.base_means[i].double(), mu_base, rtol=1e-4, atol=1e-4)
        if c == 0:  # the last DDIM step: deterministic, unguided
            torch.testing.assert_close(x_s, mu_base, rtol=1e-4, atol=1e-4)
            continue
        n_stochastic += 1
        p_base, p_adapted = torch.distributions.Normal(mu_base, c), torch.distributions.Normal(mu_adapted, c)
        expected += (p_base.log_prob(x_s) - p_adapted.log_prob(x_s)).flatten(1).sum(1)
    assert n_stochastic == N_STEPS - 1
    assert expected.abs().min() > 1e-2  # a non-trivial check
    torch.testing.assert_close(traj.log_rnd, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- (c)-(e) IIF
def _method(ema_decay: float = 0.5):
    base, guidance = _build()
    reward = Brightness(base)
    return IIF(base, reward, _sampler(), guidance, FIFOBuffer(capacity=16, prefill=0), Prompts(PROMPTS),
               n_samples=4, acceptance=0.5, grad_steps=1, batch_size=2, ema_decay=ema_decay,
               optimizer=functools.partial(torch.optim.Adam, lr=1e-2))


@pytest.fixture(scope="module")
def one_iteration():
    torch.manual_seed(0)
    method = _method()
    before = {k: v.detach().clone() for k, v in method.guidance.adapter_parameters().items()}
    nfe0 = method.base.nfe
    metrics = method.fit_step(0)
    return method, metrics, before, method.base.nfe - nfe0


def test_one_iif_iteration_end_to_end(one_iteration):
    method, metrics, before, nfe = one_iteration
    # CFG: 2 evaluations per sample and step for the base (5 steps) and 2 for the adapter at each of the 4 guided
    # (stochastic) steps; then one loss step on a minibatch of 2: base + adapter, 2 each
    assert nfe == 4 * (2 * N_STEPS + 2 * (N_STEPS - 1)) + 2 * (2 + 2)
    assert metrics["log_rnd_mean"] == 0.0  # h == 0 at the first iteration: the weights are the rewards'
    assert torch.isfinite(torch.tensor(metrics["log_c"])) and 0 < metrics["ess_frac"] <= 1
    buf = method.buffer
    assert 1 <= len(buf) <= 4 and len(buf) == round(metrics["accept_rate"] * 4) == metrics["buffer_size"]
    assert buf.data.shape == (len(buf), 4, 8, 8) and buf.cond.shape == (len(buf),)
    assert buf.cond.dtype == torch.long and set(buf.cond.tolist()) <= {0, 1}
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    after = method.guidance.adapter_parameters()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert any(p.abs().max() > 0 for n, p in after.items() if "lora_B" in n)
    # the next iteration samples the fine-tuned model: a non-zero log-RND
    with method.trainer.sampling_weights():
        traj = method.sample(2, torch.tensor([0, 1]))
    assert traj.log_rnd.abs().min() > 0 and torch.isfinite(traj.log_rnd).all()


def test_optimiser_ema_and_checkpoint_hold_only_the_adapter(one_iteration):
    method, *_ = one_iteration
    lora = {n: p for n, p in method.guidance.net.named_parameters() if "lora" in n}
    n_lora = len(lora)
    # A and B of 4 projections of 2 attentions (self, cross) in 4 transformer blocks (down 1, middle 1, up 2)
    assert n_lora == 2 * 4 * 2 * 4
    opt_params = [p for g in method.trainer.optimizer.param_groups for p in g["params"]]
    assert len(opt_params) == n_lora and {id(p) for p in opt_params} == {id(p) for p in lora.values()}
    assert len(method.trainer.ema) == n_lora
    assert sum(v.numel() for v in method.trainer.ema.values()) == sum(p.numel() for p in lora.values())
    trainable = {n for n, p in method.guidance.named_parameters() if p.requires_grad}
    assert len(trainable) == n_lora and all("lora" in n for n in trainable)
    module = method.state_dict()["trainer"]["module"]
    assert set(module) == trainable
    assert not any(p.requires_grad for p in method.base.parameters() if all(p is not q for q in lora.values()))


def test_checkpoint_and_adapter_files_round_trip(one_iteration, tmp_path):
    method, *_ = one_iteration
    torch.save(method.state_dict(), tmp_path / "ckpt.pt")
    fresh = _method()
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    cond = torch.tensor([1, 0])
    samples = []
    for m in (method, fresh):
        torch.manual_seed(21)
        samples.append(m.sample(2, cond))
    assert torch.equal(samples[0].x0, samples[1].x0) and torch.equal(samples[0].log_rnd, samples[1].log_rnd)

    # diffusers' LoRA file: into a fresh guidance, and into a diffusers pipeline of the same components
    guidance = method.guidance
    path = guidance.save_adapter(tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"
    other = _build()[1]
    other.load_adapter(tmp_path / "lora")
    saved, loaded = guidance.adapter_parameters(), other.adapter_parameters()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert all(p.requires_grad for p in loaded.values())
    with pytest.raises(ValueError, match="rank|r="):
        _build(rank=3)[1].load_adapter(tmp_path / "lora")

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    parts = tiny_components(0)
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   unet=parts["unet"], scheduler=DDIMScheduler(**SD_SCHEDULE, steps_offset=1,
                                                                               clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(tmp_path / "lora")
    x, t, c = _state()
    emb = method.base.prompt_embeddings(c)
    k = method.base.schedule.network_time(t)
    with torch.no_grad(), method.base.adapter_enabled():
        ours = guidance.net(x, k, encoder_hidden_states=emb).sample
        theirs = pipe.unet(x, k, encoder_hidden_states=emb).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_half_precision_host_trains_a_float32_adapter():
    base = StableDiffusionBase("tiny", PROMPTS, guidance_scale=W, dtype="bfloat16")
    guidance = LoRAGuidance(base, rank=2)
    assert base.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in guidance.adapter_parameters().values())
    x, t, cond = _state(2)
    h0 = guidance(x, t, None, cond)
    assert h0.dtype == torch.float32 and torch.equal(h0, torch.zeros_like(h0))
    _perturb(guidance)
    lora = guidance.adapter_parameters()
    grads = torch.autograd.grad((guidance(x, t, None, cond) ** 2).sum(), list(lora.values()))
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)


# ---------------------------------------------------------------------------------------------- loading, config
def test_loads_a_local_diffusers_folder(tmp_path):
    """The real loading code (``from_pretrained`` with subfolders) on the tiny components saved in the diffusers
    layout, with SD's own scheduler class and config (PNDM, ``steps_offset=1``)."""
    from diffusers import DDIMScheduler, PNDMScheduler

    parts = tiny_components(0)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        parts[name].save_pretrained(tmp_path / name)
    PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1).save_pretrained(
        tmp_path / "scheduler")
    loaded = StableDiffusionBase(str(tmp_path), PROMPTS, guidance_scale=W)
    tiny = StableDiffusionBase("tiny", PROMPTS, guidance_scale=W)
    ref = DDIMScheduler(**SD_SCHEDULE).alphas_cumprod.double()
    torch.testing.assert_close(loaded.schedule.alphas_cumprod, ref, rtol=0, atol=0)
    assert loaded.sample_shape == (4, 8, 8) and loaded.prediction_type == "eps" and loaded.evals_per_call == 2
    x, t, cond = _state()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eps(x, t, cond), tiny.eps(x, t, cond))  # (MKL: alignment-dependent bits)
        img = loaded.decode(x)
    assert img.shape == (3, 3, 16, 16) and img.min() >= -1 and img.max() <= 1


def test_yaml_options_build_the_components():
    from hydra.utils import instantiate

    from iif.config import compose

    cfg, _ = compose(["base_model=sd15", "guidance=lora", "conditions=prompts", "logger=none",
                      "base_model.pretrained=tiny", "base_model.latent_size=8", "base_model.guidance_scale=1.0"])
    base = instantiate(cfg.base_model, prior=None)
    assert base.texts == list(cfg.conditions.prompts) and base.evals_per_call == 1
    guidance = instantiate(cfg.guidance, base=base, reward=None)
    assert guidance.net.peft_config["iif"].r == cfg.guidance.rank
    assert all(p.requires_grad == ("lora" in n) for n, p in guidance.named_parameters())


def test_errors_name_the_option():
    base = StableDiffusionBase("tiny", PROMPTS, guidance_scale=W)
    x, t, _ = _state()
    with pytest.raises(ValueError, match="conditions=prompts"):
        base.eps(x, t)
    with pytest.raises(IndexError, match="prompt index 2"):
        base.eps(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="target_modules"):
        LoRAGuidance(base, target_modules=["no_such_layer"])
    LoRAGuidance(base)
    with pytest.raises(ValueError, match="one LoRA guidance per base"):
        LoRAGuidance(base, adapter_name="second")
    with pytest.raises(ValueError, match="dtype"):
        StableDiffusionBase("tiny", PROMPTS, dtype="float8")
    with pytest.raises(ValueError, match="conditions=prompts"):
        StableDiffusionBase("tiny", None)  # conditions=none: the YAML's prompts resolve to null
    with pytest.raises(TypeError, match="base_model=sd15"):
        LoRAGuidance(object())


def test_lora_needs_an_adapter_host_at_start_up():
    from iif.checks import check_pairing
    from iif.config import compose
    from iif.utils import ConfigError

    cfg, choices = compose(["guidance=lora", "logger=none"])  # the toy base: no network to adapt
    with pytest.raises(ConfigError, match="guidance 'lora' needs adapter host"):
        check_pairing(cfg, choices)
    cfg, choices = compose(["base_model=sd15", "guidance=lora", "conditions=prompts", "logger=none"])
    check_pairing(cfg, choices)  # builds nothing: no weights needed


# ---------------------------------------------------------------------------------------------- options (shared base)
def test_memory_options_equal_the_plain_computation():
    """``cfg_chunk`` (two passes) and ``attention_slicing`` (diffusers' sliced attention) give the doubled-batch CFG
    prediction up to float rounding, with the same evaluation count; ``vae_slicing`` decodes a batch to the same
    pixels; ``cpu_offload`` and ``vae_tiling`` run."""
    x, t, cond = _state(4)
    plain = StableDiffusionBase("tiny", PROMPTS, guidance_scale=W)
    with torch.no_grad():
        ref = plain.eps(x, t, cond)
        for option in ({"cfg_chunk": True}, {"attention_slicing": "auto"}, {"attention_slicing": "max"},
                       {"attention_slicing": 2}):
            other = StableDiffusionBase("tiny", PROMPTS, guidance_scale=W, **option)
            torch.testing.assert_close(other.eps(x, t, cond), ref, rtol=1e-5, atol=1e-5)
            assert other.nfe == 2 * 4
        off = StableDiffusionBase("tiny", PROMPTS, guidance_scale=W, cpu_offload=True, vae_tiling=True).place("cpu")
        torch.testing.assert_close(off.eps(x, t, cond), ref)
        big = off.decode(torch.randn(1, 4, 16, 16))  # larger than a tile: decoded in blended tiles
    assert off.vae.use_tiling and big.shape == (1, 3, 32, 32) and big.abs().max() <= 1
    sliced = StableDiffusionBase("tiny", PROMPTS, guidance_scale=W, vae_slicing=True)  # one image at a time
    z = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(sliced.decode(z), plain.decode(z), rtol=1e-5, atol=1e-5)
    assert sliced.vae.use_slicing and not plain.vae.use_slicing
    with pytest.raises(ValueError, match="base_model.attention_slicing"):
        StableDiffusionBase("tiny", PROMPTS, attention_slicing=0)


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    """The backward pass recomputes the UNet's blocks with the adapter on, as in the forward pass (it runs after
    ``adapter_enabled()`` has turned it off): the same gradients as without checkpointing."""
    x, t, cond = _state(2)
    grads = []
    for ckpt in (False, True):
        base = StableDiffusionBase("tiny", PROMPTS, guidance_scale=W, gradient_checkpointing=ckpt)
        guidance = LoRAGuidance(base, rank=2, alpha=4.0, seed=1)
        _perturb(guidance)
        lora = guidance.adapter_parameters()
        grads.append(torch.autograd.grad((guidance(x, t, None, cond) ** 2).sum(), list(lora.values())))
        assert base.unet.is_gradient_checkpointing == ckpt
    assert any(g.abs().max() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_adapter_enabled_with_a_network_runs_that_network():
    """``adapter_enabled(network)`` (full fine-tuning: a trainable copy of the UNet) runs the copy, called as the UNet
    is, with CFG; outside, the frozen UNet."""
    import copy

    base = StableDiffusionBase("tiny", PROMPTS, guidance_scale=W)
    emb = _Reference(base).emb  # [3, L, D]; row 2: ""
    net = copy.deepcopy(base.unet)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t, cond = _state()
    with torch.no_grad():
        before = base.eps(x, t, cond)
        with base.adapter_enabled(net):
            e_net = base.eps(x, t, cond)
        after = base.eps(x, t, cond)
        k = torch.full((6,), round(0.6 * 1000) - 1)
        u, c = net(torch.cat([x, x]), k, encoder_hidden_states=torch.cat([emb[[2, 2, 2]], emb[cond]])).sample.chunk(2)
        expected = (u + W * (c - u)).double()
    assert base.nfe == 3 * 2 * 3
    torch.testing.assert_close(e_net.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after, before)
    assert (e_net - before).abs().max() > 1e-3


def test_default_targets_hub_downloads_and_missing_weights(monkeypatch):
    """``target_modules: null`` is SD's attention projections (the same adapter as the explicit list); the hub files
    of SD 1.5 (safetensors only); a hub id that is not cached offline fails with one line naming the key."""
    import huggingface_hub

    from iif.hub import MissingWeights

    default = LoRAGuidance(StableDiffusionBase("tiny", PROMPTS), rank=2, target_modules=None)
    explicit = LoRAGuidance(StableDiffusionBase("tiny", PROMPTS), rank=2,
                            target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    assert default.adapter_parameters().keys() == explicit.adapter_parameters().keys()
    assert default.config.target_modules == set(StableDiffusionBase.lora_target_modules)

    repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    (dl,) = StableDiffusionBase.hub_downloads({"pretrained": repo})
    assert dl.repo_id == repo and dl.what == "base_model.pretrained"
    for f in ("model_index.json", "scheduler/scheduler_config.json", "unet/diffusion_pytorch_model.safetensors",
              "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/*"):
        assert f in dl.allow_patterns
    assert not any(p.endswith(".bin") or "fp16" in p or "non_ema" in p for p in dl.allow_patterns)
    assert StableDiffusionBase.hub_downloads({"pretrained": "tiny"}) == []

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingWeights, match=r"base_model.pretrained: 'iif-test/no-such-sd15'.*iif-prefetch"):
        StableDiffusionBase("iif-test/no-such-sd15", PROMPTS)


def test_a_saved_adapter_in_a_stock_pipeline_gives_the_suites_samples(tmp_path):
    """A LoRA adapter saved by the suite and loaded into a stock ``StableDiffusionPipeline`` (``load_lora_weights``)
    samples what the suite's DDIM sampler samples with that adapter: from the same initial latents, deterministic
    DDIM (eta = 0, SD's leading grid with steps_offset 1), CFG scale W, the same prompt; compared on the final
    latents (``output_type="latent"``). The whole chain: the adapter, CFG, the text encoding, the grid, the steps."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from iif.samplers.ddim import DDIMSampler

    base, guidance = _build()
    with torch.no_grad():
        _perturb(guidance, scale=0.2)  # a trained adapter: h != 0
    guidance.save_adapter(tmp_path / "lora")
    sampler = DDIMSampler(N_STEPS, eta=0.0, spacing="leading", steps_offset=1)
    torch.manual_seed(5)
    ours = sampler.sample(base, guidance, 2, cond=torch.tensor([1, 1]), keep_states=True)
    torch.manual_seed(5)
    unguided = sampler.sample(base, None, 2, cond=torch.tensor([1, 1]), keep_states=True)
    assert torch.equal(unguided.states[0], ours.states[0])

    parts = tiny_components(0)  # the same weights as the suite's tiny base, a fresh copy
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   unet=parts["unet"], scheduler=DDIMScheduler(**SD_SCHEDULE, steps_offset=1,
                                                                               clip_sample=False, set_alpha_to_one=True),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(tmp_path / "lora")
    pixels = 8 * pipe.vae_scale_factor
    with torch.no_grad():
        theirs = pipe([PROMPTS[1]] * 2, height=pixels, width=pixels, num_inference_steps=N_STEPS, guidance_scale=W,
                      eta=0.0, latents=ours.states[0].clone(), output_type="latent").images
    torch.testing.assert_close(theirs, ours.x0, rtol=1e-4, atol=1e-4)
    assert (ours.x0 - unguided.x0).abs().max() > 100 * 1e-4  # the adapter changed the samples: the test can fail
