"""What a prune says in its lifecycle events, pinned (mutants of slot.prune that survived):
the caller's reason or the default, and the embargo's length; a pruned slot's alpha is 0."""

from __future__ import annotations

import torch

from esper.kasmina import KasminaConfig, SeedStage, wrap
from tests.unit.kasmina.kasmina_hosts import ZeroOutSeed, mlp


def _pruned(reason: str, embargo: int):
    events: list = []
    mm = wrap(mlp(), sites=["3"], example_input=torch.randn(8, 8),
              config=KasminaConfig(embargo_epochs=embargo), event_sink=events.append)
    mm.germinate("3", ZeroOutSeed(mm.site_signature("3")), kernel_id="sha256:k", blueprint_id="bp-1", reason="t")
    del events[:]
    mm.prune("3", reason)
    return mm, [(e.to_stage, e.reason) for e in events if e.kind == "transition"]


def test_prune_events_carry_the_reason_and_the_embargo() -> None:
    mm, path = _pruned("not helping", 2)
    assert path == [(SeedStage.PRUNED, "not helping"), (SeedStage.EMBARGOED, "embargoed for 2 epoch(s) after prune")]
    assert mm.slots["3"].alpha == 0.0 and mm.slots["3"].alpha_ctl.value == 0.0


def test_a_prune_without_a_reason_says_it_was_requested() -> None:
    _mm, path = _pruned("", 0)
    assert path[0] == (SeedStage.PRUNED, "prune requested")
    assert path[1] == (SeedStage.EMBARGOED, "embargoed for 0 epoch(s) after prune")
    assert path[2][0] is SeedStage.RESETTING
