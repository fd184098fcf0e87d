"""A CLIP image and text encoder on tensors: the image preprocessing in torch (differentiable w.r.t. the pixels),
L2-normalised features. Used by the ``clip_score`` and ``aesthetic`` rewards and by the table-2 evaluator
(diversity ``1 - mean pairwise cos`` of image features).

The preprocessing is CLIP's (and BLIP's, ImageReward's): pixels ``x in [-1, 1]`` to ``u = (x + 1) / 2 in [0, 1]``,
the shorter side resized to ``S`` (the model's image size; bicubic, antialiased like PIL's), a centre ``S x S`` crop,
and ``(u - mean) / std`` per channel with CLIP's mean and std.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from iif.hub import HubDownload, is_hub_id, missing_weights

Tensor = torch.Tensor

# CLIP's (OpenAI) pixel statistics on [0, 1]; BLIP and ImageReward use the same
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = ("bicubic", "bilinear")
# the files a CLIP repository needs (config, safetensors weights, tokenizer and preprocessor files)
CLIP_FILES = ("*.json", "*.txt", "*.safetensors")


def clip_pixels(x: Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD, interpolation: str = "bicubic") -> Tensor:
    """CLIP's image preprocessing in torch, differentiable w.r.t. ``x``.

    ``[B, 3, H, W]`` in ``[-1, 1]`` -> ``[B, 3, size, size]``: ``u = (x + 1) / 2``; the shorter side resized to
    ``size``, the longer to ``int(size * long / short)`` (as torchvision's ``Resize(size)``), by ``F.interpolate``
    with ``antialias=True`` (PIL's resampling: within 2/255 of PIL's bicubic but at the borders), then clamped to
    ``[0, 1]`` as PIL's 8-bit result is (an overshooting pixel has no gradient); the centre crop (offsets
    ``round((H' - size) / 2)`` as torchvision's ``CenterCrop``); ``(u - mean) / std`` per channel. An image already
    of the model's size is not resampled. The dtype of ``x`` is kept.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"CLIP preprocessing expects images [B, 3, H, W], got {tuple(x.shape)}")
    u = (x + 1) / 2
    h, w = x.shape[-2:]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)  # as torchvision's Resize(size)
    if (nh, nw) != (h, w):
        u = F.interpolate(u, size=(nh, nw), mode=interpolation, align_corners=False, antialias=True).clamp(0, 1)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    u = u[..., top:top + size, left:left + size]
    m = torch.as_tensor(mean, dtype=u.dtype, device=u.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=u.dtype, device=u.device).view(1, 3, 1, 1)
    return (u - m) / s


def pooled(out) -> Tensor:
    """``get_image_features``/``get_text_features`` output as a tensor (transformers 4: a tensor; 5: a model output
    whose ``pooler_output`` is the projected features)."""
    return out if torch.is_tensor(out) else out.pooler_output


class CLIPEncoder:
    """A CLIP model's L2-normalised image and text features.

    ``image_features(x) = f / ||f||``, ``f = visual_projection(vision_model(clip_pixels(x, S)))`` ``[B, D]``, with
    ``S`` the vision tower's image size; ``text_features(texts)`` likewise from the text tower ``[T, D]``.

    Args:
        pretrained: a hub id (default model for real use: ``openai/clip-vit-large-patch14``, ``D = 768``) or a local
            folder in the transformers layout (``CLIPModel`` + ``CLIPTokenizer`` files), or ``tiny``: a random CLIP
            built in code (:func:`tiny_clip`: 2-layer towers of width 32, 32 px images, ``D = 16``; tests, smoke runs).
        dtype: ``float32``, ``float16`` or ``bfloat16``: the weights and the network's arithmetic (features come
            back in the input's floating dtype).
        seed: the random weights of ``pretrained: tiny``.
        interpolation: ``bicubic`` (CLIP's) or ``bilinear``: the resize of :func:`clip_pixels`.
        key: the config key that names ``pretrained`` (error messages), e.g. ``reward.pretrained``.

    Attributes:
        model: the transformers ``CLIPModel`` (frozen, eval mode).
        tokenizer: its ``CLIPTokenizer``.
        image_size: ``S``.
        dim: ``D``.
    """

    def __init__(self, pretrained: str = "openai/clip-vit-large-patch14", dtype: str = "float32", seed: int = 0,
                 interpolation: str = "bicubic", key: str = "pretrained"):
        from iif.base_models.base import DTYPES

        node = key.rpartition(".")[0]  # the component's config node, for messages
        if dtype not in DTYPES:
            raise ValueError(f"{node + '.' if node else ''}dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"{node + '.' if node else ''}interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                             f"got '{interpolation}'")
        if not pretrained:
            raise ValueError(f"{key} must name a CLIP model (hub id, local folder, or tiny)")
        self.pretrained, self.interpolation = str(pretrained), interpolation
        self.model, self.tokenizer = (tiny_clip(seed) if pretrained == "tiny"
                                      else load_clip(self.pretrained, DTYPES[dtype], key))
        self.model.to(DTYPES[dtype]).requires_grad_(False).eval()
        self.image_size = int(self.model.config.vision_config.image_size)
        self.dim = int(self.model.config.projection_dim)

    @classmethod
    def hub_downloads(cls, cfg) -> list[HubDownload]:
        """What ``pretrained`` fetches from the hub (config, safetensors weights, tokenizer): nothing for ``tiny``
        or a local folder."""
        pretrained = cfg.get("pretrained", "openai/clip-vit-large-patch14")
        return [HubDownload(str(pretrained), CLIP_FILES, "pretrained")] if is_hub_id(pretrained) else []

    def place(self, device: torch.device) -> "CLIPEncoder":
        """Move the model to ``device``; returns ``self``."""
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixel_values(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[-1, 1]`` -> the model's input ``[B, 3, S, S]`` (:func:`clip_pixels`)."""
        return clip_pixels(x, self.image_size, interpolation=self.interpolation)

    def image_features(self, x: Tensor) -> Tensor:
        """``x [B, 3, H, W]`` in ``[-1, 1]`` -> ``[B, D]``, unit L2 norm; differentiable w.r.t. ``x``."""
        dtype = next(self.model.parameters()).dtype
        f = pooled(self.model.get_image_features(pixel_values=self.pixel_values(x).to(dtype)))
        return F.normalize(f.to(x.dtype if x.is_floating_point() else torch.float32), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> Tensor:
        """``T`` texts -> ``[T, D]`` float32 on the model's device, unit L2 norm (tokenised with padding, truncated
        to the tokenizer's ``model_max_length``)."""
        tok = self.tokenizer([str(t) for t in texts], padding=True, truncation=True, return_tensors="pt")
        f = pooled(self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                                attention_mask=tok.attention_mask.to(self.device)))
        return F.normalize(f.float(), dim=-1)


def load_clip(pretrained: str, dtype: torch.dtype, key: str = "pretrained"):
    """``(CLIPModel, CLIPTokenizer)`` of a hub id or local folder; a missing model raises
    :func:`iif.hub.missing_weights` (one line, naming ``key`` and ``iif-prefetch``)."""
    from transformers import CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(pretrained, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(pretrained)
    except OSError as e:
        raise missing_weights(key, pretrained, e) from None
    if len(tokenizer) <= len(tokenizer.all_special_tokens):  # transformers 5 returns an empty vocabulary offline
        raise missing_weights(key, pretrained, OSError("its tokenizer files were not found"))
    return model, tokenizer


def tiny_clip(seed: int = 0):
    """``(CLIPModel, CLIPTokenizer)`` with random weights built in code (no download): text and vision towers of
    2 layers, width 32, 4 heads; 32 px images in 8 px patches; projection ``D = 16``; the character-level tokenizer
    of the tiny Stable Diffusion (:func:`iif.base_models.stable_diffusion.tiny_tokenizer`, 16 tokens)."""
    from transformers import CLIPConfig, CLIPModel

    from iif.base_models.stable_diffusion import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return model, tokenizer
