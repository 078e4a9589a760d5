"""Seed lifecycle stages and the transitions allowed (docs/ARCHITECTURE.md, "Seed lifecycle").

`SeedStage` mirrors the proto enum `esper.common.v1.SeedStage` value for value, so a
stage crosses process boundaries as `int(stage)` with no lookup table.
"""

from __future__ import annotations

from enum import IntEnum

from esper.errors import IllegalTransitionError
from generated.esper.common.v1 import seed_pb2


class SeedStage(IntEnum):
    """Lifecycle stage of a seed slot; values equal `esper.common.v1.SeedStage`."""

    DORMANT = seed_pb2.SEED_STAGE_DORMANT
    GERMINATED = seed_pb2.SEED_STAGE_GERMINATED
    TRAINING = seed_pb2.SEED_STAGE_TRAINING
    BLENDING = seed_pb2.SEED_STAGE_BLENDING
    HOLDING = seed_pb2.SEED_STAGE_HOLDING
    FOSSILIZED = seed_pb2.SEED_STAGE_FOSSILIZED
    PRUNED = seed_pb2.SEED_STAGE_PRUNED
    EMBARGOED = seed_pb2.SEED_STAGE_EMBARGOED
    RESETTING = seed_pb2.SEED_STAGE_RESETTING


# Every edge of the lifecycle graph. FOSSILIZED is terminal: a fossilized seed is part of
# the model, removing it would be a new architecture decision, not a lifecycle step.
TRANSITIONS: dict[SeedStage, frozenset[SeedStage]] = {
    SeedStage.DORMANT: frozenset({SeedStage.GERMINATED}),
    SeedStage.GERMINATED: frozenset({SeedStage.TRAINING, SeedStage.PRUNED}),
    SeedStage.TRAINING: frozenset({SeedStage.BLENDING, SeedStage.PRUNED}),
    SeedStage.BLENDING: frozenset({SeedStage.HOLDING, SeedStage.PRUNED}),
    SeedStage.HOLDING: frozenset({SeedStage.FOSSILIZED, SeedStage.PRUNED}),
    SeedStage.FOSSILIZED: frozenset(),
    SeedStage.PRUNED: frozenset({SeedStage.EMBARGOED}),
    SeedStage.EMBARGOED: frozenset({SeedStage.RESETTING}),
    SeedStage.RESETTING: frozenset({SeedStage.DORMANT}),
}

#: Stages in which the slot holds a seed module.
LIVE_STAGES = frozenset(
    {
        SeedStage.GERMINATED,
        SeedStage.TRAINING,
        SeedStage.BLENDING,
        SeedStage.HOLDING,
        SeedStage.FOSSILIZED,
    }
)

#: Stages from which the controller may prune.
PRUNABLE_STAGES = frozenset(
    {SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.HOLDING}
)


GERMINATE = "germinate"
PRUNE = "prune"
FOSSILIZE = "fossilize"


def legal_actions(stage: int) -> frozenset[str]:
    """Strategic actions a controller may take on a slot in `stage` (a `SeedStage` or the
    proto enum's int): germinate a DORMANT slot, prune a live unfossilized seed, fossilize
    a HOLDING one. The one statement of the rule (Kasmina's slots, Tamiyo's policies)."""
    actions: set[str] = set()
    if stage == SeedStage.DORMANT:
        actions.add(GERMINATE)
    if stage in PRUNABLE_STAGES:
        actions.add(PRUNE)
    if stage == SeedStage.HOLDING:
        actions.add(FOSSILIZE)
    return frozenset(actions)


def check_transition(slot_id: str, src: SeedStage, dst: SeedStage) -> None:
    """Raise `IllegalTransitionError` unless `src → dst` is an edge of the lifecycle."""
    allowed = TRANSITIONS[src]
    if dst not in allowed:
        names = ", ".join(sorted(s.name for s in allowed)) or "none (terminal stage)"
        raise IllegalTransitionError(
            f"slot {slot_id!r}: illegal transition {src.name} → {dst.name}; "
            f"from {src.name} the lifecycle allows: {names}"
        )
