"""Figures of the toy problem."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

LIM = 6.0


def density_panel(ax, log_prob, title: str, n: int = 200) -> None:
    """Image of ``exp(log_prob)`` on ``[-LIM, LIM]^2``."""
    g = torch.linspace(-LIM, LIM, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    dens = torch.exp(log_prob(torch.stack([xx.ravel(), yy.ravel()], -1))).reshape(n, n)
    ax.imshow(dens.numpy(), origin="lower", extent=(-LIM, LIM, -LIM, LIM), cmap="viridis")
    _style(ax, title)


def samples_panel(ax, x: torch.Tensor, title: str, n: int = 4000) -> None:
    x = x[:n].detach().cpu().double().numpy()
    ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.35, color="tab:blue", rasterized=True)
    _style(ax, title)


def _style(ax, title: str) -> None:
    ax.set_xlim(-LIM, LIM)
    ax.set_ylim(-LIM, LIM)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def toy_figure(panels: dict[str, torch.Tensor], target, prior_samples: torch.Tensor, max_cols: int = 6,
               density: bool = True):
    """Prior samples, exact tilted density (``density``: ``target.log_prob`` on the plane), then one panel of
    samples per entry of ``panels`` (the first two coordinates); rows of at most ``max_cols`` panels."""
    n = 1 + density + len(panels)
    cols = min(n, max_cols)
    rows = -(-n // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.axis("off")
    samples_panel(axes[0], prior_samples, "prior samples")
    if density:
        density_panel(axes[1], target.log_prob, "exact tilted target")
    for ax, (name, x) in zip(axes[1 + density:], panels.items()):
        samples_panel(ax, x, name)
    fig.tight_layout()
    return fig
