"""Publisher → JetStream → durable consumer, against a real nats-server."""

from __future__ import annotations

import asyncio
import io
import re
import threading
import time
from pathlib import Path

import nats
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from esper.oona.consumer import Consumer, MemorySeenStore, SqliteSeenStore, adrain, drain
from esper.oona.envelope import encode, make_envelope, subject_for
from esper.oona.natsd import NatsServer
from esper.oona.publisher import Publisher
from esper.oona.subjects import DEFAULT_STREAMS, EVENTS_STREAM, StreamSpec, ensure_streams
from esper.oona.tap import atail
from generated.esper.oona.v1 import events_pb2 as ev

pytestmark = pytest.mark.integration


def lifecycle(run_id: str, seq: int, **kw) -> ev.EventEnvelope:
    return make_envelope(
        ev.LifecycleEvent(slot_id=f"slot{seq % 3}", reason=f"n{seq}"),
        run_id=run_id,
        source="test",
        sequence=seq,
        step=seq * 10,
        **kw,
    )


async def stream_messages(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(stream)).state.messages
    finally:
        await nc.close()


def test_round_trip(natsd: NatsServer) -> None:
    sent = [lifecycle("run1", i) for i in range(5)]
    sent.append(
        make_envelope(
            ev.EpochMetrics(epoch=1, val_accuracy=0.75, alphas={"s": 0.5}),
            run_id="run1",
            source="tolaria",
            epoch=1,
            sequence=5,
        )
    )
    with Publisher(natsd.url) as pub:
        for env in sent:
            assert pub.publish(env)
        assert pub.flush(10)
        stats = pub.stats()
    assert (stats.published, stats.dropped, stats.queued, stats.in_flight) == (6, 0, 0, 0)
    got = drain(natsd.url, "esper.events.v1.run1.>", "rt", timeout=1.0)
    assert got == sent
    assert got[-1].epoch_metrics.alphas["s"] == 0.5


def test_same_event_published_twice_is_stored_once(natsd: NatsServer) -> None:
    env = lifecycle("dup", 0)
    with Publisher(natsd.url, max_in_flight=1) as pub:
        pub.publish(env)
        pub.publish(env)
        assert pub.flush(10)
        stats = pub.stats()
    assert stats.published == 2 and stats.duplicates == 1
    assert asyncio.run(stream_messages(natsd.url, "ESPER_EVENTS")) == 1
    assert [e.event_id for e in drain(natsd.url, "esper.events.v1.dup.>", "d", timeout=1.0)] == [
        env.event_id
    ]


async def test_durable_consumer_resumes_where_it_left_off(natsd: NatsServer) -> None:
    sent = [lifecycle("dur", i) for i in range(7)]
    with Publisher(natsd.url) as pub:
        for env in sent[:5]:
            pub.publish(env)
        assert pub.flush(10)
        seen: list[str] = []
        async with Consumer(
            natsd.url, durable="resume", subject_filter="esper.events.v1.dur.>"
        ) as c:
            await c.consume(lambda e: seen.append(e.lifecycle.reason), max_events=3)
        assert seen == ["n0", "n1", "n2"]
        for env in sent[5:]:
            pub.publish(env)
        assert pub.flush(10)
    # A new process-like consumer (fresh seen-set) binds to the same durable.
    got = await adrain(natsd.url, "esper.events.v1.dur.>", "resume", timeout=1.0)
    assert [e.lifecycle.reason for e in got] == ["n3", "n4", "n5", "n6"]


def test_durable_survives_a_server_restart(natsd: NatsServer) -> None:
    with Publisher(natsd.url) as pub:
        for i in range(4):
            pub.publish(lifecycle("rs", i))
        assert pub.flush(10)
    assert len(drain(natsd.url, "esper.events.v1.rs.>", "rsd", timeout=0.5)) == 4
    natsd.stop()
    natsd.start()
    with Publisher(natsd.url) as pub:
        pub.publish(lifecycle("rs", 4))
        assert pub.flush(10)
    assert [e.sequence for e in drain(natsd.url, "esper.events.v1.rs.>", "rsd", timeout=0.5)] == [4]


def test_ordering_per_run(natsd: NatsServer) -> None:
    n = 300
    with Publisher(natsd.url, max_in_flight=64) as pub:
        for i in range(n):
            pub.publish(lifecycle("ordA", i))
            pub.publish(lifecycle("ordB", i))
        assert pub.flush(30)
    for run in ("ordA", "ordB"):
        got = drain(natsd.url, f"esper.events.v1.{run}.>", f"ord-{run}", timeout=1.0)
        assert [e.sequence for e in got] == list(range(n))
        assert {e.run_id for e in got} == {run}


def test_publish_never_blocks_while_nats_is_down(natsd: NatsServer) -> None:
    degraded: list[tuple[str, str]] = []
    pub = Publisher(
        natsd.url,
        max_queue=10_000,
        ack_timeout_s=10.0,
        on_degraded=lambda k, d: degraded.append((k, d)),
    )
    try:
        pub.publish(lifecycle("down", 0))
        assert pub.flush(10)
        natsd.stop()
        envs = [lifecycle("down", i) for i in range(1, 11_001)]
        t0 = time.perf_counter()
        for env in envs:
            pub.publish(env)
        elapsed = time.perf_counter() - t0
        # 11k publishes while the ack timeout is 10 s: any wait on the network would show.
        assert elapsed < 5.0, f"publish blocked: {elapsed:.2f}s for 11000 envelopes"
        stats = pub.stats()
        assert stats.queued == 10_000 and stats.dropped == 1_000 and not stats.connected
        deadline = time.monotonic() + 5
        while {"unavailable", "dropping"} - {
            k for k, _ in degraded
        } and time.monotonic() < deadline:
            time.sleep(0.05)
        kinds = [k for k, _ in degraded]
        assert kinds[:2] == ["unavailable", "dropping"]
        # Reported once, when overflow began (the count keeps growing after the report).
        reported = int(re.search(r"(\d+) dropped so far", degraded[1][1]).group(1))
        assert 1 <= reported <= 1_000 and kinds.count("dropping") == 1
    finally:
        pub.close(timeout=0.5)
    # What was still queued at close never reached NATS and is counted as dropped too.
    assert pub.stats().dropped == 11_000


def test_publishing_resumes_after_restart(natsd: NatsServer) -> None:
    degraded: list[str] = []
    with Publisher(
        natsd.url, reconnect_wait_s=0.1, on_degraded=lambda k, d: degraded.append(k)
    ) as pub:
        for i in range(10):
            pub.publish(lifecycle("back", i))
        assert pub.flush(10)
        natsd.stop()
        for i in range(10, 60):
            pub.publish(lifecycle("back", i))
        assert not pub.flush(0.3)
        natsd.start()  # same port, same store dir
        assert pub.flush(20)
        for i in range(60, 70):
            pub.publish(lifecycle("back", i))
        assert pub.flush(10)
        stats = pub.stats()
    assert stats.published == 70 and stats.dropped == 0 and stats.connected
    assert degraded[:2] == ["unavailable", "recovered"]
    got = drain(natsd.url, "esper.events.v1.back.>", "back", timeout=1.0)
    assert [e.sequence for e in got] == list(range(70))


def test_publisher_started_before_the_server(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "late", port=0)
    server.start()
    url = server.url
    server.stop()
    degraded: list[str] = []
    with Publisher(url, reconnect_wait_s=0.1, on_degraded=lambda k, d: degraded.append(k)) as pub:
        pub.publish(lifecycle("late", 0))
        assert not pub.flush(0.3) and not pub.stats().connected
        with server:
            assert pub.flush(20)
            assert pub.stats().published == 1
            assert degraded[:2] == ["unavailable", "recovered"]
            assert [
                e.sequence for e in drain(url, "esper.events.v1.late.>", "late", timeout=0.5)
            ] == [0]


def test_trace_context_round_trips_through_headers(natsd: NatsServer) -> None:
    tracer = TracerProvider().get_tracer("test")
    env = lifecycle("trace", 0)
    with Publisher(natsd.url) as pub, tracer.start_as_current_span("epoch-boundary") as span:
        pub.publish(env)
        assert pub.flush(10)
    sc = span.get_span_context()

    async def read() -> tuple[dict, int]:
        parents: list[int] = []
        async with Consumer(natsd.url, durable="tr", subject_filter="esper.events.v1.trace.>") as c:
            await c.consume(
                lambda e: parents.append(trace.get_current_span().get_span_context().trace_id),
                max_events=1,
            )
        nc = await nats.connect(natsd.url)
        try:
            msg = await nc.jetstream().get_last_msg("ESPER_EVENTS", subject_for(env))
        finally:
            await nc.close()
        return msg.headers, parents[0]

    headers, handler_trace_id = asyncio.run(read())
    assert headers["Nats-Msg-Id"] == env.event_id
    assert headers["traceparent"].split("-")[1:3] == [f"{sc.trace_id:032x}", f"{sc.span_id:016x}"]
    assert handler_trace_id == sc.trace_id  # the handler runs under the publisher's trace


async def test_failed_handler_is_redelivered_and_applied_once(natsd: NatsServer) -> None:
    envs = [lifecycle("redo", i) for i in range(3)]
    with Publisher(natsd.url) as pub:
        for env in envs:
            pub.publish(env)
        assert pub.flush(10)
    # The same event stored a second time under another Nats-Msg-Id (e.g. re-sent after the
    # duplicate window): only the consumer's seen-set can keep it from applying twice.
    nc = await nats.connect(natsd.url)
    await nc.jetstream().publish(
        subject_for(envs[1]), encode(envs[1]), headers={"Nats-Msg-Id": "other"}
    )
    await nc.close()

    attempts: dict[str, int] = {}
    applied: list[int] = []

    def handler(e: ev.EventEnvelope) -> None:
        attempts[e.event_id] = attempts.get(e.event_id, 0) + 1
        if e.sequence == 1 and attempts[e.event_id] == 1:
            raise RuntimeError("transient failure in the handler")
        applied.append(e.sequence)

    async with Consumer(
        natsd.url, durable="redo", subject_filter="esper.events.v1.redo.>", nak_delay_s=0.2
    ) as c:
        stats = await c.consume(handler, idle_timeout_s=1.5)
    assert sorted(applied) == [0, 1, 2]
    assert attempts[envs[1].event_id] == 2
    assert stats.handler_failures == 1 and stats.handled == 3
    assert stats.skipped_duplicates == 1 and stats.delivered == 5


async def test_poison_message_is_terminated(natsd: NatsServer) -> None:
    nc = await nats.connect(natsd.url)
    js = nc.jetstream()
    await ensure_streams(js)
    await js.publish("esper.events.v1.poison.lifecycle", b"\xff\xff\xff")
    await nc.close()
    async with Consumer(
        natsd.url, durable="poison", subject_filter="esper.events.v1.poison.>", nak_delay_s=0.1
    ) as c:
        stats = await c.consume(lambda e: None, idle_timeout_s=1.0)
    assert (stats.poison, stats.delivered, stats.handled) == (1, 1, 0)


async def test_sqlite_seen_set_survives_consumer_restart(natsd: NatsServer, tmp_path: Path) -> None:
    env = lifecycle("sq", 0)
    nc = await nats.connect(natsd.url)
    js = nc.jetstream()
    await ensure_streams(js)
    for msg_id in ("a", "b"):  # same event stored twice, as after a lost ack and a re-send
        await js.publish(subject_for(env), encode(env), headers={"Nats-Msg-Id": msg_id})
    await nc.close()
    applied: list[str] = []
    store = SqliteSeenStore(tmp_path / "seen.db")
    async with Consumer(
        natsd.url, durable="sq", subject_filter="esper.events.v1.sq.>", seen=store
    ) as c:
        await c.consume(lambda e: applied.append(e.event_id), max_events=1)
    store.close()
    store = SqliteSeenStore(tmp_path / "seen.db")
    async with Consumer(
        natsd.url, durable="sq", subject_filter="esper.events.v1.sq.>", seen=store
    ) as c:
        stats = await c.consume(lambda e: applied.append(e.event_id), idle_timeout_s=0.5)
    store.close()
    assert applied == [env.event_id] and stats.skipped_duplicates == 1


async def test_ensure_streams_is_idempotent_and_updates(natsd: NatsServer) -> None:
    nc = await nats.connect(natsd.url)
    js = nc.jetstream()
    try:
        assert await ensure_streams(js) == {"ESPER_EVENTS": "created", "ESPER_TELEMETRY": "created"}
        assert await ensure_streams(js) == {
            "ESPER_EVENTS": "unchanged",
            "ESPER_TELEMETRY": "unchanged",
        }
        shorter = StreamSpec.from_dict({**EVENTS_STREAM.__dict__, "max_age_s": 3600.0})
        assert await ensure_streams(js, (shorter,)) == {"ESPER_EVENTS": "updated"}
        info = await js.stream_info("ESPER_EVENTS")
        assert info.config.max_age == 3600.0 and info.config.storage == "file"
        assert info.config.duplicate_window == 120.0
        tel = await js.stream_info("ESPER_TELEMETRY")
        assert tel.config.max_msgs_per_subject == 100_000
    finally:
        await nc.close()


def test_rejected_envelope_is_counted_and_does_not_block_the_queue(natsd: NatsServer) -> None:
    small = tuple(
        StreamSpec.from_dict({**s.__dict__, "max_msg_bytes": 1024}) for s in DEFAULT_STREAMS
    )
    degraded: list[str] = []
    big = make_envelope(ev.LifecycleEvent(reason="x" * 4096), run_id="big", source="t", sequence=0)
    with Publisher(natsd.url, streams=small, on_degraded=lambda k, d: degraded.append(k)) as pub:
        pub.publish(big)
        pub.publish(lifecycle("big", 1))
        assert pub.flush(10)
        stats = pub.stats()
    assert (stats.rejected, stats.published) == (1, 1) and degraded == ["rejected"]
    assert [e.sequence for e in drain(natsd.url, "esper.events.v1.big.>", "big", timeout=0.5)] == [
        1
    ]


def test_publish_from_many_threads(natsd: NatsServer) -> None:
    with Publisher(natsd.url) as pub:

        def work(t: int) -> None:
            for i in range(100):
                pub.publish(lifecycle(f"th{t}", i))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert pub.flush(20)
        assert pub.stats().published == 400
    for t in range(4):
        got = drain(natsd.url, f"esper.events.v1.th{t}.>", f"th{t}", timeout=0.5)
        assert [e.sequence for e in got] == list(range(100))


async def test_tap_prints_a_runs_events(natsd: NatsServer) -> None:
    with Publisher(natsd.url) as pub:
        for i in range(3):
            pub.publish(lifecycle("tap", i))
        pub.publish(lifecycle("other", 9))
        assert pub.flush(10)
    out = io.StringIO()
    printed = await atail(natsd.url, "tap", out=out, idle_timeout_s=0.5)
    lines = out.getvalue().splitlines()
    assert printed == 3 and len(lines) == 3
    assert all("lifecycle" in line for line in lines) and 'reason: "n2"' in lines[2]


def test_memory_seen_store_bound() -> None:
    store = MemorySeenStore(max_entries=2)
    for i in range(3):
        store.add(str(i))
    assert (store.contains("0"), store.contains("1"), store.contains("2"), len(store)) == (
        False,
        True,
        True,
        2,
    )


def test_acked_events_survive_a_server_crash(natsd: NatsServer) -> None:
    with Publisher(natsd.url, reconnect_wait_s=0.1) as pub:
        for i in range(200):
            pub.publish(lifecycle("crash", i))
        assert pub.flush(20)
        natsd.kill()  # SIGKILL: no graceful JetStream shutdown
        natsd.start()
        pub.publish(lifecycle("crash", 200))
        assert pub.flush(20)
    got = drain(natsd.url, "esper.events.v1.crash.>", "crash", timeout=1.0)
    assert [e.sequence for e in got] == list(range(201))
