"""Gaussian paths ``x_t = alpha(t) x_0 + sigma(t) eps`` (owned by the base model: ``base_model.schedule``)."""
from iif.schedules.base import GaussianPath
from iif.schedules.brownian import BrownianBridge
from iif.schedules.discrete import DiscreteSchedule
from iif.schedules.rectified_flow import RectifiedFlow
from iif.schedules.vp import VPSchedule

__all__ = ["GaussianPath", "VPSchedule", "DiscreteSchedule", "RectifiedFlow", "BrownianBridge"]
