"""``image_reward``: ImageReward v1.0 (Xu et al. 2023), a BLIP model fine-tuned on human preferences between
text-to-image generations, computed from tensors and differentiable w.r.t. the pixels.

``r(x | c) = (MLP(h_CLS) - mu) / sigma``: the image ``x`` goes through BLIP's ViT-L/16 (224 px, CLIP's
preprocessing in torch: :func:`iif.rewards.clip.clip_pixels`), the prompt ``prompts[c]`` (BERT's uncased tokenizer,
padded/truncated to 35 tokens) through BLIP's text encoder, which cross-attends to every image token; ``h_CLS`` is its
last hidden state at the first token, the head is the 768-1024-128-64-16-1 MLP of :class:`AestheticMLP`, and
``mu = 0.16717362830052426``, ``sigma = 1.0333394966054072`` are ImageReward's published normalisation.

The network is transformers' BLIP (``BlipVisionModel`` + ``BlipTextModel``, the architecture of the original BLIP
code), loaded from ImageReward's own checkpoint (``THUDM/ImageReward``: ``ImageReward.pt`` and ``med_config.json``)
with the renaming in :data:`VISION_KEYS`. The ``image-reward`` package itself is not used: version 1.5 imports
helpers that transformers 5 removed and needs ``setuptools<81`` (docs/text-to-image-rewards.md).
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import torch

from iif.hub import HubDownload, hub_file, is_hub_id, missing_weights
from iif.rewards.aesthetic import AestheticMLP
from iif.rewards.base import Reward
from iif.rewards.clip import clip_pixels
from iif.rewards.clip_score import prompt_indices, prompt_list

Tensor = torch.Tensor

IMAGE_REWARD_REPO = "THUDM/ImageReward"
BERT_TOKENIZER = "google-bert/bert-base-uncased"
SCORE_MEAN = 0.16717362830052426  # ImageReward v1.0's normalisation of the head's output
SCORE_STD = 1.0333394966054072
BLIP_HEAD_DIM = 64  # BLIP's ViTs (base 768 / 12 heads, large 1024 / 16) use attention heads of width 64
# BLIP's ViT keys in the checkpoint (after ``blip.visual_encoder.``) -> transformers' BlipVisionModel keys
VISION_KEYS = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)
VISION_PREFIX, TEXT_PREFIX, HEAD_PREFIX = "blip.visual_encoder.", "blip.text_encoder.", "mlp."


class ImageRewardScore(Reward):
    """ImageReward v1.0's score of ``(x, prompts[c])``, differentiable w.r.t. ``x``.

    Args:
        prompts: the texts a condition ``c`` indexes (``${conditions.prompts}``).
        pretrained: a hub id (``THUDM/ImageReward``) or a local folder holding ``checkpoint`` and ``med_config``;
            or ``tiny``: a random BLIP of the same shape (2-layer towers of width 32, 32 px images) with a tiny
            BERT tokenizer, built in code (tests, smoke runs; ``tokenizer`` is then unused).
        checkpoint: the state dict file (``ImageReward.pt``: keys ``blip.visual_encoder.*``,
            ``blip.text_encoder.*``, ``mlp.layers.*``).
        med_config: BLIP's text-encoder config (``med_config.json``: BERT sizes).
        tokenizer: the BERT tokenizer's hub id or local folder (``vocab.txt``): ``google-bert/bert-base-uncased``.
        max_length: prompt tokens (padded and truncated; ImageReward: 35).
        score_mean, score_std: ``mu``, ``sigma``.
        dtype: ``float32``, ``float16`` or ``bfloat16`` for BLIP (the head stays float32).
        seed: the random weights of ``pretrained: tiny``.
        temperature: ``lambda``.

    Attributes:
        vision, text: transformers' ``BlipVisionModel`` and ``BlipTextModel`` (frozen, eval mode).
        head: :class:`AestheticMLP` on the text width.
        tokenizer: the ``BertTokenizer``.
        image_size: BLIP's input size (224).
    """

    def __init__(self, prompts=None, pretrained: str = IMAGE_REWARD_REPO, checkpoint: str = "ImageReward.pt",
                 med_config: str = "med_config.json", tokenizer: str = BERT_TOKENIZER, max_length: int = 35,
                 score_mean: float = SCORE_MEAN, score_std: float = SCORE_STD, dtype: str = "float32", seed: int = 0,
                 temperature: float = 1.0, name: str = "image_reward"):
        from iif.base_models.base import DTYPES

        super().__init__(temperature=temperature, name=name)
        self.texts = prompt_list(prompts, name)
        if dtype not in DTYPES:
            raise ValueError(f"reward.dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        if not score_std > 0:
            raise ValueError(f"reward.score_std must be > 0, got {score_std}")
        if not max_length >= 2:
            raise ValueError(f"reward.max_length must be >= 2 (CLS and SEP tokens), got {max_length}")
        self.score_mean, self.score_std = float(score_mean), float(score_std)
        if pretrained == "tiny":
            self.vision, self.text, self.head, self.tokenizer = tiny_image_reward(seed)
        else:
            ckpt = hub_file(pretrained, checkpoint, "reward.pretrained")
            med = hub_file(pretrained, med_config, "reward.pretrained")
            try:
                state = torch.load(ckpt, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 -- a truncated or foreign file: one line
                raise ValueError(f"reward.pretrained: cannot read {ckpt} as a state dict ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:200]})") from None
            self.vision, self.text, self.head = load_image_reward(state, json.loads(med.read_text()), str(ckpt))
            self.tokenizer = load_bert_tokenizer(tokenizer, "reward.tokenizer")
        for net in (self.vision, self.text):
            net.to(DTYPES[dtype])
        for net in (self.vision, self.text, self.head):
            net.requires_grad_(False).eval()
        self.image_size = int(self.vision.config.image_size)
        tok = self.tokenizer(self.texts, padding="max_length", truncation=True, max_length=int(max_length),
                             return_tensors="pt")
        self.input_ids, self.attention_mask = tok.input_ids, tok.attention_mask  # [P, max_length] each

    @classmethod
    def hub_downloads(cls, cfg) -> list[HubDownload]:
        """The checkpoint and ``med_config`` of ``pretrained`` and the tokenizer's ``vocab.txt``, where they are hub
        ids (nothing for ``tiny``)."""
        pretrained = cfg.get("pretrained", IMAGE_REWARD_REPO)
        if pretrained == "tiny":
            return []
        out = []
        if is_hub_id(pretrained):
            files = (str(cfg.get("checkpoint", "ImageReward.pt")), str(cfg.get("med_config", "med_config.json")))
            out.append(HubDownload(str(pretrained), files, "pretrained"))
        tokenizer = cfg.get("tokenizer", BERT_TOKENIZER)
        if is_hub_id(tokenizer):
            out.append(HubDownload(str(tokenizer), ("vocab.txt",), "tokenizer"))
        return out

    def place(self, device: torch.device) -> "ImageRewardScore":
        for net in (self.vision, self.text, self.head):
            net.to(device)
        return self

    def pixel_values(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[-1, 1]`` -> BLIP's input ``[B, 3, 224, 224]`` (CLIP's preprocessing, in torch)."""
        return clip_pixels(x, self.image_size)

    def score_tokens(self, x: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The score of images ``x [B, 3, H, W]`` in ``[-1, 1]`` with tokenised prompts ``input_ids``,
        ``attention_mask [B, L]`` -> ``[B]`` in ``x``'s dtype."""
        dtype = next(self.vision.parameters()).dtype
        image = self.vision(pixel_values=self.pixel_values(x).to(dtype)).last_hidden_state  # [B, 1 + N, Dv]
        device = image.device
        h = self.text(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                      encoder_hidden_states=image).last_hidden_state[:, 0]  # [B, Dt]
        r = self.head(h.to(self.head.layers[0].weight.dtype))
        return ((r - self.score_mean) / self.score_std).to(x.dtype if x.is_floating_point() else torch.float32)

    def evaluate(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x [B, 3, H, W]`` in ``[-1, 1]``, ``cond [B]`` prompt indices -> ``[B]``."""
        idx = prompt_indices(cond, len(self.texts), self.name)
        idx = idx.cpu()  # the token table stays on the CPU; score_tokens moves the batch's rows
        return self.score_tokens(x, self.input_ids[idx], self.attention_mask[idx])


# ---------------------------------------------------------------------------------------------- loading
def rename(state: dict, rules) -> dict:
    """``state`` with each key rewritten by the first matching ``(pattern, replacement)`` of ``rules``."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            if re.search(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        out[key] = value
    return out


def part(state: dict, prefix: str) -> dict:
    """The entries of ``state`` under ``prefix``, the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_into(module: torch.nn.Module, state: dict, source: str) -> None:
    """Load every parameter and persistent buffer of ``module`` from ``state`` (extra entries, e.g. BLIP's
    ``position_ids`` or projections, are ignored); anything missing or of the wrong shape raises one line."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    wrong = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or wrong:
        raise ValueError(f"reward.pretrained: {source} is not an ImageReward checkpoint of this layout (missing "
                         f"{missing[:3]}, wrong shape {wrong[:3]})")
    module.load_state_dict({k: state[k] for k in own})


def load_image_reward(state: dict, med: dict, source: str = "checkpoint"):
    """``(BlipVisionModel, BlipTextModel, AestheticMLP)`` from an ImageReward state dict and its ``med_config``.

    The vision sizes are read off the checkpoint (width from ``cls_token``, patch from the patch embedding, image
    size from the number of positions, depth from the blocks; heads of width 64, LayerNorm eps 1e-6 as BLIP's ViT);
    the text sizes from ``med`` (BERT keys), its cross-attention width being the vision width.
    """
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    vis = part(state, VISION_PREFIX)
    if "cls_token" not in vis:
        raise ValueError(f"reward.pretrained: {source} has no '{VISION_PREFIX}cls_token': not an ImageReward "
                         "checkpoint")
    width, patch = vis["cls_token"].shape[-1], vis["patch_embed.proj.weight"].shape[-1]
    side = math.isqrt(vis["pos_embed"].shape[1] - 1)
    depth = 1 + max(int(m.group(1)) for k in vis if (m := re.match(r"blocks\.(\d+)\.", k)))
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=width, intermediate_size=vis["blocks.0.mlp.fc1.weight"].shape[0], num_hidden_layers=depth,
        num_attention_heads=max(1, width // BLIP_HEAD_DIM), image_size=side * patch, patch_size=patch,
        layer_norm_eps=1e-6, hidden_act="gelu"))
    load_into(vision, rename(vis, VISION_KEYS), source)
    text = BlipTextModel(blip_text_config(BlipTextConfig, med, width), add_pooling_layer=False)
    load_into(text, part(state, TEXT_PREFIX), source)
    head = AestheticMLP(text.config.hidden_size)
    load_into(head, part(state, HEAD_PREFIX), source)
    return vision, text, head


def blip_text_config(config_cls, med: dict, encoder_width: int):
    """transformers' ``BlipTextConfig`` of BLIP's ``med_config.json`` (a BERT config with cross-attention to
    ``encoder_width``-wide image tokens)."""
    return config_cls(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"], layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_act=med.get("hidden_act", "gelu"), pad_token_id=med.get("pad_token_id", 0),
        encoder_hidden_size=encoder_width, is_decoder=True,  # is_decoder: the layers get their cross-attention
        bos_token_id=None, eos_token_id=None, sep_token_id=None)


def load_bert_tokenizer(source: str, key: str = "reward.tokenizer"):
    """A ``BertTokenizer`` from a hub id or local folder holding ``vocab.txt`` (a missing one raises
    :func:`iif.hub.missing_weights`)."""
    from transformers import BertTokenizer

    vocab = hub_file(source, "vocab.txt", key)
    tokenizer = BertTokenizer.from_pretrained(str(vocab.parent))
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise missing_weights(key, source, OSError(f"{vocab} holds no vocabulary"))
    return tokenizer


def tiny_bert_tokenizer():
    """An uncased WordPiece tokenizer over single characters (``[PAD] [UNK] [CLS] [SEP] [MASK]``, a-z, 0-9 and their
    ``##`` continuations): every word is spelled out."""
    from transformers import BertTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.txt").write_text("\n".join(tokens) + "\n")
        return BertTokenizer.from_pretrained(d)


def tiny_image_reward(seed: int = 0):
    """``(vision, text, head, tokenizer)`` of ImageReward's shape with random weights, built in code: a BLIP ViT of
    2 layers, width 64 (one head of 64), 32 px images in 16 px patches; a BLIP text encoder of 2 layers, width 32,
    4 heads, cross-attending to it; the MLP head on width 32; :func:`tiny_bert_tokenizer`."""
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    tokenizer = tiny_bert_tokenizer()
    med = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, image_size=32,
            patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu", initializer_range=0.02))
        text = BlipTextModel(blip_text_config(BlipTextConfig, med, 64), add_pooling_layer=False)
        head = AestheticMLP(32)
    return vision, text, head, tokenizer
