"""Evaluators: metrics, samples and figures of a method (``conf/evaluation/``)."""
from iif.metrics.base import Evaluation, Evaluator

__all__ = ["Evaluation", "Evaluator"]
