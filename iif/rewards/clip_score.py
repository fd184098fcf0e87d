"""``clip_score``: ``r(x | c) = scale * cos(E_img(x), E_txt(prompts[c]))``, the CLIP similarity of an image and its
prompt (CLIPScore without the clipping at 0, so that the gradient never vanishes)."""
from __future__ import annotations

import torch

from iif.hub import HubDownload
from iif.rewards.base import Reward
from iif.rewards.clip import CLIPEncoder

Tensor = torch.Tensor


def prompt_list(prompts, name: str) -> list[str]:
    """The prompts a condition indexes, as strings; a clear error when the config gives none."""
    texts = [str(p) for p in prompts or ()]
    if not texts:
        raise ValueError(f"reward.prompts must list the prompts a condition indexes (reward '{name}' reads the text; "
                         "use conditions=prompts, which sets it)")
    return texts


def prompt_indices(cond: Tensor | None, n_prompts: int, name: str) -> Tensor:
    """``cond [B]`` (or ``[B, 1]``) prompt indices, checked, as a long tensor ``[B]``."""
    if cond is None:
        raise ValueError(f"reward '{name}' needs a prompt index per sample (conditions=prompts); got cond=None")
    idx = cond.long().view(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_prompts):
        raise IndexError(f"prompt index outside the {n_prompts} prompts of reward.prompts: {idx.tolist()}")
    return idx


class CLIPScoreReward(Reward):
    """``r(x | c) = scale * <f(x), g(prompts[c])>`` with unit-norm CLIP features (:class:`CLIPEncoder`); in
    ``[-scale, scale]``; differentiable w.r.t. ``x`` through the torch preprocessing and the vision tower.

    ``scale = 100`` is the ``100 * cos`` of torchmetrics' CLIPScore (Hessel et al. 2021 use ``2.5 * max(cos, 0)``);
    with ``scale = 1`` the reward is the cosine itself (then ``temperature`` is in cosine units).

    Args:
        prompts: the texts a condition ``c`` indexes (``${conditions.prompts}``).
        pretrained, dtype, seed: the CLIP model (:class:`CLIPEncoder`; ``tiny``: random, built in code).
        scale: the factor in front of the cosine.
        temperature: ``lambda``.
    """

    def __init__(self, prompts=None, pretrained: str = "openai/clip-vit-large-patch14", dtype: str = "float32",
                 seed: int = 0, scale: float = 100.0, temperature: float = 1.0, name: str = "clip_score"):
        super().__init__(temperature=temperature, name=name)
        self.texts = prompt_list(prompts, name)
        if not scale > 0:
            raise ValueError(f"reward.scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.encoder = CLIPEncoder(pretrained, dtype=dtype, seed=seed, key="reward.pretrained")
        self._text: Tensor | None = None  # [P, D] features of every prompt, on the encoder's device

    @classmethod
    def hub_downloads(cls, cfg) -> list[HubDownload]:
        return CLIPEncoder.hub_downloads(cfg)

    def place(self, device: torch.device) -> "CLIPScoreReward":
        self.encoder.place(device)
        self._text = None
        return self

    def text_features(self) -> Tensor:
        """``[P, D]``: the unit-norm features of every prompt, computed once."""
        if self._text is None or self._text.device != self.encoder.device:
            self._text = self.encoder.text_features(self.texts)
        return self._text

    def evaluate(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x [B, 3, H, W]`` in ``[-1, 1]``, ``cond [B]`` prompt indices -> ``[B]``."""
        idx = prompt_indices(cond, len(self.texts), self.name)
        f = self.encoder.image_features(x)
        g = self.text_features()[idx.to(self.encoder.device)].to(f.dtype)
        return self.scale * (f * g).sum(-1)
