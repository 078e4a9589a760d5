"""The governor: notices training going wrong and says what to roll back to.

A step is unhealthy at once when its loss is NaN/Inf. A finite loss is judged against a
slow baseline, the exponential moving average of the recent losses (span `window`): a
step whose loss exceeds `explosion_factor` × that baseline is *divergent*, and training
has diverged only when `patience` steps in a row are divergent (from the second step on:
`min_history` losses build the first baseline). One noisy minibatch — a batch of 16 holding the one example the
model gets wrong, 0.24 against a typical 0.02 — is never enough on its own, however large.

Why a mean and not a median: late in training the median loss of a small tabular job sinks
towards 0 while batches with a hard example stay at 0.2-0.5, so "10 × the median" is
crossed by ordinary batches (every seed of a static run was failed that way). The mean
includes those batches, and for any stationary loss the share of steps above 10 × its
mean is at most 1/10 (Markov's inequality), so `patience` of them in a row is rare noise
(≤ 10^-patience for independent batches) while weights that were actually damaged keep
every following step high. Divergent steps do not feed the baseline, so a divergence
cannot raise its own bar.

The governor keeps the last-known-good state in memory (model with seed state,
optimizer), taken at each epoch boundary that was healthy. The trainer owns what a
rollback does to the run (restore that state, prune the live seeds, reset optimizer
state, record an event); the governor only decides and remembers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from esper.errors import FailedPreconditionError


@dataclass(kw_only=True, frozen=True)
class GovernorConfig:
    """When training counts as diverged and how often the run may recover."""

    explosion_factor: float = 10.0
    """A loss above this × the baseline (the moving average of recent losses) is a
    divergent step (> 1)."""
    window: int = 50
    """Span, in steps, of the baseline's exponential moving average (>= 1): its weight is
    2 / (window + 1)."""
    min_history: int = 1
    """Healthy losses the baseline needs before the divergence test applies, at the start
    and after a rollback (>= 1); NaN/Inf always applies. Losses taken in before then are
    not judged, so a run that diverges from its first steps (a learning rate of 1e3 takes
    the loss from 0.7 to 1e12 in one step) is caught only if this stays small."""
    patience: int = 5
    """Divergent steps in a row that make a divergence (>= 1; 1 judges single steps)."""
    max_rollbacks: int = 3
    """Rollbacks a run may take; one more divergence fails the run (>= 0)."""

    def __post_init__(self) -> None:
        f = self.explosion_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 1:
            raise ValueError(f"GovernorConfig.explosion_factor={f!r} must be a finite number > 1")
        for name, lo in (("window", 1), ("min_history", 1), ("patience", 1), ("max_rollbacks", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"GovernorConfig.{name}={v!r} must be an integer >= {lo}")


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
        self.good: GoodState | None = None
        self.rollbacks = 0
        self._reset_judgement()

    def _reset_judgement(self) -> None:
        self.baseline = 0.0
        """Exponential moving average of the losses judged healthy (0 before the first)."""
        self.seen = 0
        """Healthy losses in the baseline since the start or the last rollback."""
        self.streak: list[float] = []
        """The current run of divergent losses (empty after a healthy step)."""

    def check(self, loss: float) -> str | None:
        """Why training with this step's loss has diverged, or None (the step is taken in)."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        cfg = self.config
        if self.seen >= cfg.min_history and loss > cfg.explosion_factor * self.baseline:
            self.streak.append(loss)
            if len(self.streak) < cfg.patience:
                return None
            losses = ", ".join(f"{v:.4g}" for v in self.streak[-cfg.patience:])
            return (
                f"loss above {cfg.explosion_factor:g} × its moving average {self.baseline:.4g} for "
                f"{cfg.patience} steps in a row ({losses})"
            )
        self.streak.clear()
        # The first losses seed the average as their plain mean; after that it is an EMA.
        weight = max(2.0 / (cfg.window + 1), 1.0 / (self.seen + 1))
        self.baseline += weight * (loss - self.baseline)
        self.seen += 1
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
        # The restored weights are an earlier epoch's, with that epoch's loss level: judge
        # the next steps afresh rather than against the average that led here.
        self._reset_judgement()
        return self.good

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON-able): rollbacks taken and the judgement so far.
        The good state is taken again after a resume, from the resumed run."""
        return {"rollbacks": self.rollbacks, "baseline": self.baseline, "seen": self.seen,
                "streak": list(self.streak)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rollbacks = int(state["rollbacks"])
        self.baseline = float(state.get("baseline", 0.0))
        self.seen = int(state.get("seen", 0))
        self.streak = [float(v) for v in state.get("streak", ())]
