"""``unet``: an image diffusion model, a diffusers ``UNet2DModel`` (the field's standard block), optionally
class-conditional, on any Gaussian path.

Weights come from a file (``weights``: a ``state_dict`` saved by ``torch.save``), from the suite's pretraining stage
(``pretrain``: trained on a dataset on first use and cached, ``iif.pretrain``), or, with neither, stay at their seeded
random initialisation (tests and smoke runs).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from iif.base_models.base import DTYPES, BaseModel
from iif.schedules.base import GaussianPath
from iif.schedules.discrete import DiscreteSchedule
from iif.utils import RunError

log = logging.getLogger(__name__)
Tensor = torch.Tensor


def build_unet(sample_shape, block_out_channels=(32, 64), layers_per_block: int = 1, norm_num_groups: int = 8,
               num_class_embeds: int | None = None, in_channels: int | None = None, out_channels: int | None = None,
               attention: bool = False):
    """A ``UNet2DModel`` for samples ``[C, H, W]`` (``in_channels``/``out_channels`` default to ``C``)."""
    from diffusers import UNet2DModel

    c, h, w = sample_shape
    if h != w:
        raise ValueError(f"the UNet needs square samples, got {h}x{w}")
    if h % 2 ** (len(block_out_channels) - 1):
        raise ValueError(f"sample size {h} must be divisible by 2^(levels-1) = {2 ** (len(block_out_channels) - 1)}")
    down = ("AttnDownBlock2D" if attention else "DownBlock2D",) * len(block_out_channels)
    up = ("AttnUpBlock2D" if attention else "UpBlock2D",) * len(block_out_channels)
    return UNet2DModel(sample_size=h, in_channels=in_channels or c, out_channels=out_channels or c,
                       block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                       down_block_types=down, up_block_types=up, norm_num_groups=norm_num_groups,
                       num_class_embeds=num_class_embeds, add_attention=attention)


def network_timestep(schedule: GaussianPath, t: Tensor) -> Tensor:
    """The UNet's timestep: the diffusers index on a discrete schedule, ``1000 t`` on a continuous path (the scale of
    the timesteps diffusers' sinusoidal embedding was designed for)."""
    if isinstance(schedule, DiscreteSchedule):
        return schedule.network_time(t)
    return 1000.0 * t


class UNetBase(BaseModel):
    """``eps_theta(x, t | c)`` (or another prediction type) from a ``UNet2DModel``.

    Args:
        schedule: the Gaussian path the network was trained on.
        sample_shape: ``[C, H, W]``.
        prediction_type: what the network predicts.
        block_out_channels, layers_per_block, norm_num_groups, attention: the UNet's size.
        num_classes: class-conditional with this many classes (the condition is a label ``[B]`` long), or None.
        weights: a saved ``state_dict`` to load, or None.
        pretrain: a :class:`~iif.pretrain.DenoiserPretraining` that trains the network on a dataset (cached), used when
            ``weights`` is None; None too: seeded random weights.
        seed: the initialisation seed.
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``: the network's weights and arithmetic once its
            weights are in place (pretraining and its cache are float32 and unchanged); inputs are cast to it and
            the prediction back to the samples' dtype. A frozen base in ``bfloat16`` is a slightly different model:
            an evaluator's reference (keyed by the weights) is then that model's.
    """

    def __init__(self, schedule: GaussianPath, sample_shape=(1, 8, 8), prediction_type: str = "eps",
                 block_out_channels=(32, 64), layers_per_block: int = 1, norm_num_groups: int = 8,
                 attention: bool = False, num_classes: int | None = None, weights: str | None = None, pretrain=None,
                 seed: int = 0, dtype: str = "float32"):
        super().__init__(schedule, tuple(sample_shape), prediction_type)
        if dtype not in DTYPES:
            raise ValueError(f"base_model.dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        self.net_dtype = DTYPES[dtype]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = build_unet(self.sample_shape, block_out_channels, layers_per_block, norm_num_groups,
                                  num_classes, attention=attention)
        self.num_classes, self.weights, self.pretrain = num_classes, weights, pretrain
        self.requires_grad_(False)

    def _pretrain_key(self) -> dict:
        return {"schedule": repr(self.schedule), "shape": list(self.sample_shape),
                "prediction_type": self.prediction_type}

    def cache_path(self) -> Path | None:
        """Where the pretrained weights are (the cache, or shipped with the package) or will be cached (None: the
        weights do not come from pretraining)."""
        if self.weights is not None or self.pretrain is None:
            return None
        return self.pretrain.weights_path(self.net, self._pretrain_key())

    def prepare(self) -> None:
        """The weights (pretrained and cached, from a file, or the seeded random ones), then the cast to ``dtype``."""
        self._load_weights()
        if self.net.dtype != self.net_dtype:  # nn.Module's cast: diffusers' own warns on every call (nothing to keep)
            torch.nn.Module.to(self.net, self.net_dtype)

    def _load_weights(self) -> None:
        if self.weights is None and self.pretrain is not None:
            self.pretrain.load_or_train(self.net, self._pretrain_key(), base=self)
            return
        if self.weights is None:
            log.info("unet base model: random weights (weights: null)")
            return
        path = Path(self.weights)
        if not path.exists():
            raise RunError(f"base_model.weights: {path} does not exist")
        self.net.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
        self.net.to(self.device)

    def predict(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The UNet's prediction ``[B, C, H, W]`` in ``x``'s dtype, computed in the network's (float32 while it is
        pretrained, then ``dtype``)."""
        z = x.to(self.net.dtype)
        if self.num_classes is None:  # unconditional: a condition (e.g. a measurement) is for h and the reward
            return self.net(z, network_timestep(self.schedule, t)).sample.to(x.dtype)
        if cond is None or cond.dim() != 1:
            raise ValueError("a class-conditional UNet (base_model.num_classes) needs a class label per sample "
                             "(conditions=labels)")
        return self.net(z, network_timestep(self.schedule, t), class_labels=cond.long()).sample.to(x.dtype)
