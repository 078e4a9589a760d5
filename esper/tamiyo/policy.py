"""The policy interface every Tamiyo controller implements, and the rules all of them obey.

A policy sees one `HealthSnapshot` and, per dormant slot, the kernels compiled for that
slot's site (`KernelCandidate`, from Urza's catalog with outcome records). It returns
decisions. What it may return is fixed here, not in each policy:

* legal actions per stage (docs/ARCHITECTURE.md, "Seed lifecycle"): DORMANT → germinate; GERMINATED, TRAINING,
  BLENDING, HOLDING → prune; HOLDING → fossilize; every other stage → nothing;
* germination needs a candidate offered for that slot, a seed left in the budget and a
  kernel no larger than the parameters left; at most one germination per boundary;
* embargoed slots (`embargo_epochs_left > 0`) are never germinated.

`check_decisions` enforces these for any policy, so the service can withhold whatever a
policy gets wrong instead of passing it to the trainer.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# The stage → legal actions rule is Kasmina's (one statement of it); policies use it from here.
from esper.kasmina.stages import FOSSILIZE, GERMINATE, PRUNE, legal_actions
from generated.esper.common.v1 import decision_pb2, health_pb2, kernel_pb2, seed_pb2

Stage = seed_pb2.SeedStage
Kind = decision_pb2.DecisionKind


IN_FLIGHT_STAGES = frozenset(
    {seed_pb2.SEED_STAGE_GERMINATED, seed_pb2.SEED_STAGE_TRAINING, seed_pb2.SEED_STAGE_BLENDING}
)
"""Stages of a seed that has not yet shown what it is worth (still learning or ramping)."""

_KIND_TO_ACTION = {
    decision_pb2.DECISION_KIND_GERMINATE: GERMINATE,
    decision_pb2.DECISION_KIND_PRUNE: PRUNE,
    decision_pb2.DECISION_KIND_FOSSILIZE: FOSSILIZE,
}


def stage_name(stage: int) -> str:
    return seed_pb2.SeedStage.Name(stage).removeprefix("SEED_STAGE_") if stage in Stage.values() else str(stage)


@dataclass(kw_only=True, frozen=True)
class KernelCandidate:
    """A kernel compiled for one slot's site, with what is known of how it did elsewhere."""

    kernel_id: str
    """"sha256:<hex>" id of the signed artifact in Urza."""
    blueprint_id: str
    """Content id of the blueprint the kernel was compiled from."""
    blueprint_name: str = ""
    """Human name of the blueprint (for reasons)."""
    family: str = ""
    """Blueprint family, e.g. "bottleneck_mlp"."""
    parameters: int
    """Trainable parameters the seed adds (Tezzeret's measured profile)."""
    forward_flops_per_sample: int = 0
    """Forward FLOPs per sample of the seed."""
    outcomes: int = 0
    """Field reports recorded for this kernel."""
    fossilized: int = 0
    """How many of those ended fossilized."""
    pruned: int = 0
    """How many of those ended pruned."""
    mean_contribution: float = 0.0
    """Mean counterfactual contribution over the field reports (positive: helped)."""

    @classmethod
    def from_record(cls, record: kernel_pb2.KernelRecord) -> KernelCandidate:
        m = record.manifest
        s = record.stats
        return cls(
            kernel_id=record.kernel_id,
            blueprint_id=m.blueprint_id or record.blueprint.blueprint_id,
            blueprint_name=m.blueprint_name or record.blueprint.name,
            family=m.family or record.blueprint.family,
            parameters=int(m.profile.parameters),
            forward_flops_per_sample=int(m.profile.forward_flops_per_sample),
            outcomes=int(s.outcomes),
            fossilized=int(s.fossilized),
            pruned=int(s.pruned),
            mean_contribution=float(s.mean_contribution) if math.isfinite(s.mean_contribution) else 0.0,
        )

    @property
    def label(self) -> str:
        name = self.blueprint_name or self.blueprint_id
        return f"{name} ({self.parameters} params, {self.outcomes} outcomes)"


Candidates = Mapping[str, Sequence[KernelCandidate]]
"""slot_id → kernels compiled for that slot's site, best recorded outcomes first."""


class Policy(abc.ABC):
    """From a health snapshot and the kernels on offer to growth decisions."""

    name: str = ""
    """Registry name ("heuristic", "random", "fixed", "gnn")."""

    uses_probes: bool = False
    """Whether the policy reads `HealthSnapshot.probes` (a client runs probes only for those)."""

    @property
    def version(self) -> str:
        return "1"

    @abc.abstractmethod
    def decide(
        self, snapshot: health_pb2.HealthSnapshot, candidates: Candidates
    ) -> list[decision_pb2.Decision]:
        """Decisions for this boundary; a single global WAIT (with a reason) when none apply."""

    def settings(self) -> dict[str, str]:
        """Policy settings in words, for GetPolicyInfo."""
        return {}


def slot_finite(slot: health_pb2.SlotHealth) -> bool:
    """Whether a slot's reported numbers are all finite (and Tolaria says its seed is)."""
    values = (
        slot.alpha,
        slot.host_grad_norm,
        slot.seed_grad_norm,
        slot.activation_mean,
        slot.activation_std,
        slot.contribution,
    )
    return slot.finite and all(math.isfinite(v) for v in values)


def wait(reason: str, *, policy: str, slot_id: str = "", confidence: float = 1.0) -> decision_pb2.Decision:
    return decision_pb2.Decision(
        kind=decision_pb2.DECISION_KIND_WAIT,
        slot_id=slot_id,
        reason=reason,
        policy=policy,
        confidence=confidence,
    )


def withheld_note(w: Withheld) -> str:
    """How a withheld decision is told in the reply ("withheld GERMINATE s1: why")."""
    return f"withheld {decision_pb2.DecisionKind.Name(w.decision.kind)} {w.decision.slot_id}: {w.why}"


def finish_decisions(decisions: list[decision_pb2.Decision], notes: Sequence[str], *,
                     policy: str) -> list[decision_pb2.Decision]:
    """The decisions a controller answers with (in place; returned): unless something
    germinates, `notes` (withheld decisions, kernels not offered) join the global WAIT's
    reason, or a WAIT of their own; no decision at all becomes one WAIT; every decision
    names `policy`. In process (`esper.grow`) and in the service alike."""
    germinated = any(d.kind == decision_pb2.DECISION_KIND_GERMINATE for d in decisions)
    if notes and not germinated:
        note = "; ".join(notes)
        global_wait = next((d for d in decisions
                            if d.kind == decision_pb2.DECISION_KIND_WAIT and not d.slot_id), None)
        if global_wait is not None:
            global_wait.reason = f"{global_wait.reason}; {note}" if global_wait.reason else note
        else:
            decisions.append(wait(note, policy=policy))
    elif not decisions:
        decisions.append(wait("no decision proposed", policy=policy))
    for d in decisions:
        if not d.policy:
            d.policy = policy
    return decisions


def seeds_in_flight(snapshot: health_pb2.HealthSnapshot) -> list[str]:
    return [s.slot_id for s in snapshot.slots if s.stage in IN_FLIGHT_STAGES]


def affordable(
    snapshot: health_pb2.HealthSnapshot, candidates: Sequence[KernelCandidate]
) -> list[KernelCandidate]:
    """Candidates that fit the parameters left in the growth budget."""
    return [c for c in candidates if c.parameters <= snapshot.parameters_left]


@dataclass(kw_only=True, frozen=True)
class Withheld:
    """A decision the rules refused, and why."""

    decision: decision_pb2.Decision
    why: str


def check_decisions(
    snapshot: health_pb2.HealthSnapshot,
    decisions: Sequence[decision_pb2.Decision],
    candidates: Candidates,
) -> tuple[list[decision_pb2.Decision], list[Withheld]]:
    """Split `decisions` into those the rules allow and those they refuse.

    Checks, in order: a known slot for every non-global decision, the stage's legal
    actions, at most one strategic decision per slot, embargo, budget (seeds and
    parameters) and that a germinated kernel was offered for that slot; at most one
    germination per boundary.
    """
    slots = {s.slot_id: s for s in snapshot.slots}
    allowed: list[decision_pb2.Decision] = []
    withheld: list[Withheld] = []
    acted: set[str] = set()
    germinations = 0
    for d in decisions:
        if d.kind == decision_pb2.DECISION_KIND_WAIT:
            allowed.append(d)
            continue
        action = _KIND_TO_ACTION.get(d.kind)
        if action is None:
            withheld.append(Withheld(decision=d, why=f"decision kind {d.kind} is not an action"))
            continue
        slot = slots.get(d.slot_id)
        if slot is None:
            withheld.append(Withheld(decision=d, why=f"slot {d.slot_id!r} is not in the snapshot"))
            continue
        if action not in legal_actions(slot.stage):
            withheld.append(
                Withheld(
                    decision=d,
                    why=f"{action} is not legal for slot {d.slot_id!r} in stage "
                    f"{stage_name(slot.stage)} (legal: {sorted(legal_actions(slot.stage)) or 'none'})",
                )
            )
            continue
        if d.slot_id in acted:
            withheld.append(Withheld(decision=d, why=f"a second action for slot {d.slot_id!r} in one boundary"))
            continue
        if action == GERMINATE:
            why = _germination_refusal(snapshot, slot, d, candidates, germinations)
            if why:
                withheld.append(Withheld(decision=d, why=why))
                continue
            germinations += 1
        acted.add(d.slot_id)
        allowed.append(d)
    return allowed, withheld


def _germination_refusal(
    snapshot: health_pb2.HealthSnapshot,
    slot: health_pb2.SlotHealth,
    d: decision_pb2.Decision,
    candidates: Candidates,
    germinations: int,
) -> str:
    if germinations >= 1:
        return "at most one germination per boundary"
    if slot.embargo_epochs_left > 0:
        return f"slot {slot.slot_id!r} is embargoed for {slot.embargo_epochs_left} more epochs"
    if snapshot.seeds_left <= 0:
        return "no seeds left in the growth budget"
    offered = {c.kernel_id: c for c in candidates.get(slot.slot_id, ())}
    kernel = offered.get(d.kernel_id)
    if kernel is None:
        return f"kernel {d.kernel_id!r} was not offered for slot {slot.slot_id!r}"
    if kernel.blueprint_id != d.blueprint_id:
        return f"kernel {d.kernel_id!r} is of blueprint {kernel.blueprint_id!r}, not {d.blueprint_id!r}"
    if kernel.parameters > snapshot.parameters_left:
        return (
            f"kernel {d.kernel_id!r} adds {kernel.parameters} parameters, "
            f"more than the {snapshot.parameters_left} left"
        )
    return ""
