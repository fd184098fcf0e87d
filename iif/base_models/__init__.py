"""Frozen base models (config group ``base_model``)."""
from iif.base_models.base import BaseModel

__all__ = ["BaseModel"]
