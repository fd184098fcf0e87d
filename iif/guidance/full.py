"""``full``: the h-transform as a full fine-tuned copy of the base's denoiser (adjoint matching's Stable Diffusion
setting; docs/methods.md §4.4, §7.4).

``h(x_t, t | c) = (eps_0(x_t, t | c) - eps_phi(x_t, t | c)) / sigma(t)`` with ``eps_phi`` the base model's own
prediction (its classifier-free guidance included) computed with a trainable copy ``phi`` of its denoiser in place
of the frozen one. ``phi`` starts as the base's weights, so ``h == 0`` exactly at initialisation when the copy
computes in the base's precision (a float32 copy of a half-precision base: up to the base's rounding). Every weight of the
copy is trained, held by the optimiser (AdamW: three copies more), the EMA and the checkpoints: the memory of full
fine-tuning, which LoRA (``guidance=lora``) avoids.

The base model must host a network (:class:`iif.guidance.lora.AdapterBase`: ``adapter_host``, ``frozen_eps``) and
run another one in its place inside ``adapter_enabled(network=...)`` (``base_model=sd15``, ``sd3``).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from iif.base_models.text_to_image import DTYPES
from iif.guidance.base import Guidance

Tensor = torch.Tensor


class FullFineTuning(Guidance):
    """A trainable copy ``phi`` of the base's denoiser; ``h = (eps_base - eps_phi) / sigma(t)``.

    One call evaluates the copy once (counted in the base's ``nfe``; with CFG 2 per sample) and reuses the base's
    own evaluation at the same state (``base.frozen_eps``).

    Args:
        base: the base model (hosts a denoiser: ``adapter_host``).
        reward: unused (every guidance is built with the same arguments).
        dtype: the copy's weights (``float32``: trained in full precision whatever the base's dtype).
    """

    requires = frozenset({"adapter_host"})

    def __init__(self, base, reward=None, dtype: str = "float32"):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"guidance.dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        missing = [a for a in ("adapter_host", "adapter_enabled", "frozen_eps") if not hasattr(base, a)]
        if missing:
            raise TypeError(f"guidance=full needs a base model that hosts a denoiser (e.g. base_model=sd15); "
                            f"{type(base).__name__} has no {', '.join(missing)}")
        host = base.adapter_host
        if getattr(host, "peft_config", None):
            raise ValueError("guidance=full copies the base's denoiser, which already carries an adapter "
                             f"({', '.join(host.peft_config)}); build one guidance per base model")
        self.net = copy.deepcopy(host).to(DTYPES[dtype]).train()
        self.net.requires_grad_(True)
        self._base = (base,)  # not a submodule: the frozen base is not the guidance's

    @property
    def base(self):
        return self._base[0]

    def forward(self, x: Tensor, t: Tensor, x0_hat: Tensor, cond: Tensor | None = None) -> Tensor:
        base = self.base
        eps0 = base.frozen_eps(x, t, cond)
        with base.adapter_enabled(network=self.net):
            eps_phi = base.eps(x, t, cond)
        sigma = base.schedule.sigma(t.to(torch.float64)).to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
        return (eps0 - eps_phi) / sigma

    def save_pretrained(self, directory: str | Path) -> Path:
        """The fine-tuned denoiser in diffusers' layout (``save_pretrained``): load it with
        ``UNet2DConditionModel.from_pretrained(directory)`` (SD3: ``SD3Transformer2DModel``) and pass it to a stock
        pipeline. Saves the current weights (inside ``trainer.sampling_weights()``: the EMA)."""
        self.net.save_pretrained(str(directory))
        return Path(directory)
