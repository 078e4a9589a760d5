"""Karn's settings (`ctx.settings["karn"]`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from esper.config import from_dict
from esper.karn.evolve import EvolveConfig


@dataclass(kw_only=True, frozen=True)
class KarnConfig:
    """Karn's settings (`ctx.settings["karn"]`)."""

    urza_timeout_s: float = 10.0
    """Deadline of each call to Urza (capped by what the caller's deadline has left)."""
    compile_timeout_s: float = 60.0
    """Deadline of each Tezzeret Compile (capped by what the caller's deadline has left)."""
    default_timeout_s: float = 300.0
    """Budget of a ProposeBlueprints call that arrives without a deadline."""
    evolve: EvolveConfig = field(default_factory=EvolveConfig)
    """Selection and operator settings (a mapping in YAML; see `EvolveConfig`)."""

    def __post_init__(self) -> None:
        for name in ("urza_timeout_s", "compile_timeout_s", "default_timeout_s"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 < v <= 3600):
                raise ValueError(f"karn {name}={v!r}: must be a number in (0, 3600]")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> KarnConfig:
        return from_dict(cls, data, what="karn settings")


__all__ = ["KarnConfig"]
