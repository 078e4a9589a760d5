"""Settings of the Tamiyo service: which policy serves, and how Decide keeps its deadline."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from esper.config import from_dict

POLICIES: tuple[str, ...] = ("heuristic", "random", "fixed", "gnn")


@dataclass(kw_only=True, frozen=True)
class TamiyoConfig:
    """`PlatformContext.settings["tamiyo"]`."""

    policy: str = "heuristic"
    """Serving policy: one of POLICIES."""
    heuristic: Mapping[str, Any] = field(default_factory=dict)
    """HeuristicConfig keys (also the fallback of the learned policy)."""
    random: Mapping[str, Any] = field(default_factory=dict)
    """RandomConfig keys."""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    """FixedConfig keys."""
    gnn: Mapping[str, Any] = field(default_factory=dict)
    """GNN policy keys (policy file path, uncertainty threshold)."""
    candidate_ttl_s: float = 30.0
    """How long Urza's kernel list for a site is reused before it is asked again."""
    max_candidates: int = 32
    """Kernels asked of Urza per site (its best recorded outcomes first)."""
    urza_timeout_s: float = 0.25
    """Longest a Decide waits on Urza, even when the caller's deadline is later."""
    urza_cooldown_s: float = 2.0
    """After Urza failed, serve cached kernels (or none) for this long before asking again."""
    decide_reserve_s: float = 0.005
    """Time kept back from the caller's deadline for the policy and the reply."""
    default_deadline_s: float = 1.0
    """Deadline assumed when the caller sets none."""
    idempotency_cache_size: int = 1024
    """Recent Decide responses remembered by request_id."""
    reload_check_s: float = 5.0
    """How often a file-backed policy (gnn) checks its files for a new version; 0: never."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r}; allowed: {list(POLICIES)}")
        for name in ("heuristic", "random", "fixed", "gnn"):
            if not isinstance(getattr(self, name), Mapping):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a mapping of settings")
        for name in ("candidate_ttl_s", "urza_timeout_s", "urza_cooldown_s", "decide_reserve_s", "reload_check_s"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v!r} must be a finite number of seconds >= 0")
        if not (isinstance(self.default_deadline_s, int | float) and self.default_deadline_s > 0):
            raise ValueError(f"default_deadline_s={self.default_deadline_s!r} must be > 0")
        if not 1 <= self.max_candidates <= 1000:
            raise ValueError(f"max_candidates={self.max_candidates} must be in [1, 1000] (Urza's page limit)")
        if self.idempotency_cache_size < 1:
            raise ValueError(f"idempotency_cache_size={self.idempotency_cache_size} must be >= 1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TamiyoConfig:
        return from_dict(cls, data, what="tamiyo key(s)", path="tamiyo")
