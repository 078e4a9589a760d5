"""`GrowthConfig`: the growth budget and the few choices a grower makes on its own."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from esper.config import reject_unknown_keys
from esper.errors import ConfigError


def _int(name: str, value: Any, lo: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        allowed = f"an integer >= {lo}" + (" or None" if optional else "")
        raise ConfigError(f"GrowthConfig.{name}={value!r} must be {allowed}")


@dataclass(kw_only=True, frozen=True)
class GrowthConfig:
    """How much a grower may grow, and what its health snapshots say about the run."""

    max_seeds: int = 2
    """Seeds that may be germinated over the whole run (pruned ones count)."""

    max_added_parameters: int | None = None
    """Parameters the seeds may add on top of the host (live and fossilized seeds count);
    None: no bound. A germination that would exceed it is rejected."""

    total_epochs: int | None = None
    """Epochs the run will have (policies read `HealthSnapshot.total_epochs`); when set,
    the boundary after the last epoch asks no controller (nothing could use the answer)."""

    task: str = ""
    """Name of the task, for policies that condition on it (`HealthSnapshot.task`)."""

    template_group: int = 0
    """Index of the host param group whose learning-rate schedule the seed groups follow
    (see `esper.grow.schedulers`)."""

    def __post_init__(self) -> None:
        _int("max_seeds", self.max_seeds, 0)
        _int("max_added_parameters", self.max_added_parameters, 0, optional=True)
        _int("total_epochs", self.total_epochs, 1, optional=True)
        _int("template_group", self.template_group, 0)
        if not isinstance(self.task, str) or len(self.task) > 128:
            raise ConfigError(f"GrowthConfig.task={self.task!r} must be a string of at most 128 characters")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GrowthConfig:
        """Build from a mapping (e.g. parsed YAML); unknown keys are a `ConfigError`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"GrowthConfig expects a mapping, got {type(data).__name__}")
        reject_unknown_keys(cls, data, "GrowthConfig key(s)")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
