"""What every trained method does with its network: optimiser steps, cosine learning-rate decay, gradient
clipping and an exponential moving average (EMA) of the weights used for sampling."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from iif.distributed import world

Tensor = torch.Tensor


class Trainer:
    """Optimisation state of the trainable parameters of one module (the guidance ``h``, a LoRA adapter of a frozen
    network, or DPOK's value network).

    Only parameters with ``requires_grad`` are optimised, averaged across processes, EMA-tracked and checkpointed:
    an adapter on a large frozen network costs the adapter's size, not the network's.

    Args:
        module: the trained module (its parameters with ``requires_grad``).
        optimizer: a partially-applied ``torch.optim`` class (Hydra ``_partial_``; default Adam).
        total_steps, lr_final_factor: the learning rate decays by a cosine over ``total_steps`` optimiser steps to
            ``lr_final_factor`` times its initial value (1: constant).
        grad_clip: clip the gradient norm to this value before each step (0: off).
        ema_decay: if > 0, keep an EMA of the weights; :meth:`sampling_weights` swaps it in.
    """

    def __init__(self, module: nn.Module, optimizer=None, *, total_steps: int = 1, lr_final_factor: float = 1.0,
                 grad_clip: float = 0.0, ema_decay: float = 0.0):
        if total_steps < 1 or not 0 < lr_final_factor <= 1:
            raise ValueError(f"method.iterations must be >= 1 and method.lr_final_factor in (0, 1], "
                             f"got {total_steps} steps, {lr_final_factor}")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"method.ema_decay must lie in [0, 1), got {ema_decay}")
        if grad_clip < 0:
            raise ValueError(f"method.grad_clip must be >= 0, got {grad_clip}")
        self.module, self.grad_clip, self.ema_decay = module, grad_clip, ema_decay
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError(f"{type(module).__name__} has no trainable parameters")
        self.optimizer = (optimizer or torch.optim.Adam)(list(self.params.values()))
        lr0 = self.optimizer.param_groups[0]["lr"]
        self.lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=total_steps, eta_min=lr0 * lr_final_factor)
        self.ema = {k: v.detach().clone() for k, v in self.params.items()} if ema_decay > 0 else None

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        """Average the gradients over the processes of the run (``iif.distributed``; nothing in one process), clip,
        step, decay the learning rate, update the EMA; returns the gradient norm before clipping."""
        params = [p for p in self.params.values() if p.grad is not None]
        world().mean_([p.grad for p in params])
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.lr_schedule.step()
        if self.ema is not None:
            with torch.no_grad():
                for k, v in self.params.items():
                    self.ema[k].lerp_(v, 1 - self.ema_decay)
        return float(norm)

    def minimise(self, loss: Tensor) -> float:
        """One optimiser step on ``loss`` (a scalar with a graph to the module); returns the gradient norm."""
        self.zero_grad()
        loss.backward()
        return self.step()

    @property
    def lr(self) -> float:
        return self.lr_schedule.get_last_lr()[0]

    @contextlib.contextmanager
    def sampling_weights(self):
        """Context in which the module holds the weights used for sampling (the EMA weights if enabled)."""
        if self.ema is None:
            yield
            return
        saved = self.weights()
        self._assign(self.ema)
        try:
            yield
        finally:
            self._assign(saved)

    def weights(self) -> dict[str, Tensor]:
        """Copies of the trainable parameters, by name."""
        return {k: v.detach().clone() for k, v in self.params.items()}

    @torch.no_grad()
    def _assign(self, values: dict[str, Tensor]) -> None:
        missing = self.params.keys() - values.keys()
        if missing:
            raise KeyError(f"checkpoint lacks trainable parameters {sorted(missing)[:3]}")
        for k, p in self.params.items():
            p.copy_(values[k])

    def state_dict(self) -> dict:
        """The trainable parameters (``module``), optimiser, learning-rate schedule and EMA."""
        return {"module": self.weights(), "optimizer": self.optimizer.state_dict(),
                "lr_schedule": self.lr_schedule.state_dict(), "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self._assign(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        # the EMA lives where the parameters do (a checkpoint is read to the CPU)
        self.ema = None if state["ema"] is None else {k: state["ema"][k].to(p.device) for k, p in self.params.items()}
