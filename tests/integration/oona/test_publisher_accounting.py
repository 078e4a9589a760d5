"""The publisher's outage accounting, pinned (mutants of publisher.py that survived): what
`on_degraded` says when NATS goes away and comes back (which server, why, how many
envelopes were dropped *during that outage*), and that overflow drops the documented end
of the queue. A real nats-server on loopback."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest

from esper.oona.natsd import NatsServer
from esper.oona.publisher import Publisher
from generated.esper.oona.v1 import events_pb2

pytestmark = pytest.mark.integration


def _env(run: str, seq: int) -> events_pb2.EventEnvelope:
    env = events_pb2.EventEnvelope(event_id=f"{run}/{seq}", run_id=run, sequence=seq, source="test")
    env.lifecycle.slot_id = "s"
    return env


def _wait(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_each_outage_reports_its_server_and_only_its_own_drops(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="esper.oona")
    server = NatsServer(tmp_path / "nats", port=0)
    server.start()
    url = server.url
    events: list[tuple[str, str]] = []
    pub = Publisher(url, max_queue=3, reconnect_wait_s=0.1, on_degraded=lambda k, d: events.append((k, d)))
    try:
        pub.publish(_env("acct", 0))
        assert pub.flush(20)
        for outage, (n, lost) in enumerate([(5, 2), (4, 1)]):
            server.stop()
            _wait(lambda: not pub.stats().connected)
            assert pub.stats().last_error  # why it is down
            base = pub.stats().dropped
            for i in range(n):
                pub.publish(_env("acct", 100 * (outage + 1) + i))
            assert pub.stats().dropped - base == lost
            server.start()
            _wait(lambda want=outage + 1: sum(k == "recovered" for k, _ in events) == want)
            assert pub.flush(20)
        kinds = [k for k, _ in events]
        assert kinds.count("unavailable") == 2 and kinds.count("recovered") == 2, events
        down = [d for k, d in events if k == "unavailable"]
        assert all(d.startswith(f"NATS at {url} unavailable: ") and len(d) > len(f"NATS at {url} unavailable: ")
                   for d in down), down
        up = [d for k, d in events if k == "recovered"]
        # Each recovery counts the drops of its own outage, not the run's total.
        assert [d.rsplit("; ", 1)[1] for d in up] == ["2 dropped", "1 dropped"], up
        assert all(d.startswith(f"NATS at {url} reachable after ") for d in up), up
        outages = [float(re.search(r"reachable after ([0-9.]+)s", d).group(1)) for d in up]
        assert all(0 <= t < 60 for t in outages), outages  # (now + start would be ~1e5 s)
        logged = [r.getMessage() for r in caplog.records]
        assert any(f"NATS at {url} unavailable (" in m and "buffering up to 3 envelopes" in m for m in logged)
        assert any(f"NATS at {url} reachable again after" in m and "2 envelopes dropped meanwhile" in m
                   for m in logged)
        stats = pub.stats()
        assert stats.dropped == 3 and stats.connected and stats.last_error
    finally:
        pub.close(5)
        server.stop()


@pytest.mark.parametrize(("drop", "kept"), [("oldest", [3, 4, 5]), ("newest", [1, 2, 3])])
def test_overflow_drops_the_documented_end_of_the_queue(tmp_path: Path, drop: str, kept: list[int]) -> None:
    from esper.oona.consumer import drain

    server = NatsServer(tmp_path / "nats", port=0)
    server.start()
    url = server.url
    server.stop()
    events: list[tuple[str, str]] = []
    pub = Publisher(url, max_queue=3, drop=drop, reconnect_wait_s=0.1,
                    on_degraded=lambda k, d: events.append((k, d)))
    try:
        for i in range(1, 6):
            pub.publish(_env(f"ovf-{drop}", i))
        assert pub.stats().dropped == 2 and pub.stats().queued == 3
        _wait(lambda: any(k == "dropping" for k, _ in events), 5)
        dropping = [d for k, d in events if k == "dropping"]
        assert len(dropping) == 1, events  # reported once per overflow, not per drop
        assert re.fullmatch(rf"queue of 3 full; dropping {drop} envelopes, [12] dropped so far", dropping[0])
        with server:
            assert pub.flush(20)
            seen = drain(url, f"esper.events.v1.ovf-{drop}.>", f"ovf-{drop}", timeout=1.0)
            assert sorted(e.sequence for e in seen) == kept
    finally:
        pub.close(5)


def test_duplicates_and_rejections_accumulate_across_batches(tmp_path: Path) -> None:
    from esper.oona.envelope import make_envelope
    from esper.oona.subjects import DEFAULT_STREAMS, StreamSpec
    from generated.esper.oona.v1 import events_pb2 as ev

    server = NatsServer(tmp_path / "nats", port=0)
    small = tuple(StreamSpec.from_dict({**s.__dict__, "max_msg_bytes": 1024}) for s in DEFAULT_STREAMS)
    with server, Publisher(server.url, streams=small, max_in_flight=2) as pub:
        first = [_env("dups", i) for i in range(3)]
        for e in first:
            pub.publish(e)
        assert pub.flush(20)
        # The same three again, in two batches (max_in_flight=2): each one is a duplicate.
        for e in first:
            pub.publish(e)
        assert pub.flush(20)
        for i in range(2):  # two oversized envelopes, in separate batches
            pub.publish(make_envelope(ev.LifecycleEvent(reason="x" * 4096), run_id="dups", source="t",
                                      sequence=10 + i))
            assert pub.flush(20)
        stats = pub.stats()
    assert (stats.published, stats.duplicates, stats.rejected) == (6, 3, 2)
