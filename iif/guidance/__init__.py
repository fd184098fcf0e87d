"""h-transform parametrisations (config group ``guidance``)."""
from iif.guidance.base import Guidance

__all__ = ["Guidance"]
