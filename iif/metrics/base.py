"""What an evaluator is and what it returns.

An evaluator is built with the run's shared components (``base``, ``reward``: ``conf/evaluation/``), scores a
method's samples and draws its figures; the training loop only logs and saves what it returns, so it knows nothing
about the problem.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch


@dataclass
class Evaluation:
    """The result of one evaluation.

    Attributes:
        metrics: scalars, by name (``metrics.json``, the experiment log, ``iif-table``).
        samples: ``[n, ...]`` the method's samples they were computed on, on the CPU.
        figures: ``{name: matplotlib Figure}``, saved as ``<name>.png`` in the run directory and logged under
            ``name``; empty unless asked for.
    """

    metrics: dict[str, float]
    samples: torch.Tensor
    figures: dict = field(default_factory=dict)

    def close(self) -> None:
        """Free the figures (matplotlib keeps every open figure)."""
        if self.figures:
            import matplotlib.pyplot as plt

            for fig in self.figures.values():
                plt.close(fig)


class Evaluator(abc.ABC):
    """Scores a method. Sampling inside an evaluation leaves the caller's random state untouched.

    Built with the run's ``base``, ``reward`` and ``sampler`` (the base model's own sampler, for references drawn
    from it)."""

    def prepare(self) -> None:
        """Load or compute what the evaluator compares against (e.g. a cached Monte-Carlo reference); called once
        before the run, after the base model and the reward are ready."""

    @abc.abstractmethod
    def __call__(self, method, run_seed: int = 0, figures: bool = False, label: str = "samples") -> Evaluation:
        """Evaluate ``method`` with draws that depend on ``run_seed`` only; with ``figures``, also draw them
        (``label``: the name of the method's samples in them)."""
