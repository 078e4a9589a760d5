"""Settings of the baseline controllers used by the growth benchmark."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from esper.config import from_dict


def _probability(name: str, v: object) -> None:
    if not (isinstance(v, int | float) and 0.0 <= v <= 1.0):
        raise ValueError(f"{name}={v!r} must be a probability in [0, 1]")


@dataclass(kw_only=True, frozen=True)
class RandomConfig:
    """A controller that takes legal actions at random, under the same budget rules as the others."""

    seed: int = 0
    """Seed of the random stream; with run id and epoch it fixes every draw (retries repeat them)."""
    germinate_prob: float = 0.2
    """Chance per boundary of germinating (at one random open dormant slot)."""
    prune_prob: float = 0.1
    """Chance per boundary and live seed of pruning it."""
    fossilize_prob: float = 0.3
    """Chance per boundary and HOLDING seed of fossilizing it (drawn before pruning)."""
    warmup_epochs: int = 0
    """No germination before this epoch (match the heuristic's warm-up for a fair baseline)."""
    one_seed_in_flight: bool = True
    """No germination while another seed is GERMINATED, TRAINING or BLENDING."""

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer")
        _probability("germinate_prob", self.germinate_prob)
        _probability("prune_prob", self.prune_prob)
        _probability("fossilize_prob", self.fossilize_prob)
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be >= 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RandomConfig:
        return from_dict(cls, data, what="tamiyo.random key(s)", path="tamiyo.random")


@dataclass(kw_only=True, frozen=True)
class FixedConfig:
    """A controller that grows on a schedule fixed in advance, whatever the signals say."""

    germinate_epochs: tuple[int, ...] = (5, 10, 15)
    """Epochs at whose boundary one seed is germinated (budget permitting)."""
    fossilize_after_epochs: int = 2
    """Fossilize a seed once it has spent this many epochs in HOLDING."""
    slot_order: Literal["earliest", "deepest"] = "earliest"
    """Which open dormant slot is germinated next: nearest the input or nearest the output."""

    def __post_init__(self) -> None:
        if not isinstance(self.germinate_epochs, tuple) or not all(
            isinstance(e, int) and e >= 0 for e in self.germinate_epochs
        ):
            raise ValueError(f"germinate_epochs={self.germinate_epochs!r} must be non-negative integers")
        if len(set(self.germinate_epochs)) != len(self.germinate_epochs):
            raise ValueError(f"germinate_epochs={self.germinate_epochs!r} has repeated epochs")
        if self.fossilize_after_epochs < 0:
            raise ValueError(f"fossilize_after_epochs={self.fossilize_after_epochs} must be >= 0")
        if self.slot_order not in ("earliest", "deepest"):
            raise ValueError(f"slot_order={self.slot_order!r}; allowed: 'earliest', 'deepest'")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> FixedConfig:
        return from_dict(cls, data, what="tamiyo.fixed key(s)", path="tamiyo.fixed")
