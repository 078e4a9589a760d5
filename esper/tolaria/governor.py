"""The governor: notices a training step going wrong and says what to roll back to.

A step is unhealthy when its loss is NaN/Inf, or larger than `explosion_factor` times
the median of the recent healthy losses (once `min_history` of them are known). The
governor keeps the last-known-good state in memory (model with seed state, optimizer),
taken at each epoch boundary that was healthy. The trainer owns what a rollback does to
the run (restore that state, prune the live seeds, reset optimizer state, record an
event); the governor only decides and remembers.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from esper.errors import ConfigError, FailedPreconditionError


@dataclass(kw_only=True, frozen=True)
class GovernorConfig:
    """When a loss counts as an explosion and how often the run may recover."""

    explosion_factor: float = 10.0
    """A loss above this × the running median of recent losses is an explosion (> 1)."""
    window: int = 50
    """Recent healthy step losses the median is taken over (>= 1)."""
    min_history: int = 10
    """Healthy losses needed before the explosion test applies (>= 1); NaN/Inf always applies."""
    max_rollbacks: int = 3
    """Rollbacks a run may take; one more unhealthy step fails the run (>= 0)."""

    def __post_init__(self) -> None:
        f = self.explosion_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 1:
            raise ConfigError(f"GovernorConfig.explosion_factor={f!r} must be a finite number > 1")
        for name, lo in (("window", 1), ("min_history", 1), ("max_rollbacks", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"GovernorConfig.{name}={v!r} must be an integer >= {lo}")


class RunDivergedError(FailedPreconditionError):
    """Training kept diverging after the governor's last allowed rollback."""

    reason = "RUN_DIVERGED"


@dataclass(kw_only=True, frozen=True)
class GoodState:
    """A snapshot to roll back to."""

    epoch: int
    """Epochs completed when it was taken."""
    model: Mapping[str, torch.Tensor]
    optimizer: Mapping[str, Any]


class Governor:
    """Watches step losses (`check`), remembers the last good state, counts rollbacks."""

    def __init__(self, config: GovernorConfig | None = None) -> None:
        self.config = config or GovernorConfig()
        self._recent: deque[float] = deque(maxlen=self.config.window)
        self.good: GoodState | None = None
        self.rollbacks = 0

    def check(self, loss: float) -> str | None:
        """Why the step with this loss is unhealthy, or None (and remember it) if it is fine."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if len(self._recent) >= self.config.min_history:
            median = statistics.median(self._recent)
            if median > 0 and loss > self.config.explosion_factor * median:
                return (
                    f"loss {loss:.4g} exceeds {self.config.explosion_factor:g} × the running "
                    f"median {median:.4g} of the last {len(self._recent)} steps"
                )
        self._recent.append(loss)
        return None

    def remember(self, epoch: int, model_state: Mapping[str, torch.Tensor],
                 optimizer_state: Mapping[str, Any]) -> None:
        """Take a last-known-good snapshot (deep copies: training goes on mutating the live ones)."""
        self.good = GoodState(
            epoch=epoch,
            model={k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                   for k, v in model_state.items()},
            optimizer=copy.deepcopy(dict(optimizer_state)),
        )

    def begin_rollback(self, why: str) -> GoodState:
        """Count a rollback and return the state to restore.

        Raises:
            RunDivergedError: `max_rollbacks` are used up, or nothing good was remembered.
        """
        if self.good is None:
            raise RunDivergedError(f"training diverged ({why}) before any known-good state")
        if self.rollbacks >= self.config.max_rollbacks:
            raise RunDivergedError(
                f"training diverged again ({why}) after {self.rollbacks} rollbacks "
                f"(max_rollbacks={self.config.max_rollbacks})"
            )
        self.rollbacks += 1
        # The losses that led here may already be drifting up; judge the next steps afresh.
        self._recent.clear()
        return self.good

    def state_dict(self) -> dict[str, Any]:
        """Rollbacks taken and the recent healthy losses (the good state is taken again
        after a resume, from the resumed run)."""
        return {"rollbacks": self.rollbacks, "recent": list(self._recent)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rollbacks = int(state["rollbacks"])
        self._recent.clear()
        self._recent.extend(float(v) for v in state["recent"])
