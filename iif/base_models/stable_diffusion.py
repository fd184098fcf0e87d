"""``sd15``: Stable Diffusion 1.x (a latent text-to-image diffusers model: UNet, VAE, CLIP text encoder) with
classifier-free guidance, on :class:`~iif.base_models.text_to_image.TextToImageBase` (docs/text-to-image-models.md).

The frozen base is ``eps_w(z_t, t | c) = eps(z_t, t | "") + w (eps(z_t, t | c) - eps(z_t, t | ""))`` on the latents
``z`` of an ``AutoencoderKL``, on SD's discrete training schedule; the condition ``c`` of a sample is the index of
its prompt in ``prompts`` (``iif.conditions.prompts``). Methods see latents (``sample_shape = (4, latent_size,
latent_size)``); rewards see pixels through ``decode``.

The network also hosts a trainable LoRA adapter (``guidance=lora``, :mod:`iif.guidance.lora`): the adapter is off
for every call of the base itself and on only inside ``adapter_enabled``.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from iif.base_models.text_to_image import DTYPES, TextToImageBase, check_options, loading_errors, weight_files
from iif.schedules.discrete import DiscreteSchedule

Tensor = torch.Tensor

__all__ = ["StableDiffusionBase", "load_components", "tiny_components", "tiny_tokenizer", "SD_SCHEDULE", "DTYPES"]

# diffusers' scheduler prediction types -> BaseModel.prediction_type
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# Stable Diffusion 1.x's training schedule (its scheduler config): scaled_linear betas in [0.00085, 0.012], T = 1000
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class StableDiffusionBase(TextToImageBase):
    """A diffusers UNet2DConditionModel + AutoencoderKL + CLIP text encoder, with classifier-free guidance
    (:class:`TextToImageBase`: ``predict``, the CFG steps, the memory options, the adapter host, ``decode``).

    The UNet runs at the diffusers timestep ``k = schedule.network_time(t)`` with ``encoder_hidden_states`` = the
    CLIP text encoder's last hidden state of the prompt (``[77, 768]`` for SD 1.5), as SD 1.x's pipeline.

    Args:
        pretrained: a hub id or a local folder in the diffusers layout (subfolders ``unet``, ``vae``,
            ``text_encoder``, ``tokenizer``, ``scheduler``), or ``tiny``: random weights of SD's shape built in code
            (:func:`tiny_components`; tests, smoke runs).
        prompts: the texts a condition indexes (the YAML sets ``${conditions.prompts}``).
        guidance_scale: CFG scale ``w`` (1: no CFG, one network evaluation per call).
        dtype: ``float32``, ``float16`` or ``bfloat16``: the weights and the network's arithmetic.
        latent_size: latent height and width (SD 1.5: 64, i.e. 512 px); None: the UNet's ``sample_size``.
        gradient_checkpointing, vae_tiling, vae_slicing, cpu_offload, cfg_chunk: memory options
            (:class:`TextToImageBase`).
        attention_slicing: diffusers' ``unet.set_attention_slice``: ``auto`` (attention in two steps over half the
            heads), ``max`` (one head at a time), or an int (that many slices of the batch-times-heads dimension at a
            time); None: off.
        seed: the random weights of ``pretrained: tiny``.
        prior: unused (the training loop passes a prior to every base model).

    Attributes:
        unet, vae, text_encoder, tokenizer: the diffusers/transformers components.
    """

    denoiser_name = "unet"
    lora_loader = "StableDiffusionLoraLoaderMixin"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention projections

    def __init__(self, pretrained: str, prompts, guidance_scale: float = 7.5, dtype: str = "float32",
                 latent_size: int | None = None, gradient_checkpointing: bool = False, attention_slicing=None,
                 vae_tiling: bool = False, cpu_offload: bool = False, cfg_chunk: bool = False,
                 vae_slicing: bool = False, seed: int = 0, prior=None):
        texts = check_options(prompts, guidance_scale, dtype, attention_slicing)
        if latent_size is not None and latent_size < 1:
            raise ValueError(f"base_model.latent_size must be >= 1, got {latent_size}")
        parts = tiny_components(seed) if pretrained == "tiny" else load_components(pretrained, DTYPES[dtype])
        scheduler = parts.pop("scheduler")
        pred = scheduler.config.prediction_type
        if pred not in PREDICTION_TYPES:
            raise ValueError(f"base_model.pretrained: the scheduler of '{pretrained}' has prediction_type '{pred}'; "
                             f"supported: {', '.join(PREDICTION_TYPES)}")
        unet = parts["unet"]
        size = int(latent_size or unet.config.sample_size)
        super().__init__(parts, DiscreteSchedule(alphas_cumprod=scheduler.alphas_cumprod),
                         (unet.config.in_channels, size, size), PREDICTION_TYPES[pred], texts, guidance_scale, dtype,
                         gradient_checkpointing=gradient_checkpointing, attention_slicing=attention_slicing,
                         vae_tiling=vae_tiling, cpu_offload=cpu_offload, cfg_chunk=cfg_chunk,
                         vae_slicing=vae_slicing)

    def _slice_attention(self, size) -> None:
        self.unet.set_attention_slice(size)

    @classmethod
    def hub_files(cls, cfg) -> tuple[str, ...]:
        return ("model_index.json", "scheduler/scheduler_config.json", *weight_files("unet"), *weight_files("vae"),
                *weight_files("text_encoder", "model"), "tokenizer/*")

    def prompt_embeddings(self, cond: Tensor) -> Tensor:
        """``[B]`` prompt indices (-1: the empty prompt) -> ``[B, L, D]`` text-encoder states, cached per prompt."""
        return self.conditioning(cond)["encoder_hidden_states"]

    def _encode(self, texts: list[str]) -> dict[str, Tensor]:
        tok = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        # the last hidden state, as SD 1.x's pipeline
        return {"encoder_hidden_states": self.text_encoder(tok.input_ids.to(device))[0]}


# ---------------------------------------------------------------------------------------------- components
def load_components(pretrained: str, dtype: torch.dtype = torch.float32) -> dict:
    """The UNet, VAE, text encoder, tokenizer and scheduler of a diffusers Stable Diffusion folder or hub id
    (``from_pretrained`` with subfolders; the weights must be in the local Hugging Face cache, or the hub reachable:
    else :func:`iif.hub.missing_weights`, one line naming the model and ``iif-prefetch``). The scheduler is read as a
    ``DDPMScheduler`` only for its training schedule (``alphas_cumprod``, from any ``beta_schedule`` or
    ``trained_betas``) and ``prediction_type``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    with loading_errors(pretrained):
        return {
            "unet": UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", torch_dtype=dtype),
            "vae": AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=dtype),
            "text_encoder": CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", dtype=dtype),
            "tokenizer": CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer"),
            "scheduler": DDPMScheduler.from_config(DDPMScheduler.load_config(pretrained, subfolder="scheduler")),
        }


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
