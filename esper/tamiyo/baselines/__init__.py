"""Baseline controllers: random legal actions and a fixed germination schedule."""

from esper.tamiyo.baselines.config import FixedConfig, RandomConfig
from esper.tamiyo.baselines.policy import FixedPolicy, RandomPolicy

__all__ = ["FixedConfig", "FixedPolicy", "RandomConfig", "RandomPolicy"]
