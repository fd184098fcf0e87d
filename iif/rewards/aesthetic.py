"""``aesthetic``: the LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann 2022; DDPO's aesthetic
reward): ``r(x) = MLP(f(x))``, ``f`` the unit-norm CLIP ViT-L/14 image embedding, on a 1-10 scale."""
from __future__ import annotations

import torch
from torch import nn

from iif.hub import HubDownload, hub_file, is_hub_id
from iif.rewards.base import Reward
from iif.rewards.clip import CLIPEncoder

Tensor = torch.Tensor

# the published head: sac+logos+ava1-l14-linearMSE.pth, mirrored on the hub
AESTHETIC_HEAD = "camenduru/improved-aesthetic-predictor"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"


def random_head(pretrained: str, head: str) -> bool:
    """Whether the head keeps its random weights: ``head: tiny``, or a tiny CLIP with a head that is not local."""
    return head == "tiny" or (pretrained == "tiny" and is_hub_id(head))


class AestheticMLP(nn.Module):
    """The improved aesthetic predictor's head (also ImageReward's): ``D -> 1024 -> 128 -> 64 -> 16 -> 1``.

    ``layers = [Linear(D, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
    Linear(64, 16), Linear(16, 1)]``: the published layout (state-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``).
    There is no nonlinearity: the published weights were trained so ("linearMSE"), and the map is affine,
    ``MLP(f) = W7 W6 W4 W2 W0 f + b``. The dropouts are inactive in eval mode.

    Args:
        in_features: ``D`` (768 for CLIP ViT-L/14 and for ImageReward's BLIP text width).
    """

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, f: Tensor) -> Tensor:
        """``[B, D]`` -> ``[B]``."""
        return self.layers(f).squeeze(-1)


class AestheticReward(Reward):
    """``r(x) = MLP(f(x) / ||f(x)||)``: CLIP image features (:class:`CLIPEncoder`, normalised) into
    :class:`AestheticMLP`; differentiable w.r.t. ``x``. The condition is not used.

    Args:
        pretrained: the CLIP model (``openai/clip-vit-large-patch14``, the one the head was trained on; a local
            folder; or ``tiny``: random, built in code, and then a random head too unless ``head`` is local).
        head: the head's weights: a hub id (with ``head_file``), a local folder holding ``head_file``, a local
            ``.pth`` file (a state dict in the published layout), or ``tiny``: random weights of the right shape.
            A hub head is not used with ``pretrained: tiny`` (it fits only CLIP ViT-L/14's 768-wide features).
        head_file: the file name in the hub repository or folder.
        dtype, seed: the CLIP model's dtype; the seed of the random (``tiny``) weights.
        temperature: ``lambda``.
    """

    def __init__(self, pretrained: str = "openai/clip-vit-large-patch14", head: str = AESTHETIC_HEAD,
                 head_file: str = AESTHETIC_FILE, dtype: str = "float32", seed: int = 0, temperature: float = 1.0,
                 name: str = "aesthetic"):
        super().__init__(temperature=temperature, name=name)
        self.encoder = CLIPEncoder(pretrained, dtype=dtype, seed=seed, key="reward.pretrained")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.head = AestheticMLP(self.encoder.dim)
        if not random_head(pretrained, head):
            state = torch.load(hub_file(head, head_file, "reward.head"), map_location="cpu", weights_only=True)
            try:
                self.head.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"reward.head: '{head}' is not an aesthetic head for CLIP features of width "
                                 f"{self.encoder.dim} ({' '.join(str(e).split())[:200]})") from None
        self.head.requires_grad_(False).eval()

    @classmethod
    def hub_downloads(cls, cfg) -> list[HubDownload]:
        """The CLIP model (:meth:`CLIPEncoder.hub_downloads`) and the head's file, where they are hub ids."""
        head = cfg.get("head", AESTHETIC_HEAD)
        out = CLIPEncoder.hub_downloads(cfg)
        if is_hub_id(head) and not random_head(cfg.get("pretrained", "openai/clip-vit-large-patch14"), head):
            out.append(HubDownload(str(head), (str(cfg.get("head_file", AESTHETIC_FILE)),), "head"))
        return out

    def place(self, device: torch.device) -> "AestheticReward":
        self.encoder.place(device)
        self.head.to(device)
        return self

    def evaluate(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x [B, 3, H, W]`` in ``[-1, 1]`` -> ``[B]``."""
        f = self.encoder.image_features(x)
        return self.head(f.to(self.head.layers[0].weight.dtype)).to(f.dtype)
