"""Rewards (config group ``reward``)."""
from iif.rewards.base import Reward, RewardError

__all__ = ["Reward", "RewardError"]
