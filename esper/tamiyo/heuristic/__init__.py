"""Heuristic policy: plateau-triggered germination, contribution-driven prune and fossilize."""

from esper.tamiyo.heuristic.config import HeuristicConfig
from esper.tamiyo.heuristic.policy import HeuristicPolicy

__all__ = ["HeuristicConfig", "HeuristicPolicy"]
