"""Alpha controller: the blend weight of a seed and its schedule.

The controller's whole state lives in registered buffers so a checkpoint taken in the
middle of a ramp resumes it at the same point. Python mirrors of those buffers drive the
logic, so advancing the schedule never reads a device tensor (no host–device sync); the
buffers are refreshed whenever the state changes and before every `state_dict()`.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch
from torch import nn

from esper.errors import ConfigError


class AlphaCurve(IntEnum):
    """Shape of the ramp between the start and the target alpha."""

    LINEAR = 1
    COSINE = 2
    SIGMOID = 3


class AlphaDirection(IntEnum):
    """Where alpha is heading: up to its target, down to its target, or held."""

    UP = 1
    DOWN = 2
    HOLD = 3


class ScheduleUnit(IntEnum):
    """What one tick of a schedule counts: optimizer steps or epochs."""

    STEPS = 1
    EPOCHS = 2


# Steepness of the sigmoid ramp; 12 puts 99.75% of the change inside the ramp window
# while the normalisation below still pins the endpoints to exactly 0 and 1.
_SIGMOID_K = 12.0


def curve_value(curve: AlphaCurve, progress: float) -> float:
    """Fraction of the way from start to target at `progress` ∈ [0, 1]; exact at 0 and 1."""
    p = min(max(progress, 0.0), 1.0)
    if p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    if curve is AlphaCurve.LINEAR:
        return p
    if curve is AlphaCurve.COSINE:
        return 0.5 * (1.0 - math.cos(math.pi * p))
    lo = 1.0 / (1.0 + math.exp(_SIGMOID_K / 2))
    hi = 1.0 / (1.0 + math.exp(-_SIGMOID_K / 2))
    raw = 1.0 / (1.0 + math.exp(-_SIGMOID_K * (p - 0.5)))
    return (raw - lo) / (hi - lo)


def parse_enum(enum: type[IntEnum], value: str | int, what: str) -> IntEnum:
    """Look up an enum member by case-insensitive name or value; `ConfigError` otherwise."""
    if isinstance(value, str):
        try:
            return enum[value.upper()]
        except KeyError:
            pass
    elif isinstance(value, int):
        try:
            return enum(value)
        except ValueError:
            pass
    allowed = ", ".join(m.name.lower() for m in enum)
    raise ConfigError(f"{what}={value!r} is not one of: {allowed}")


_PLAIN_ATTRS = frozenset({"_value", "_start", "_target", "_elapsed", "_duration", "_curve",
                          "_direction", "_unit"})


class AlphaController(nn.Module):
    """Ramps alpha from a start value to a target over `duration` ticks of one unit.

    `alpha` (a 0-d float32 buffer) is what the blend reads on the device; everything else
    is bookkeeping kept as buffers for checkpoints, written when a `state_dict` is taken.
    """

    def __setattr__(self, name: str, value: object) -> None:
        # Skip nn.Module's parameter/buffer/module checks for plain per-step state.
        if name in _PLAIN_ATTRS:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("alpha", torch.zeros((), dtype=torch.float32))
        self.register_buffer("state_i", torch.zeros(5, dtype=torch.int64))
        self.register_buffer("state_f", torch.zeros(3, dtype=torch.float64))
        self._value = 0.0
        self._start = 0.0
        self._target = 0.0
        self._elapsed = 0
        self._duration = 0
        self._curve = AlphaCurve.LINEAR
        self._direction = AlphaDirection.HOLD
        self._unit = ScheduleUnit.STEPS

    @property
    def value(self) -> float:
        return self._value

    @property
    def direction(self) -> AlphaDirection:
        return self._direction

    @property
    def elapsed(self) -> int:
        return self._elapsed

    @property
    def duration(self) -> int:
        return self._duration

    @property
    def done(self) -> bool:
        """True once the value has reached the target (always for HOLD)."""
        return self._direction is AlphaDirection.HOLD or self._elapsed >= self._duration

    def start(
        self,
        *,
        target: float,
        duration: int,
        curve: AlphaCurve,
        unit: ScheduleUnit,
    ) -> None:
        """Begin a ramp from the current value to `target` over `duration` ticks."""
        if not 0.0 <= target <= 1.0:
            raise ConfigError(f"alpha target={target!r} must lie in [0, 1]")
        if duration < 1:
            raise ConfigError(f"alpha ramp duration={duration!r} must be >= 1 tick")
        self._start = self._value
        self._target = float(target)
        self._elapsed = 0
        self._duration = int(duration)
        self._curve = curve
        self._unit = unit
        if target > self._value:
            self._direction = AlphaDirection.UP
        elif target < self._value:
            self._direction = AlphaDirection.DOWN
        else:
            self._direction = AlphaDirection.HOLD
        self.alpha.fill_(self._value)

    def hold(self, value: float) -> None:
        """Pin alpha at `value` with no ramp."""
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"alpha={value!r} must lie in [0, 1]")
        self._value = self._start = self._target = float(value)
        self._elapsed = self._duration = 0
        self._direction = AlphaDirection.HOLD
        self.alpha.fill_(self._value)

    def tick(self, unit: ScheduleUnit) -> bool:
        """Advance one tick of `unit` if the ramp counts that unit; True if alpha changed."""
        if self.done or unit is not self._unit:
            return False
        self._elapsed += 1
        frac = curve_value(self._curve, self._elapsed / self._duration)
        # Pin the end exactly so HOLDING sees alpha == target, not target ± 1 ulp.
        self._value = (
            self._target
            if self._elapsed >= self._duration
            else self._start + (self._target - self._start) * frac
        )
        # One asynchronous device write per tick; the bookkeeping buffers are refreshed
        # lazily in `_save_to_state_dict`, the only place they are read.
        self.alpha.fill_(self._value)
        return True

    def _flush(self) -> None:
        # Only at state_dict time: build on the host, one copy to the buffers' device.
        vals_i = (self._elapsed, self._duration, int(self._curve), int(self._direction),
                  int(self._unit))
        self.state_i.copy_(torch.tensor(vals_i, dtype=torch.int64))
        self.state_f.copy_(torch.tensor((self._start, self._target, self._value),
                                        dtype=torch.float64))
        self.alpha.fill_(self._value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._flush()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "state_i" not in state_dict:
            return
        si = [int(v) for v in state_dict[prefix + "state_i"].tolist()]
        sf = [float(v) for v in state_dict[prefix + "state_f"].tolist()]
        self._elapsed, self._duration = si[0], si[1]
        self._curve = AlphaCurve(si[2]) if si[2] else AlphaCurve.LINEAR
        self._direction = AlphaDirection(si[3]) if si[3] else AlphaDirection.HOLD
        self._unit = ScheduleUnit(si[4]) if si[4] else ScheduleUnit.STEPS
        # The float64 copy, not the float32 `alpha`, so a resumed ramp is bit-identical.
        self._start, self._target, self._value = sf
