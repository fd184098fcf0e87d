"""Small networks shared by base models and guidance."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

Tensor = torch.Tensor


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of continuous times ``t [B] in [0, 1]`` -> ``[B, dim]``.

    Frequencies ``scale * max_period^(-i / (dim/2))``; ``scale = 1000`` is DDPM's (integer steps).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = scale * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeMLP(nn.Module):
    """``MLP([inputs, emb(t)])`` with SiLU activations.

    Args:
        in_dim: width of the (concatenated) input without the time embedding.
        out_dim: output width.
        hidden: hidden width; layers: number of hidden layers.
        t_dim: width of the sinusoidal time embedding.
        zero_init: zero the last layer, so the network is identically 0 at initialisation.
        t_scale: highest angular frequency of the time embedding (per unit of ``t in [0, 1]``).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 128, layers: int = 3, t_dim: int = 32,
                 zero_init: bool = False, t_scale: float = 1000.0):
        super().__init__()
        if in_dim < 0 or min(out_dim, hidden, layers, t_dim) < 1:
            raise ValueError("TimeMLP sizes must be positive")
        self.t_dim, self.t_scale = t_dim, t_scale
        dims = [in_dim + t_dim] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(a, b), nn.SiLU()]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(dims[-1], out_dim)
        if zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``x [B, in_dim]``, ``t [B]`` -> ``[B, out_dim]``."""
        emb = timestep_embedding(t, self.t_dim, scale=self.t_scale).to(x.dtype)
        return self.head(self.body(torch.cat([x, emb], dim=-1)))


def divergence(c: Tensor, x: Tensor, exact_max: int = 16) -> Tensor:
    """``div_x c [B]`` of a field ``c [B, *shape]`` computed from ``x`` (``requires_grad``), with a graph: exact for
    ``dim <= exact_max`` (one autograd pass per coordinate), else Hutchinson's ``E[v^T (dc/dx) v]`` with one
    Rademacher ``v``. Zero for a field that does not depend on anything differentiable."""
    flat_c = c.flatten(1)
    n, d = flat_c.shape
    div = torch.zeros(n, dtype=c.dtype, device=c.device)
    if not c.requires_grad:
        return div

    def vjp(out: Tensor) -> Tensor:
        (g,) = torch.autograd.grad(out, x, create_graph=True, allow_unused=True)
        return torch.zeros_like(x) if g is None else g

    if d > exact_max:
        v = torch.randint(0, 2, c.shape, device=c.device).to(c.dtype) * 2 - 1
        return (vjp((c * v).sum()) * v).flatten(1).sum(1)
    for i in range(d):
        div = div + vjp(flat_c[:, i].sum()).flatten(1)[:, i]
    return div


@contextlib.contextmanager
def keep_requires_grad(module: nn.Module):
    """Restore every parameter's ``requires_grad`` flag on exit."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def set_adapters_enabled(host: nn.Module, enabled: bool) -> None:
    """Turn the adapters of a diffusers model on or off without touching ``requires_grad`` (peft's
    ``enable_adapters``/``disable_adapters`` also set the adapter weights' ``requires_grad``; here what is trained is
    decided once, by the guidance)."""
    with keep_requires_grad(host):
        host.enable_adapters() if enabled else host.disable_adapters()
