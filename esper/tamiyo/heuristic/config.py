"""Settings of the heuristic policy."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from esper.config import from_dict


@dataclass(kw_only=True, frozen=True)
class HeuristicConfig:
    """When the heuristic grows, where, with what, and when it keeps or removes a seed.

    Contribution thresholds are in validation-loss units, the unit of
    `SlotHealth.contribution` (loss with the seed's alpha forced to 0 minus loss as is).
    """

    warmup_epochs: int = 3
    """No germination before this epoch: early loss curves say nothing about capacity."""
    plateau_window: int = 3
    """Epochs of validation loss compared against the best loss before them."""
    plateau_threshold: float = 0.01
    """Germinate when the window improved the best validation loss by less than this fraction."""
    tie_break: Literal["deepest", "earliest"] = "deepest"
    """Which slot wins when the gradient signal ties: nearest the output or nearest the input."""
    slot_kinds: Literal["parallel_first", "output_first", "gradient"] = "parallel_first"
    """Without probes, how slots of the two kinds are ranked against each other: all open
    parallel slots before output slots (a parallel seed can add width the host lacks), the
    reverse, or by the raw host gradient norm across kinds (the norms measure different
    things: a wrapped layer's parameter gradient vs. an activation's output gradient).
    Within a kind, by gradient norm. With probes, measured gains decide across kinds."""
    one_seed_in_flight: bool = True
    """No germination while another seed is GERMINATED, TRAINING or BLENDING."""
    prune_threshold: float = 1e-3
    """Prune a measured seed whose contribution is below minus this value."""
    fossilize_threshold: float = 1e-3
    """A HOLDING seed counts an epoch towards fossilization when its contribution is at least this."""
    fossilize_epochs: int = 2
    """Consecutive qualifying HOLDING epochs needed to fossilize."""
    holding_patience_epochs: int = 6
    """Prune a seed that sat this many epochs in HOLDING without earning fossilization."""
    prior_contribution: float = 0.0
    """Contribution assumed for a kernel with no field reports (shrinkage target)."""
    prior_strength: float = 2.0
    """Pseudo-count of the prior: field reports needed before a kernel's record outweighs it."""
    success_weight: float = 0.02
    """Score per unit of (Laplace-smoothed) fossilization rate above one half."""
    cost_weight: float = 0.01
    """Score lost per host-sized parameter count the kernel adds (parameter rent)."""
    probe_weight: float = 1.0
    """How much of a probe's measured gain (`HealthSnapshot.probes`) becomes the kernel's prior:
    `prior = probe_weight × gain` replaces `prior_contribution` for a probed kernel."""
    probe_tie_stderr: float = 1.0
    """Probed kernels whose score is within this many standard errors (from the probes'
    `gain_stderr`) of the best count as tied with it, and a tie goes to the kernel with the
    most parameters: a few probe steps cannot tell them apart and underrate kernels that
    learn more slowly, while capacity is what a plateaued host lacks. 0: the best score
    alone decides."""
    probe_min_gain: float | None = None
    """With probes, germinate only when the chosen kernel's measured gain is above this
    (None: no such gate; the probes only choose)."""

    def __post_init__(self) -> None:
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be >= 0")
        if self.plateau_window < 1:
            raise ValueError(f"plateau_window={self.plateau_window} must be >= 1")
        if self.tie_break not in ("deepest", "earliest"):
            raise ValueError(f"tie_break={self.tie_break!r}; allowed: 'deepest', 'earliest'")
        if self.slot_kinds not in ("parallel_first", "output_first", "gradient"):
            raise ValueError(f"slot_kinds={self.slot_kinds!r}; allowed: 'parallel_first', "
                             "'output_first', 'gradient'")
        for name in (
            "plateau_threshold",
            "prune_threshold",
            "fossilize_threshold",
            "prior_strength",
            "success_weight",
            "cost_weight",
            "probe_weight",
            "probe_tie_stderr",
        ):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v!r} must be a finite number >= 0")
        if not math.isfinite(self.prior_contribution):
            raise ValueError(f"prior_contribution={self.prior_contribution!r} must be finite")
        if self.probe_min_gain is not None and not (
                isinstance(self.probe_min_gain, int | float) and math.isfinite(self.probe_min_gain)):
            raise ValueError(f"probe_min_gain={self.probe_min_gain!r} must be a finite number or None")
        if not 1 <= self.fossilize_epochs <= 16:
            # The streak is read from the snapshot's slot history, which carries at most
            # the last 16 boundaries (esper.grow sends at most 16 per slot).
            raise ValueError(f"fossilize_epochs={self.fossilize_epochs} must be in 1..16 "
                             "(a snapshot carries at most 16 boundaries of a slot's history)")
        if self.holding_patience_epochs < self.fossilize_epochs:
            raise ValueError(
                f"holding_patience_epochs={self.holding_patience_epochs} must be >= "
                f"fossilize_epochs={self.fossilize_epochs}, or no seed could ever fossilize"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> HeuristicConfig:
        return from_dict(cls, data, what="tamiyo.heuristic key(s)", path="tamiyo.heuristic")
