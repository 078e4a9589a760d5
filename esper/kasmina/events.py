"""What Kasmina reports to the caller's event sink, and the per-slot health record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from esper.kasmina.stages import SeedStage
from generated.esper.common.v1 import health_pb2, seed_pb2
from generated.esper.oona.v1 import events_pb2


@dataclass(frozen=True, kw_only=True)
class KasminaEvent:
    """One lifecycle transition or one gate evaluation of one slot.

    `kind == "transition"` fills `from_stage`/`to_stage`; `kind == "gate"` fills
    `gate`/`passed`. `reason` always says why, `measurements` holds the numbers a gate
    decided on.
    """

    kind: Literal["transition", "gate"]
    slot_id: str
    step: int
    """Optimizer steps seen by the model (`MorphogeneticModel.step` calls) when it happened."""
    epoch: int
    """Epoch boundaries seen by the model when it happened."""
    reason: str
    from_stage: SeedStage | None = None
    to_stage: SeedStage | None = None
    gate: str = ""
    passed: bool | None = None
    alpha: float = 0.0
    kernel_id: str = ""
    blueprint_id: str = ""
    measurements: dict[str, float] = field(default_factory=dict)

    def to_proto(self) -> events_pb2.LifecycleEvent | events_pb2.GateEvent:
        """The bus message for this event (`esper.oona.v1.LifecycleEvent` or `GateEvent`)."""
        if self.kind == "transition":
            return events_pb2.LifecycleEvent(
                slot_id=self.slot_id,
                from_stage=int(self.from_stage or 0),
                to_stage=int(self.to_stage or 0),
                blueprint_id=self.blueprint_id,
                kernel_id=self.kernel_id,
                reason=self.reason,
                alpha=self.alpha,
            )
        return events_pb2.GateEvent(
            slot_id=self.slot_id, gate=self.gate, passed=bool(self.passed), reason=self.reason
        )


@dataclass(frozen=True, kw_only=True)
class SlotHealthData:
    """Health of one slot; field names and meanings are those of `esper.common.v1.SlotHealth`.

    Gradient norms and activation statistics are means over the window they were
    gathered in (the current epoch, or the last closed epoch when nothing has been
    gathered since); 0.0 when nothing was gathered.
    """

    slot_id: str
    stage: SeedStage
    alpha: float
    site: seed_pb2.SiteSignature
    blueprint_id: str
    kernel_id: str
    host_grad_norm: float
    seed_grad_norm: float
    activation_mean: float
    activation_std: float
    contribution: float
    contribution_measured: bool
    steps_in_stage: int
    epochs_in_stage: int
    seed_parameters: int
    host_parameters: int
    embargo_epochs_left: int
    finite: bool
    depth: int

    @property
    def parallel(self) -> bool:
        """Whether the slot is a parallel one (`site.kind`; its seed reads `site.input`)."""
        return self.site.kind == seed_pb2.SLOT_KIND_PARALLEL

    def to_proto(self) -> health_pb2.SlotHealth:
        msg = health_pb2.SlotHealth(
            slot_id=self.slot_id,
            stage=int(self.stage),
            alpha=self.alpha,
            blueprint_id=self.blueprint_id,
            kernel_id=self.kernel_id,
            host_grad_norm=self.host_grad_norm,
            seed_grad_norm=self.seed_grad_norm,
            activation_mean=self.activation_mean,
            activation_std=self.activation_std,
            contribution=self.contribution,
            contribution_measured=self.contribution_measured,
            steps_in_stage=self.steps_in_stage,
            epochs_in_stage=self.epochs_in_stage,
            seed_parameters=self.seed_parameters,
            host_parameters=self.host_parameters,
            embargo_epochs_left=self.embargo_epochs_left,
            finite=self.finite,
            depth=self.depth,
        )
        msg.site.CopyFrom(self.site)
        return msg
