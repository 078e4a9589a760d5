"""A publisher whose background thread dies keeps the training thread safe: publishes are
counted as drops, never raised, and the owner hears about it through on_degraded."""

from __future__ import annotations

import time

from esper.oona.envelope import make_envelope
from esper.oona.publisher import Publisher
from generated.esper.oona.v1 import events_pb2 as ev


class _BrokenPublisher(Publisher):
    async def _run(self) -> None:
        raise RuntimeError("bug in the publishing loop")


def test_dead_publisher_thread_turns_publishes_into_counted_drops() -> None:
    seen: list[tuple[str, str]] = []
    pub = _BrokenPublisher("nats://127.0.0.1:1", on_degraded=lambda k, d: seen.append((k, d)))
    try:
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen and seen[0][0] == "failed" and "bug in the publishing loop" in seen[0][1]
        env = make_envelope(ev.RunStateChanged(state="running"), run_id="r1", source="test")
        assert pub.publish(env) is False
        assert pub.publish(env) is False
        stats = pub.stats()
        assert stats.dropped == 2 and stats.queued == 0
        assert "publisher thread died" in (stats.last_error or "")
    finally:
        pub.close()
