"""``sd3``: Stable Diffusion 3 (a latent rectified-flow text-to-image model: MMDiT transformer, VAE, two CLIP text
encoders and an optional T5) with classifier-free guidance, on
:class:`~iif.base_models.text_to_image.TextToImageBase` (docs/text-to-image-models.md).

The path is rectified flow, ``z_t = (1 - t) z_0 + t eps`` (:class:`~iif.schedules.rectified_flow.RectifiedFlow`,
with the scheduler's time ``shift`` on the sampling grid); the transformer predicts the flow velocity
``u = eps - z_0`` (``prediction_type: velocity``; ``BaseModel.to_eps`` gives ``eps = z + (1 - t) u``) at the
timestep ``1000 t`` (diffusers' ``1000 sigma``). CFG combines velocities, ``u + w (v - u)``, which is the same as
combining noise predictions (the conversion is affine in the prediction with weights summing to 1).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from iif.base_models.stable_diffusion import tiny_tokenizer
from iif.base_models.text_to_image import (DTYPES, BatchSlicedAttention, TextToImageBase, check_options, loading_errors,
                                           weight_files)
from iif.schedules.rectified_flow import RectifiedFlow

Tensor = torch.Tensor


class SD3Base(TextToImageBase):
    """A diffusers ``SD3Transformer2DModel`` + ``AutoencoderKL`` + CLIP-L, CLIP-G (``CLIPTextModelWithProjection``)
    and optionally T5 text encoders, with classifier-free guidance (:class:`TextToImageBase`).

    Text inputs of a prompt, as ``StableDiffusion3Pipeline.encode_prompt`` builds them:

    1. each CLIP: the penultimate hidden states ``[77, D_l]``, ``[77, D_g]`` and the projected pooled output
    2. ``encoder_hidden_states = [pad(cat(h_l, h_g), joint_attention_dim); t5]``: the CLIP states side by side,
       zero-padded to the transformer's ``joint_attention_dim``, followed along the sequence by T5's last hidden
       state ``[max_sequence_length, joint_attention_dim]`` (zeros without T5, as the pipeline with
       ``text_encoder_3=None``)
    3. ``pooled_projections = cat(pooled_l, pooled_g)``

    Args:
        pretrained: a hub id (``stabilityai/stable-diffusion-3-medium-diffusers``; gated: accept its licence and log
            in to download), a local folder in the diffusers layout, or ``tiny``: random weights of SD3's shape built
            in code (:func:`tiny_sd3_components`; T5 absent).
        prompts: the texts a condition indexes (the YAML sets ``${conditions.prompts}``).
        guidance_scale: CFG scale ``w`` (SD3's pipeline default 7).
        dtype: ``float32``, ``float16`` or ``bfloat16``: the weights and the network's arithmetic.
        latent_size: latent height and width (SD3: 128, i.e. 1024 px); None: the transformer's ``sample_size``.
        text_encoder_3: load the T5-XXL encoder (``text_encoder_3``, 4.7 B parameters); false: zeros in its place.
        max_sequence_length: T5's tokens (and the zeros' length without it).
        t_max: the sampling start (rectified flow: ``alpha(1) = 0``).
        shift: the sampling grid's time shift; None: the scheduler config's (SD3: 3).
        gradient_checkpointing, vae_tiling, vae_slicing, cpu_offload, cfg_chunk: memory options
            (:class:`TextToImageBase`).
        attention_slicing: the joint attention runs on slices of the batch (:class:`BatchSlicedAttention`: ``auto``
            two slices, ``max`` one sample a slice, an int that many samples a slice); None: off. diffusers 0.42 has
            no ``set_attention_slice`` for SD3's transformer; its attention already runs PyTorch's
            ``scaled_dot_product_attention`` (memory-efficient kernels on a GPU), so this matters little there.
        seed: the random weights of ``pretrained: tiny``.
        prior: unused (the training loop passes a prior to every base model).

    Attributes:
        transformer, vae, text_encoder, text_encoder_2, text_encoder_3 (or None), tokenizer, tokenizer_2,
        tokenizer_3 (or None): the diffusers/transformers components.
    """

    denoiser_name = "transformer"
    lora_loader = "SD3LoraLoaderMixin"
    # the joint attention's projections: image stream (to_q, to_k, to_v, to_out.0) and text stream (add_*, to_add_out)
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    timestep_scale = 1000.0

    def __init__(self, pretrained: str, prompts, guidance_scale: float = 7.0, dtype: str = "float32",
                 latent_size: int | None = None, text_encoder_3: bool = False, max_sequence_length: int = 256,
                 t_max: float = 0.999, shift: float | None = None, gradient_checkpointing: bool = False,
                 attention_slicing=None, vae_tiling: bool = False, cpu_offload: bool = False, cfg_chunk: bool = False,
                 vae_slicing: bool = False, seed: int = 0, prior=None):
        texts = check_options(prompts, guidance_scale, dtype, attention_slicing)
        if latent_size is not None and latent_size < 1:
            raise ValueError(f"base_model.latent_size must be >= 1, got {latent_size}")
        if max_sequence_length < 1:
            raise ValueError(f"base_model.max_sequence_length must be >= 1, got {max_sequence_length}")
        if pretrained == "tiny" and text_encoder_3:
            raise ValueError("base_model.text_encoder_3: `pretrained: tiny` has no T5 encoder; set it to false")
        if not 0 < t_max < 1:
            raise ValueError(f"base_model.t_max must lie in (0, 1), got {t_max}")
        if shift is not None and not shift > 0:
            raise ValueError(f"base_model.shift must be > 0 (or null: the scheduler's), got {shift}")
        parts = (tiny_sd3_components(seed) if pretrained == "tiny"
                 else load_sd3_components(pretrained, DTYPES[dtype], text_encoder_3))
        scheduler = parts.pop("scheduler")
        if getattr(scheduler.config, "use_dynamic_shifting", False):
            raise ValueError(f"base_model.pretrained: the scheduler of '{pretrained}' uses a resolution-dependent "
                             "time shift (use_dynamic_shifting), which sd3 does not support; set base_model.shift")
        path = RectifiedFlow(t_max, float(scheduler.config.shift if shift is None else shift))
        transformer = parts["transformer"]
        size = int(latent_size or transformer.config.sample_size)
        super().__init__(parts, path, (transformer.config.in_channels, size, size), "velocity", texts, guidance_scale,
                         dtype, gradient_checkpointing=gradient_checkpointing, attention_slicing=attention_slicing,
                         vae_tiling=vae_tiling, cpu_offload=cpu_offload, cfg_chunk=cfg_chunk,
                         vae_slicing=vae_slicing)
        self.max_sequence_length = int(max_sequence_length)

    def _slice_attention(self, size) -> None:
        processors = self.transformer.attn_processors
        self.transformer.set_attn_processor({name: BatchSlicedAttention(p, size) for name, p in processors.items()})

    @classmethod
    def hub_files(cls, cfg) -> tuple[str, ...]:
        files = ("model_index.json", "scheduler/scheduler_config.json", *weight_files("transformer"),
                 *weight_files("vae"), *weight_files("text_encoder", "model"), "tokenizer/*",
                 *weight_files("text_encoder_2", "model"), "tokenizer_2/*")
        t5 = (*weight_files("text_encoder_3", "model"), "tokenizer_3/*")
        return files + (t5 if cfg.get("text_encoder_3") else ())

    # ------------------------------------------------------------------ text
    def _clip(self, encoder, tokenizer, texts: list[str]) -> tuple[Tensor, Tensor]:
        """``([n, 77, D] penultimate hidden states, [n, P] projected pooled output)`` of one CLIP encoder."""
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def _encode(self, texts: list[str]) -> dict[str, Tensor]:
        # 1. the two CLIP encoders
        h_l, pooled_l = self._clip(self.text_encoder, self.tokenizer, texts)
        h_g, pooled_g = self._clip(self.text_encoder_2, self.tokenizer_2, texts)
        # 2. the sequence: CLIP states padded to the joint width, then T5's (or zeros)
        width = self.transformer.config.joint_attention_dim
        clip = F.pad(torch.cat([h_l, h_g], dim=-1), (0, width - h_l.shape[-1] - h_g.shape[-1]))
        if self.text_encoder_3 is None:
            t5 = clip.new_zeros(len(texts), self.max_sequence_length, width)
        else:
            ids = self.tokenizer_3(texts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                   add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.text_encoder_3(ids.to(next(self.text_encoder_3.parameters()).device))[0].to(clip.dtype)
        # 3. the pooled projections
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=1),
                "pooled_projections": torch.cat([pooled_l, pooled_g], dim=-1)}


# ---------------------------------------------------------------------------------------------- components
def load_sd3_components(pretrained: str, dtype: torch.dtype = torch.float32, text_encoder_3: bool = False) -> dict:
    """The transformer, VAE, text encoders, tokenizers and scheduler of a diffusers SD3 folder or hub id
    (``from_pretrained`` with subfolders; the weights must be in the local Hugging Face cache, or the hub reachable:
    else :func:`iif.hub.missing_weights`). T5 (``text_encoder_3``, ``tokenizer_3``) only if asked for, else None."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    with loading_errors(pretrained):
        parts = {
            "transformer": SD3Transformer2DModel.from_pretrained(pretrained, subfolder="transformer",
                                                                 torch_dtype=dtype),
            "vae": AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=dtype),
            "text_encoder": CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder",
                                                                        dtype=dtype),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder_2",
                                                                          dtype=dtype),
            "tokenizer": CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer"),
            "tokenizer_2": CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2"),
            "text_encoder_3": None, "tokenizer_3": None,
            "scheduler": FlowMatchEulerDiscreteScheduler.from_config(
                FlowMatchEulerDiscreteScheduler.load_config(pretrained, subfolder="scheduler")),
        }
        if text_encoder_3:
            from transformers import T5EncoderModel, T5TokenizerFast

            parts["text_encoder_3"] = T5EncoderModel.from_pretrained(pretrained, subfolder="text_encoder_3",
                                                                     dtype=dtype)
            parts["tokenizer_3"] = T5TokenizerFast.from_pretrained(pretrained, subfolder="tokenizer_3")
    return parts


def tiny_sd3_components(seed: int = 0) -> dict:
    """Random-weight components of SD3's shape, built in code (no download; tests and smoke runs).

    An ``SD3Transformer2DModel`` on ``[4, 8, 8]`` latents (patch 1, 2 joint blocks of 4 heads of width 8, joint
    attention width 64, pooled width 64), an ``AutoencoderKL`` (4 latent channels, 16 px images, SD3's scaling and
    shift factors), two 2-layer CLIP text encoders of width 32 with 32-wide projections and the character-level
    tokenizer of ``sd15``'s tiny model (16 tokens), no T5, and SD3's scheduler config (``shift = 3``).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer()

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            projection_dim=32, max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=16)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=32, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609)
        text_encoder, text_encoder_2 = clip(), clip()
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "text_encoder_3": None, "tokenizer": tokenizer, "tokenizer_2": tokenizer, "tokenizer_3": None,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}
