"""A 3-node NATS cluster on loopback: R3 streams that no client resets, and a publisher
that rides out the loss of the node leading ESPER_EVENTS."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from esper.cli import main
from esper.oona.auth import CredentialsDir
from esper.oona.connection import connect_options
from esper.oona.consumer import drain
from esper.oona.envelope import make_envelope
from esper.oona.publisher import Publisher
from esper.oona.subjects import ensure_streams, with_replicas
from esper.oona.testing import NatsCluster
from generated.esper.oona.v1 import events_pb2 as ev

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster") as c:
        yield c


async def _stream(urls: str, name: str = "ESPER_EVENTS", creds=None):
    nc = await nats.connect(**connect_options(urls, creds))
    try:
        return await nc.jetstream().stream_info(name)
    finally:
        await nc.close()


def test_r3_streams_are_kept_by_every_client(cluster: NatsCluster, monkeypatch, capsys) -> None:
    # The operator's command (the esper-streams Job in deploy/k8s) creates them R3 ...
    assert main(["streams", "--url", cluster.urls, "--replicas", "3", "--timeout", "60"]) == 0
    assert "ESPER_EVENTS: created (replicas 3)" in capsys.readouterr().out
    assert asyncio.run(_stream(cluster.urls)).config.num_replicas == 3
    # ... and neither a publisher without the setting nor one told R1 undoes it.
    for env_replicas in (None, "1"):
        if env_replicas:
            monkeypatch.setenv("ESPER_NATS_STREAM_REPLICAS", env_replicas)
        with Publisher(cluster.urls) as pub:
            pub.publish(make_envelope(ev.GateEvent(gate="g"), run_id="r3", source="t"))
            assert pub.flush(20)
        info = asyncio.run(_stream(cluster.urls))
        assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2

    async def reconcile() -> tuple[dict, dict]:
        nc = await nats.connect(servers=cluster.urls.split(","))
        js = nc.jetstream(timeout=10)
        try:
            kept = await ensure_streams(js)  # update, but replicas None: keep R3
            scaled = await ensure_streams(js, with_replicas(1))  # an explicit count is applied
            return kept, scaled
        finally:
            await nc.close()

    kept, scaled = asyncio.run(reconcile())
    assert kept == {"ESPER_EVENTS": "unchanged", "ESPER_TELEMETRY": "unchanged"}
    assert scaled == {"ESPER_EVENTS": "updated", "ESPER_TELEMETRY": "updated"}
    assert asyncio.run(_stream(cluster.urls)).config.num_replicas == 1


@pytest.mark.slow
def test_losing_the_events_leader_is_a_degradation_and_loses_no_acked_event(tmp_path: Path) -> None:
    creds = CredentialsDir(tmp_path / "creds")
    with NatsCluster(tmp_path / "cluster", users=creds.ensure()) as c:
        admin = creds.credentials("admin")

        async def setup() -> str:
            nc = await nats.connect(**connect_options(c.urls, admin))
            js = nc.jetstream(timeout=5)
            try:
                for _ in range(60):
                    try:
                        await ensure_streams(js, with_replicas(3))
                        break
                    except (nats.errors.Error, TimeoutError):
                        await asyncio.sleep(0.5)
                return (await js.stream_info("ESPER_EVENTS")).cluster.leader
            finally:
                await nc.close()

        leader = asyncio.run(setup())
        degraded: list[tuple[float, str]] = []
        acked_at: list[float] = []
        stop = threading.Event()
        sent = 0
        with Publisher(c.urls, credentials=creds.credentials("tolaria"), reconnect_wait_s=0.1,
                       on_degraded=lambda k, d: degraded.append((time.monotonic(), k))) as pub:

            def produce() -> None:
                nonlocal sent
                while not stop.is_set():
                    pub.publish(make_envelope(ev.GateEvent(gate=str(sent)), run_id="lead",
                                              source="t", sequence=sent))
                    sent += 1
                    time.sleep(0.02)

            def watch_acks() -> None:
                last = 0
                while not stop.is_set():
                    n = pub.stats().published
                    if n > last:
                        acked_at.append(time.monotonic())
                        last = n
                    time.sleep(0.01)

            threads = [threading.Thread(target=produce), threading.Thread(target=watch_acks)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            killed_at = time.monotonic()
            c.by_name(leader).kill()
            time.sleep(15.0)
            stop.set()
            for t in threads:
                t.join()
            assert pub.flush(30), pub.stats()
            stats = pub.stats()
        resumed = min(t for t in acked_at if t > killed_at + 0.5)  # first ack of the new leader
        kinds = [k for t, k in degraded if t > killed_at]
        print(f"leader {leader} SIGKILLed: first ack after {resumed - killed_at:.2f}s; "
              f"degradations {kinds}")
        assert {"stalled", "unavailable", "breaker_open"} & set(kinds), kinds
        first_report = min(t for t, k in degraded if t > killed_at) - killed_at
        assert first_report < 6.0, f"first degradation only after {first_report:.1f}s"
        # nats-server's Raft waits 4-9 s for a lost leader before electing another.
        assert resumed - killed_at < 12.0, f"publishing resumed only after {resumed - killed_at:.1f}s"
        assert stats.dropped == 0 and stats.published >= sent
        # Read back with the dead node still down. Creating the consumer can time out while
        # the cluster places its group around the dead peer: ask again for a while.
        deadline = time.monotonic() + 60
        while True:
            try:
                got = drain(c.urls, "esper.events.v1.lead.>", "lead", timeout=2.0,
                            credentials=creds.credentials("reader"))
                break
            except nats.errors.TimeoutError:
                if time.monotonic() > deadline:
                    raise
        assert sorted(e.sequence for e in got) == list(range(sent))  # every event, stored once
