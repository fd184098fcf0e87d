"""``sd15``: Stable Diffusion (a latent text-to-image diffusers model) with classifier-free guidance.

The frozen base is ``eps_w(z_t, t | c) = eps(z_t, t | "") + w (eps(z_t, t | c) - eps(z_t, t | ""))`` (CFG with scale
``w``) on the latents ``z`` of an ``AutoencoderKL``; the condition ``c`` of a sample is the index of its prompt in
``prompts`` (``iif.conditions.prompts``). Methods see latents (``sample_shape = (4, latent_size, latent_size)``);
rewards see pixels through :meth:`StableDiffusionBase.decode`.

The network also hosts a trainable LoRA adapter (``guidance=lora``, :mod:`iif.guidance.lora`): the adapter is off
for every call of the base itself and on only inside :meth:`StableDiffusionBase.adapter_enabled`.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from iif.base_models.base import BaseModel
from iif.nn import set_adapters_enabled
from iif.schedules.discrete import DiscreteSchedule

Tensor = torch.Tensor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# diffusers' scheduler prediction types -> BaseModel.prediction_type
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# Stable Diffusion 1.x's training schedule (its scheduler config): scaled_linear betas in [0.00085, 0.012], T = 1000
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class StableDiffusionBase(BaseModel):
    """A diffusers UNet2DConditionModel + AutoencoderKL + CLIP text encoder, with classifier-free guidance.

    ``predict(z, t, c)``: the UNet runs once on the doubled batch ``[z; z]`` with the text embeddings
    ``[emb(""); emb(prompts[c])]`` at the diffusers timestep ``k = schedule.network_time(t)``, and the two halves
    combine as ``u + w (c - u)`` (one pass with ``emb(prompts[c])`` when ``w == 1``). Prompt embeddings are computed
    once per prompt (and once for ``""``) and cached.

    Args:
        pretrained: a hub id or a local folder in the diffusers layout (subfolders ``unet``, ``vae``,
            ``text_encoder``, ``tokenizer``, ``scheduler``), or ``tiny``: random weights of SD's shape built in code
            (:func:`tiny_components`; tests, smoke runs).
        prompts: the texts a condition indexes (the YAML sets ``${conditions.prompts}``).
        guidance_scale: CFG scale ``w`` (1: no CFG, one network evaluation per call).
        dtype: ``float32``, ``float16`` or ``bfloat16``: the weights and the network's arithmetic (the samples,
            the CFG combination and what methods compute stay in float32).
        latent_size: latent height and width (SD 1.5: 64, i.e. 512 px); None: the UNet's ``sample_size``.
        seed: the random weights of ``pretrained: tiny``.
        prior: unused (the training loop passes a prior to every base model).

    Attributes:
        evals_per_call: 2 with CFG (``w != 1``), else 1.
        unet, vae, text_encoder, tokenizer: the diffusers/transformers components.
        adapter_host: the network a LoRA adapter is added to (the UNet; protocol of :mod:`iif.guidance.lora`).
    """

    provides = frozenset({"differentiable_base", "adapter_host"})
    latent = True

    def __init__(self, pretrained: str, prompts, guidance_scale: float = 7.5, dtype: str = "float32",
                 latent_size: int | None = None, seed: int = 0, prior=None):
        if dtype not in DTYPES:
            raise ValueError(f"base_model.dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        if not guidance_scale >= 0:
            raise ValueError(f"base_model.guidance_scale must be >= 0, got {guidance_scale}")
        texts = [str(p) for p in prompts or ()]
        if not texts:
            raise ValueError("base_model.prompts must list at least one prompt (conditions=prompts sets it)")
        parts = tiny_components(seed) if pretrained == "tiny" else load_components(pretrained, DTYPES[dtype])
        scheduler = parts["scheduler"]
        pred = scheduler.config.prediction_type
        if pred not in PREDICTION_TYPES:
            raise ValueError(f"scheduler of '{pretrained}' has prediction_type '{pred}'; supported: "
                             f"{', '.join(PREDICTION_TYPES)}")
        unet = parts["unet"]
        size = int(latent_size or unet.config.sample_size)
        if size < 1:
            raise ValueError(f"base_model.latent_size must be >= 1, got {latent_size}")
        super().__init__(DiscreteSchedule(alphas_cumprod=scheduler.alphas_cumprod),
                         (unet.config.in_channels, size, size), PREDICTION_TYPES[pred])
        self.unet, self.vae, self.text_encoder = unet, parts["vae"], parts["text_encoder"]
        self.tokenizer = parts["tokenizer"]
        self.to(DTYPES[dtype])
        self.requires_grad_(False).eval()
        self.texts, self.guidance_scale, self.dtype = texts, float(guidance_scale), DTYPES[dtype]
        self.evals_per_call = 1 if self.guidance_scale == 1 else 2
        self._embeddings: dict[int, Tensor] = {}  # prompt index (-1: "") -> [L, D] on the text encoder's device
        self._adapter_on = False
        self._latest = None  # (x, x version, t, cond, eps) of the latest adapter-off eps call

    # ------------------------------------------------------------------ the network
    def place(self, device: torch.device) -> "StableDiffusionBase":
        self._embeddings.clear()
        self._latest = None
        return super().place(device)

    def prompt_embeddings(self, cond: Tensor) -> Tensor:
        """``[B]`` prompt indices (-1: the empty prompt) -> ``[B, L, D]`` text-encoder states, cached per prompt."""
        idx = cond.long().view(-1).tolist()
        bad = [i for i in idx if not -1 <= i < len(self.texts)]
        if bad:
            raise IndexError(f"prompt index {bad[0]} outside the {len(self.texts)} prompts of base_model.prompts")
        missing = sorted(set(idx) - self._embeddings.keys())
        if missing:
            self._embeddings.update(zip(missing, self._encode(["" if i < 0 else self.texts[i] for i in missing])))
        return torch.stack([self._embeddings[i] for i in idx])

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> Tensor:
        tok = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tok.input_ids.to(device))[0]  # last hidden state, as SD 1.x's pipeline

    def predict(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """CFG prediction (in :attr:`prediction_type`): ``x [B, C, H, W]``, ``t [B]``, ``cond [B]`` prompt indices."""
        if cond is None:
            raise ValueError("base_model sd15 needs a prompt per sample (conditions=prompts); got cond=None")
        text = self.prompt_embeddings(cond).to(self.dtype)
        k = self.schedule.network_time(t)
        z = x.to(self.dtype)
        if self.evals_per_call == 1:
            return self.unet(z, k, encoder_hidden_states=text).sample.to(x.dtype)
        empty = self.prompt_embeddings(torch.full_like(cond.view(-1), -1)).to(self.dtype)
        both = self.unet(torch.cat([z, z]), torch.cat([k, k]), encoder_hidden_states=torch.cat([empty, text])).sample
        uncond, conditional = both.to(x.dtype).chunk(2)
        return uncond + self.guidance_scale * (conditional - uncond)

    def eps(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """:meth:`BaseModel.eps`; an evaluation with the adapter off is remembered for :meth:`frozen_eps`."""
        e = super().eps(x, t, cond)
        self._latest = None if self._adapter_on else (x, x._version, t, cond, e)
        return e

    def frozen_eps(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The base's (adapter-off) noise prediction at ``(x, t, cond)``: the latest :meth:`eps` result if it was
        evaluated at these very tensors (the sampler and the IIF loss evaluate the base right before the guidance,
        so the guidance need not evaluate it again), else a new, counted evaluation."""
        latest = self._latest
        if (latest is not None and latest[0] is x and latest[1] == x._version and latest[2] is t
                and latest[3] is cond):
            return latest[4]
        if self._adapter_on:
            raise RuntimeError("frozen_eps called with the adapter enabled")
        return self.eps(x, t, cond)

    # ------------------------------------------------------------------ adapter host (iif.guidance.lora)
    @property
    def adapter_host(self) -> nn.Module:
        return self.unet

    @contextlib.contextmanager
    def adapter_enabled(self):
        """Within this context :meth:`predict` and :meth:`eps` run the UNet with its adapters on (counted in
        :attr:`nfe` like the base's own calls); outside it they are off."""

        if self._adapter_on:
            raise RuntimeError("adapter_enabled() is not reentrant")
        set_adapters_enabled(self.unet, True)
        self._adapter_on = True
        try:
            yield
        finally:
            set_adapters_enabled(self.unet, False)
            self._adapter_on = False

    # ------------------------------------------------------------------ pixels
    def decode(self, x: Tensor) -> Tensor:
        """Latents ``[B, C, h, w]`` -> pixels ``[B, 3, H, W]`` in ``[-1, 1]``: ``vae.decode(x / scaling_factor
        (+ shift_factor))``, clamped (as diffusers' image processor does); differentiable."""
        cfg = self.vae.config
        z = x.to(self.dtype) / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        return self.vae.decode(z).sample.to(x.dtype).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------- components
def load_components(pretrained: str, dtype: torch.dtype = torch.float32) -> dict:
    """The UNet, VAE, text encoder, tokenizer and scheduler of a diffusers Stable Diffusion folder or hub id
    (``from_pretrained`` with subfolders; the weights must be in the local Hugging Face cache, or the hub reachable).
    The scheduler is read as a ``DDPMScheduler`` only for its training schedule (``alphas_cumprod``, from any
    ``beta_schedule`` or ``trained_betas``) and ``prediction_type``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        return {
            "unet": UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", torch_dtype=dtype),
            "vae": AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=dtype),
            "text_encoder": CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", dtype=dtype),
            "tokenizer": CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer"),
            "scheduler": DDPMScheduler.from_config(DDPMScheduler.load_config(pretrained, subfolder="scheduler")),
        }
    except OSError as e:
        raise OSError(f"could not load Stable Diffusion '{pretrained}' (base_model.pretrained): its weights must be in "
                      f"the Hugging Face cache (HF_HOME) or a local folder, or the hub reachable: {e}") from e


def tiny_components(seed: int = 0) -> dict:
    """Random-weight components of Stable Diffusion's shape, built in code (no download; tests and smoke runs).

    A UNet2DConditionModel on ``[4, 8, 8]`` latents (blocks of 32 and 64 channels, cross-attention width 32), an
    AutoencoderKL (4 latent channels, 16 px images), a 2-layer CLIP text encoder of width 32 with a character-level
    BPE tokenizer (letters, digits, space-separated words; 16 tokens), and SD 1.x's training schedule.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=32, sample_size=16)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": DDPMScheduler(**SD_SCHEDULE)}


def tiny_tokenizer(max_length: int = 16):
    """A CLIP BPE tokenizer over single characters (a-z, 0-9, each also as a word end ``x</w>``), no merges but one:
    every word is spelled out; unknown characters map to ``<|endoftext|>``."""
    from transformers import CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars] + ["at</w>"]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
        (Path(d) / "merges.txt").write_text("#version: 0.2\na t</w>\n")  # transformers 5 needs a word-end merge
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=max_length,
                             pad_token="<|endoftext|>")
