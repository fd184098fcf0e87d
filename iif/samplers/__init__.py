"""Samplers of the guided reverse process (config group ``sampler``)."""
from iif.samplers.base import Trajectory

__all__ = ["Trajectory"]
