"""Stable Diffusion 3 (``base_model=sd3``) on tiny random-weight SD3-shaped components built in code: the CFG
prediction against the transformer called directly on the text inputs of a stock
``StableDiffusion3Pipeline.encode_prompt``, the velocity-to-noise conversion against the path's formula, decoding,
LoRA files into a fresh guidance and into a stock pipeline, the memory options against the plain computation,
``adapter_enabled(network)``, loading a local folder, hub downloads and the missing-weights error, and the YAML."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from iif.base_models.sd3 import SD3Base, tiny_sd3_components  # noqa: E402
from iif.guidance.lora import LoRAGuidance  # noqa: E402
from iif.schedules import RectifiedFlow  # noqa: E402

PROMPTS = ["a photo of a cat", "a red rabbit"]
W = 3.0
L5 = 8  # max_sequence_length: T5's zeros (256 in SD3; fewer here, the same code)


def _base(**kw) -> SD3Base:
    return SD3Base("tiny", PROMPTS, guidance_scale=W, max_sequence_length=L5, **kw)


def _state(n: int = 3, t: float = 0.6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.full((n,), t), torch.arange(n) % len(PROMPTS)


def _pipeline(transformer=None):
    """A stock ``StableDiffusion3Pipeline`` of the same tiny components (seed 0), T5 None."""
    from diffusers import StableDiffusion3Pipeline

    parts = tiny_sd3_components(0)
    if transformer is not None:
        parts["transformer"] = transformer
    return StableDiffusion3Pipeline(**parts)


@torch.no_grad()
def _perturb(guidance, scale: float = 1.0, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    for name, p in guidance.adapter_parameters().items():
        if "lora_B" in name:
            p.copy_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def base():
    return _base()


@pytest.fixture(scope="module")
def text(base):
    """``(emb, neg, pooled, neg_pooled)`` of ``PROMPTS`` (rows 0, 1, 0) by the stock pipeline's ``encode_prompt``."""
    prompts = [PROMPTS[i] for i in (0, 1, 0)]
    with torch.no_grad():
        return _pipeline().encode_prompt(prompts, None, None, negative_prompt=[""] * 3,
                                         do_classifier_free_guidance=True, max_sequence_length=L5)


def _cfg_velocity(transformer, x, t: float, text) -> torch.Tensor:
    """``u + W (c - u)`` from the transformer called directly (timestep ``1000 t``)."""
    emb, neg, pooled, neg_pooled = text
    with torch.no_grad():
        out = transformer(torch.cat([x, x]), encoder_hidden_states=torch.cat([neg, emb]),
                          pooled_projections=torch.cat([neg_pooled, pooled]),
                          timestep=torch.full((2 * x.shape[0],), 1000 * t)).sample
    u, c = out.chunk(2)
    return u + W * (c - u)


# ---------------------------------------------------------------------------------------------- the base
def test_tiny_builds_offline_with_sd3_shapes(base):
    assert base.sample_shape == (4, 8, 8) and base.prediction_type == "velocity" and base.evals_per_call == 2
    assert isinstance(base.schedule, RectifiedFlow) and base.schedule.shift == 3.0 and base.schedule.t_max == 0.999
    assert base.text_encoder_3 is None and base.adapter_host is base.transformer
    assert base.vae.config.shift_factor == 0.0609
    text = base.conditioning(torch.tensor([0, 1, -1]))
    # 16 CLIP tokens + L5 zeros (T5 absent), joint width 64; pooled 32 + 32
    assert text["encoder_hidden_states"].shape == (3, 16 + L5, 64) and text["pooled_projections"].shape == (3, 64)
    assert not any(p.requires_grad for p in base.parameters())


def test_cfg_prediction_equals_the_transformer_called_directly(base, text):
    """``predict`` = ``u + w (c - u)`` of the transformer on the pipeline's text inputs at timestep ``1000 t``;
    ``eps`` = ``(alpha u - alpha' x) / (alpha sigma' - alpha' sigma) = x + (1 - t) u`` (rectified flow) and
    ``x0_hat = x - t u``; 2 evaluations per sample (CFG)."""
    x, t, cond = _state()
    ref = _cfg_velocity(base.transformer, x, 0.6, text)
    nfe = base.nfe
    with torch.no_grad():
        pred = base.predict(x, t, cond)
        eps = base.eps(x, t, cond)
    assert base.nfe - nfe == 2 * 3
    torch.testing.assert_close(pred, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps, x + 0.4 * ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base.x0_hat(x, t, eps), x - 0.6 * ref, rtol=1e-4, atol=1e-4)


def test_conditional_only_drops_cfg(base, text):
    """``conditional_only()``: the conditional velocity alone, one evaluation per sample; the base's cache of its
    latest evaluation (``frozen_eps``) does not mix the two."""
    x, t, cond = _state()
    emb, _, pooled, _ = text
    with torch.no_grad():
        c = base.transformer(x, encoder_hidden_states=emb, pooled_projections=pooled,
                             timestep=torch.full((3,), 600.0)).sample
        with_cfg = base.eps(x, t, cond)
        nfe = base.nfe
        with base.conditional_only():
            e = base.eps(x, t, cond)
            assert base.frozen_eps(x, t, cond) is e
        assert base.nfe - nfe == 3 and base.evals_per_call == 2
        torch.testing.assert_close(e, x + 0.4 * c, rtol=1e-5, atol=1e-5)
        again = base.frozen_eps(x, t, cond)  # evaluated anew, with CFG
    torch.testing.assert_close(again, with_cfg)
    assert base.nfe - nfe == 3 + 6


def test_decode_shape_range_and_formula(base):
    x, _, _ = _state(2)
    with torch.no_grad():
        img = base.decode(x)
        ref = base.vae.decode(x / 1.5305 + 0.0609).sample.clamp(-1, 1)
    assert img.shape == (2, 3, 16, 16) and img.min() >= -1 and img.max() <= 1
    torch.testing.assert_close(img, ref)


def test_velocity_grid_samples_and_errors(base):
    """The samplers use the shifted grid; options are checked before anything is loaded, naming the key."""
    from iif.samplers.ddim import DDIMSampler

    torch.manual_seed(0)
    traj = DDIMSampler(3, eta=1.0).sample(base, None, 2, cond=torch.tensor([0, 1]))
    assert traj.x0.shape == (2, 4, 8, 8) and torch.isfinite(traj.x0).all() and traj.nfe == 6
    with pytest.raises(ValueError, match="conditions=prompts"):
        base.eps(*_state()[:2])
    with pytest.raises(ValueError, match="base_model.text_encoder_3"):
        SD3Base("tiny", PROMPTS, text_encoder_3=True)
    with pytest.raises(ValueError, match="base_model.attention_slicing"):
        SD3Base("tiny", PROMPTS, attention_slicing="some")
    with pytest.raises(ValueError, match="base_model.shift"):
        SD3Base("no/such-model", PROMPTS, shift=0.0)
    with pytest.raises(ValueError, match="conditions=prompts"):
        SD3Base("tiny", None)


# ---------------------------------------------------------------------------------------------- memory options
def test_cfg_chunk_and_attention_slicing_equal_the_plain_computation(base):
    x, t, cond = _state(4)
    with torch.no_grad():
        plain = base.eps(x, t, cond)
        for option in ({"cfg_chunk": True}, {"attention_slicing": "max"}, {"attention_slicing": 3}):
            other = _base(**option)
            nfe = other.nfe
            torch.testing.assert_close(other.eps(x, t, cond), plain, rtol=1e-5, atol=1e-5)
            assert other.nfe - nfe == 2 * 4


def test_gradient_checkpointing_gives_the_same_gradients():
    """The adapter's gradients of a loss through the adapted network, with and without checkpointing."""
    x, t, cond = _state(2)
    grads = []
    for ckpt in (False, True):
        b = _base(gradient_checkpointing=ckpt)
        g = LoRAGuidance(b, rank=2, seed=1)
        _perturb(g, 0.1)
        g.train()
        params = g.adapter_parameters()
        loss = (g(x, t, None, cond) ** 2).sum()
        grads.append(torch.autograd.grad(loss, list(params.values())))
        assert b.transformer.is_gradient_checkpointing == ckpt
    assert any(gr.abs().max() > 0 for gr in grads[0])
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def test_cpu_offload_and_vae_tiling_run():
    b = _base(cpu_offload=True, vae_tiling=True).place(torch.device("cpu"))
    assert b.vae.use_tiling and b.cpu_offload
    x, t, cond = _state(2)
    with torch.no_grad():
        assert torch.isfinite(b.eps(x, t, cond)).all()
        big = b.decode(torch.randn(1, 4, 16, 16))  # larger than a tile (8 latents): decoded in blended tiles
    assert big.shape == (1, 3, 32, 32) and big.min() >= -1 and big.max() <= 1
    # the offloaded decode (the VAE's weights given to the call, copied to the latents' device) is the plain one,
    # and differentiable
    plain = _base()
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    off = _base(cpu_offload=True)
    img = off.decode(z)
    torch.testing.assert_close(img, plain.decode(z))
    (grad,) = torch.autograd.grad(img.sum(), z)
    (ref,) = torch.autograd.grad(plain.decode(z).sum(), z)
    torch.testing.assert_close(grad, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (offload moves between devices)")
def test_cpu_offload_keeps_text_encoders_and_vae_on_the_cpu():
    """On a GPU: only the transformer moves; prompts are encoded on the CPU, the decode copies the VAE's weights to
    the GPU for the call and is differentiable; the values equal the model run wholly on the GPU."""
    dev = torch.device("cuda")
    off = _base(cpu_offload=True).place(dev)
    full = _base().place(dev)
    assert next(off.transformer.parameters()).device.type == "cuda"
    assert all(next(m.parameters()).device.type == "cpu" for m in (off.vae, off.text_encoder, off.text_encoder_2))
    x, t, cond = (a.to(dev) for a in _state(2))
    with torch.no_grad():
        torch.testing.assert_close(off.eps(x, t, cond), full.eps(x, t, cond), rtol=1e-4, atol=1e-4)
    x.requires_grad_(True)
    img = off.decode(x)
    assert img.device.type == "cuda" and next(off.vae.parameters()).device.type == "cpu"
    torch.testing.assert_close(img, full.decode(x), rtol=1e-4, atol=1e-4)
    (grad,) = torch.autograd.grad(img.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


# ---------------------------------------------------------------------------------------------- full fine-tuning
def test_adapter_enabled_with_a_network_runs_that_network(base, text):
    """``adapter_enabled(network)``: ``predict`` calls the given network (a perturbed copy of the transformer) the
    way it calls the transformer; outside, the base's own transformer; evaluations are counted."""
    net = copy.deepcopy(base.transformer)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, cond = _state()
    with torch.no_grad():
        before = base.eps(x, t, cond)
        nfe = base.nfe
        with base.adapter_enabled(net):
            e_net = base.eps(x, t, cond)
            with pytest.raises(RuntimeError, match="frozen_eps"):
                base.frozen_eps(x, t, cond.clone())
        after = base.eps(x, t, cond)
    assert base.nfe - nfe == 2 * 2 * 3
    torch.testing.assert_close(e_net, x + 0.4 * _cfg_velocity(net, x, 0.6, text), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, before)
    assert (e_net - before).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- LoRA
def test_lora_default_targets_and_files_into_a_stock_pipeline(tmp_path):
    """``target_modules: null`` puts the adapter on the joint attention's projections of both streams; h == 0 at
    initialisation; the saved file loads into a fresh guidance (identical weights) and into a stock
    ``StableDiffusion3Pipeline`` (``load_lora_weights``): identical transformer outputs."""
    b = _base()
    g = LoRAGuidance(b, rank=2, alpha=4.0, seed=1)
    names = {n.split(".lora_")[0].split("attn.")[-1] for n in g.adapter_parameters()}
    assert names == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    x, t, cond = _state()
    with torch.no_grad():
        assert torch.equal(g(x, t, None, cond), torch.zeros_like(x))
    _perturb(g, 0.1)
    path = g.save_adapter(tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"

    other = LoRAGuidance(_base(), rank=2, alpha=4.0, seed=7)
    other.load_adapter(tmp_path / "lora")
    saved, loaded = g.adapter_parameters(), other.adapter_parameters()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with pytest.raises(ValueError, match="rank|r="):
        LoRAGuidance(_base(), rank=3).load_adapter(tmp_path / "lora")

    pipe = _pipeline()
    pipe.load_lora_weights(tmp_path / "lora")
    kw = {k: v for k, v in b.conditioning(cond).items()}
    k = 1000 * t
    with torch.no_grad(), b.adapter_enabled():
        ours = b.transformer(x, timestep=k, **kw).sample
        theirs = pipe.transformer(x, timestep=k, **kw).sample
        base_out = _base().transformer(x, timestep=k, **kw).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert (ours - base_out).abs().max() > 1e-3  # the adapter does something


# ---------------------------------------------------------------------------------------------- loading, hub, config
def test_loads_a_local_diffusers_folder(tmp_path, base):
    """The real loading code (``from_pretrained`` with subfolders) on the tiny components saved in the diffusers
    layout; the scheduler config's shift becomes the grid's."""
    parts = tiny_sd3_components(0)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        parts[name].save_pretrained(tmp_path / name)
    loaded = SD3Base(str(tmp_path), PROMPTS, guidance_scale=W, max_sequence_length=L5)
    assert loaded.schedule.shift == 3.0 and loaded.text_encoder_3 is None and loaded.sample_shape == (4, 8, 8)
    assert SD3Base.hub_downloads({"pretrained": str(tmp_path)}) == []
    x, t, cond = _state()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eps(x, t, cond), base.eps(x, t, cond))
    with pytest.raises(OSError, match="base_model.pretrained"):
        SD3Base(str(tmp_path / "transformer"), PROMPTS)  # a folder without the layout


def test_hub_downloads_and_the_missing_weights_error(monkeypatch):
    import huggingface_hub

    from iif.hub import MissingWeights

    repo = "stabilityai/stable-diffusion-3-medium-diffusers"
    (dl,) = SD3Base.hub_downloads({"pretrained": repo, "text_encoder_3": False})
    assert dl.repo_id == repo and dl.what == "base_model.pretrained"
    assert "transformer/diffusion_pytorch_model.safetensors" in dl.allow_patterns
    assert "text_encoder_2/model.safetensors" in dl.allow_patterns and "tokenizer_2/*" in dl.allow_patterns
    assert not any(p.startswith(("text_encoder_3", "tokenizer_3")) for p in dl.allow_patterns)
    assert all(p.endswith((".json", ".safetensors", "/*")) for p in dl.allow_patterns)
    (dl3,) = SD3Base.hub_downloads({"pretrained": repo, "text_encoder_3": True})
    assert "text_encoder_3/model.safetensors" in dl3.allow_patterns and "tokenizer_3/*" in dl3.allow_patterns
    assert SD3Base.hub_downloads({"pretrained": "tiny"}) == []

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingWeights, match=r"base_model.pretrained: 'iif-test/no-such-sd3'.*iif-prefetch"):
        SD3Base("iif-test/no-such-sd3", PROMPTS)


def test_yaml_builds_sd3_with_lora_and_flow_sde():
    from hydra.utils import instantiate

    from iif.checks import check_pairing
    from iif.config import compose

    overrides = ["base_model=sd3", "guidance=lora", "sampler=flow_sde", "conditions=prompts", "logger=none"]
    cfg, choices = compose([*overrides, "base_model.pretrained=tiny", "base_model.latent_size=8",
                            "base_model.max_sequence_length=8", "sampler.n_steps=3"])
    check_pairing(cfg, choices)
    assert cfg.guidance.target_modules is None
    base = instantiate(cfg.base_model, prior=None)
    assert base.texts == list(cfg.conditions.prompts) and base.guidance_scale == 7.0
    guidance = instantiate(cfg.guidance, base=base, reward=None)
    assert guidance.config.target_modules == set(SD3Base.lora_target_modules)
    sampler = instantiate(cfg.sampler)
    torch.manual_seed(0)
    traj = sampler.sample(base, guidance, 2, cond=torch.tensor([0, 0]))
    assert torch.equal(traj.log_rnd, torch.zeros(2, dtype=torch.float64)) and traj.nfe == 2 * 3 + 2 * 2
