"""`GrowthConfig`: the growth budget and the few choices a grower makes on its own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from esper import config as _config


def _int(name: str, value: Any, lo: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        allowed = f"an integer >= {lo}" + (" or None" if optional else "")
        raise ValueError(f"GrowthConfig.{name}={value!r} must be {allowed}")


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

    probe_steps: int = 20
    """Cold-start probes (`esper.grow.probe`): at a boundary where the controller wants to
    germinate, each offered kernel is trained alone for this many steps on the probe batch
    (`Grower(probe_batch=)`, else part of the held-out batch) and its measured gain sent
    to the controller, which then decides again (the heuristic chooses by it). 0: no
    probes (the controller decides on what it knows)."""

    probe_lr: float = 0.003
    """Adam learning rate of a probe's steps (full-batch: a few hundred rows and a few
    steps overfit quickly at a training-sized rate)."""

    probe_fit_fraction: float = 0.5
    """Without a probe batch: the share of the held-out batch a probe fits on (it measures
    on the rest)."""

    probe_max_kernels: int = 32
    """Most kernels probed at one boundary (over all open slots, the controller's chosen
    slot first); kernels beyond it are not probed."""

    def __post_init__(self) -> None:
        _int("max_seeds", self.max_seeds, 0)
        _int("max_added_parameters", self.max_added_parameters, 0, optional=True)
        _int("total_epochs", self.total_epochs, 1, optional=True)
        _int("template_group", self.template_group, 0)
        _int("probe_steps", self.probe_steps, 0)
        _int("probe_max_kernels", self.probe_max_kernels, 1)
        if self.probe_max_kernels > 128:  # HealthSnapshot.probes' bound
            raise ValueError(f"GrowthConfig.probe_max_kernels={self.probe_max_kernels} must be "
                              "<= 128 (a snapshot carries at most 128 probes)")
        for name, lo, hi in (("probe_lr", 0.0, 10.0), ("probe_fit_fraction", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo < v < hi:
                raise ValueError(f"GrowthConfig.{name}={v!r} must be a number in ({lo:g}, {hi:g})")
        if not isinstance(self.task, str) or len(self.task) > 128:
            raise ValueError(f"GrowthConfig.task={self.task!r} must be a string of at most 128 characters")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GrowthConfig:
        """Build from a mapping (e.g. parsed YAML); unknown keys and bad values are a `ConfigError`."""
        return _config.from_dict(cls, data, what="GrowthConfig key(s)")

    def to_dict(self) -> dict[str, Any]:
        return _config.to_dict(self)
