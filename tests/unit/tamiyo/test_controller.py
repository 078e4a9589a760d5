"""TamiyoController directly: idempotency under concurrency and cancellation, withheld decisions."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from esper.errors import DeadlineExceededError, InvalidArgumentError
from esper.tamiyo.config import TamiyoConfig
from esper.tamiyo.controller import TamiyoController
from esper.tamiyo.heuristic import HeuristicPolicy
from esper.tamiyo.policy import Policy
from generated.esper.common.v1 import decision_pb2 as D
from tests.unit.tamiyo.snapshots import S, candidate, slot, snapshot

GOOD = candidate("good", 100)


class SlowSource:
    """Kernel source that answers after `delay_s` (stands in for a slow Urza); counts queries."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.queries = 0

    async def query(self, site, *, max_parameters, limit, timeout_s):
        self.queries += 1
        await asyncio.sleep(self.delay_s)
        return [GOOD]


class Illegal(Policy):
    """A policy with a bug: fossilizes a DORMANT slot."""

    name = "illegal"

    def decide(self, snapshot, candidates):
        return [D.Decision(kind=D.DECISION_KIND_FOSSILIZE, slot_id=snapshot.slots[0].slot_id, reason="bug")]


def controller(source=None, policy=None, **cfg) -> TamiyoController:
    return TamiyoController(policy or HeuristicPolicy(), source, TamiyoConfig.from_dict(cfg))


async def test_a_retry_after_the_first_attempt_was_cancelled_decides_itself() -> None:
    c = controller(SlowSource(0.2), urza_timeout_s=1.0)
    rid = str(uuid.uuid4())
    snap = snapshot([slot("s0")])
    first = asyncio.create_task(c.decide(snap, request_id=rid, time_remaining_s=2.0))
    await asyncio.sleep(0.05)
    retry = asyncio.create_task(c.decide(snap, request_id=rid, time_remaining_s=2.0))
    await asyncio.sleep(0.05)
    first.cancel()
    result = await retry
    assert [d.kind for d in result.decisions] == [D.DECISION_KIND_GERMINATE]
    with pytest.raises(asyncio.CancelledError):
        await first
    # The retry's answer is now the answer for that request_id.
    again = await c.decide(snap, request_id=rid, time_remaining_s=2.0)
    assert again is result


async def test_a_reused_request_id_for_another_snapshot_is_refused_even_while_in_flight() -> None:
    c = controller(SlowSource(0.2), urza_timeout_s=1.0)
    rid = str(uuid.uuid4())
    first = asyncio.create_task(c.decide(snapshot([slot("s0")]), request_id=rid, time_remaining_s=2.0))
    await asyncio.sleep(0.05)
    with pytest.raises(InvalidArgumentError, match=rid):
        await c.decide(snapshot([slot("s0")], epoch=9), request_id=rid, time_remaining_s=2.0)
    await first


async def test_illegal_decisions_are_withheld_and_the_reply_says_so() -> None:
    c = controller(policy=Illegal())
    result = await c.decide(snapshot([slot("s0")]), time_remaining_s=1.0)
    assert [d.kind for d in result.decisions] == [D.DECISION_KIND_WAIT]
    assert "withheld DECISION_KIND_FOSSILIZE s0" in result.decisions[0].reason
    assert "stage DORMANT" in result.decisions[0].reason


async def test_candidates_are_cached_per_site_and_reused_for_a_smaller_budget() -> None:
    src = SlowSource(0.0)
    c = controller(src, candidate_ttl_s=60)
    await c.decide(snapshot([slot("s0")], parameters_left=1000), time_remaining_s=1.0)
    await c.decide(snapshot([slot("s0")], parameters_left=500, epoch=7), time_remaining_s=1.0)
    assert src.queries == 1
    # A larger budget than the cached list was fetched under must ask again.
    await c.decide(snapshot([slot("s0")], parameters_left=5000, epoch=8), time_remaining_s=1.0)
    assert src.queries == 2
    # No seeds left or only live slots: no query at all.
    await c.decide(snapshot([slot("s0")], seeds_left=0, parameters_left=9000, epoch=9), time_remaining_s=1.0)
    await c.decide(snapshot([slot("s0", S.SEED_STAGE_HOLDING)], parameters_left=9000, epoch=10), time_remaining_s=1.0)
    assert src.queries == 2


async def test_too_little_time_is_deadline_exceeded() -> None:
    with pytest.raises(DeadlineExceededError, match="decide_reserve_s"):
        await controller().decide(snapshot([slot("s0")]), time_remaining_s=0.001)
