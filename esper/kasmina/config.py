"""Kasmina configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from esper.config import from_dict, to_dict

_LAYOUTS = ("nc", "ncl", "nchw", "nld")
_UNITS = ("steps", "epochs")
_CURVES = ("linear", "cosine", "sigmoid")
_BACKENDS = ("auto", "torch", "cupy")


@dataclass(kw_only=True, frozen=True)
class KasminaConfig:
    """How seed slots schedule, gate and blend their seeds."""

    schedule_unit: str = "steps"
    """Unit of `incubation`, `gate_interval` and `blend_duration`: "steps" or "epochs"."""

    incubation: int = 50
    """Minimum time in TRAINING before the blending gate is first evaluated (>= 1)."""

    gate_interval: int = 10
    """After a failed blending gate, time until it is evaluated again (>= 1)."""

    blend_curve: str = "linear"
    """Shape of the alpha ramp in BLENDING: "linear", "cosine" or "sigmoid"."""

    blend_duration: int = 100
    """Length of the alpha ramp 0 → 1 in BLENDING (>= 1)."""

    embargo_epochs: int = 2
    """Epochs a pruned slot waits before it may germinate again (>= 0)."""

    isolate_blending_input: bool = True
    """Detach the seed's input from the host in BLENDING too (always detached in TRAINING).

    From HOLDING on, gradients flow through the seed into the host."""

    stats_interval: int = 8
    """Gather activation statistics and gradient norms on every n-th step (>= 1).

    Dormant slots carry no forward hook between sampled steps, so a dormant slot costs
    nothing on n-1 of every n steps; health and gates read means over the sampled steps
    (1 samples every step, at ~0.1 ms per slot per step for a 256x512 activation on CPU)."""

    gate_require_finite: bool = True
    """Blending and fossilize gates fail if any activation, seed output or gradient seen
    since the stage began was NaN or infinite."""

    gate_min_seed_grad_norm: float = 1e-8
    """Blending gate: mean seed gradient norm in TRAINING must be at least this (>= 0)."""

    gate_max_seed_grad_norm: float = 1e4
    """Blending gate: mean seed gradient norm in TRAINING must be at most this."""

    fossilize_min_contribution: float | None = None
    """Fossilize gate: counterfactual contribution (loss without − loss with the seed)
    must be measured and at least this; None disables the contribution check."""

    verify_function_preserving: bool = True
    """At germination, run the seed on activations recorded from `example_input` and
    refuse it unless its output is within `function_preserving_tol` of zero."""

    function_preserving_tol: float = 1e-6
    """Largest |seed output| a germinating seed may produce on the probe (>= 0)."""

    probe_rows: int = 2
    """Batch rows of each site's example activation kept for the germination probe (>= 1).

    The probe runs the seed once per germination; two rows catch a non-zero output while
    keeping germination well under a millisecond for convolutional sites."""

    seed_lr: float | None = None
    """Learning rate of the seeds' optimizer param groups; None uses the optimizer's."""

    seed_weight_decay: float | None = None
    """Weight decay of the seeds' param groups; None uses the optimizer's."""

    blend_backend: str = "auto"
    """"auto" (CuPy kernel for CUDA tensors when CuPy has a device, else torch),
    "torch", or "cupy" (fails on tensors it cannot handle)."""

    distributed_sync: bool = True
    """Under torch.distributed, average gate measurements over ranks before deciding,
    so every rank takes the same mechanical transition at the same step."""

    layouts: Mapping[str, str] = field(default_factory=dict)
    """Activation layout per slot id ("nc", "ncl", "nchw", "nld"), overriding the guess
    made from the output rank and the site's module type. For a parallel slot one layout
    applies to its input and output alike; "input->output" (e.g. "ncl->nc") sets both."""

    def __post_init__(self) -> None:
        def one_of(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"KasminaConfig.{name}={value!r} is not one of: {', '.join(allowed)}"
                )

        def at_least(name: str, lo: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"KasminaConfig.{name}={value!r} must be an integer >= {lo}")

        def finite_nonneg(name: str, value: float | None, optional: bool = False) -> None:
            if value is None and optional:
                return
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"KasminaConfig.{name}={value!r} must be a finite number >= 0")

        one_of("schedule_unit", _UNITS)
        one_of("blend_curve", _CURVES)
        one_of("blend_backend", _BACKENDS)
        for name in ("incubation", "gate_interval", "blend_duration", "stats_interval",
                     "probe_rows"):
            at_least(name, 1)
        at_least("embargo_epochs", 0)
        finite_nonneg("gate_min_seed_grad_norm", self.gate_min_seed_grad_norm)
        finite_nonneg("gate_max_seed_grad_norm", self.gate_max_seed_grad_norm)
        if self.gate_max_seed_grad_norm < self.gate_min_seed_grad_norm:
            raise ValueError(
                f"KasminaConfig.gate_max_seed_grad_norm={self.gate_max_seed_grad_norm!r} "
                f"must be >= gate_min_seed_grad_norm={self.gate_min_seed_grad_norm!r}"
            )
        finite_nonneg("function_preserving_tol", self.function_preserving_tol)
        finite_nonneg("seed_lr", self.seed_lr, optional=True)
        finite_nonneg("seed_weight_decay", self.seed_weight_decay, optional=True)
        fmc = self.fossilize_min_contribution
        if fmc is not None and (
            not isinstance(fmc, (int, float)) or isinstance(fmc, bool) or not math.isfinite(fmc)
        ):
            raise ValueError(
                f"KasminaConfig.fossilize_min_contribution={fmc!r} must be a finite number or None"
            )
        if not isinstance(self.layouts, Mapping):
            raise TypeError(
                f"KasminaConfig.layouts={self.layouts!r} must map slot ids to one of: "
                f"{', '.join(_LAYOUTS)}"
            )
        for slot_id, layout in self.layouts.items():
            parts = layout.lower().split("->") if isinstance(layout, str) else [None]
            if len(parts) > 2 or any(p not in _LAYOUTS for p in parts):
                raise ValueError(
                    f"KasminaConfig.layouts[{slot_id!r}]={layout!r} is not one of: "
                    f"{', '.join(_LAYOUTS)} (or 'input->output', e.g. 'ncl->nc', for a "
                    "parallel slot)"
                )
        # Frozen: keep callers from mutating the mapping after validation.
        object.__setattr__(self, "layouts", {k: v.lower() for k, v in self.layouts.items()})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> KasminaConfig:
        """Build from a plain mapping (e.g. parsed YAML); bad keys and values are a
        `ConfigError` naming them."""
        return from_dict(cls, data, what="KasminaConfig key(s)")

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping that `from_dict` accepts."""
        return to_dict(self)
