from __future__ import annotations

import time
from pathlib import Path

import pytest

from esper.errors import ConfigError, FailedPreconditionError
from esper.oona.consumer import ConsumerConfig, MemorySeenStore, SqliteSeenStore
from esper.oona.envelope import make_envelope
from esper.oona.publisher import Publisher, PublisherConfig
from esper.runtime.breaker import BreakerConfig
from generated.esper.oona.v1 import events_pb2 as ev


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"max_queue": 0}, "max_queue"),
        ({"drop": "random"}, "drop"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"ack_timeout_s": 0}, "ack_timeout_s"),
        ({"reconnect_wait_s": -1}, "reconnect_wait_s"),
        ({"name": ""}, "name"),
    ],
)
def test_publisher_config_validation(kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        PublisherConfig(**kwargs)


def test_publisher_config_from_dict() -> None:
    cfg = PublisherConfig.from_dict({"max_queue": 5, "breaker": {"open_wait_s": 3.0}})
    assert cfg.max_queue == 5 and cfg.breaker == BreakerConfig(open_wait_s=3.0)
    with pytest.raises(ConfigError, match="max_queu"):
        PublisherConfig.from_dict({"max_queu": 5})


def test_publisher_rejects_unknown_setting_and_mixed_config() -> None:
    with pytest.raises(ConfigError, match="queue_size"):
        Publisher("nats://127.0.0.1:1", queue_size=3)
    with pytest.raises(ConfigError, match="not both"):
        Publisher("nats://127.0.0.1:1", config=PublisherConfig(), max_queue=3)


def test_drop_newest_refuses_the_new_envelope_and_closed_publisher_raises() -> None:
    # Port 1 refuses connections: the publisher only ever buffers.
    pub = Publisher("nats://127.0.0.1:1", max_queue=2, drop="newest", reconnect_wait_s=0.05)
    envs = [make_envelope(ev.GateEvent(gate=str(i)), run_id="r", source="t") for i in range(3)]
    try:
        assert pub.publish(envs[0]) and pub.publish(envs[1])
        assert not pub.publish(envs[2])
        stats = pub.stats()
        assert (stats.queued, stats.dropped, stats.published, stats.connected) == (2, 1, 0, False)
        assert not pub.flush(0.05)
    finally:
        final = pub.close(timeout=0.05)
    assert final.dropped == 3 and final.queued == 0
    with pytest.raises(FailedPreconditionError, match="closed"):
        pub.publish(envs[0])


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"durable": "a.b"}, "durable"),
        ({"subject_filter": ""}, "subject_filter"),
        ({"deliver": "last"}, "deliver"),
        ({"max_deliver": 0}, "max_deliver"),
        ({"nak_delay_s": -1}, "nak_delay_s"),
        ({"batch": 0}, "batch"),
    ],
)
def test_consumer_config_validation(kwargs: dict, word: str) -> None:
    base = {"durable": "d", "subject_filter": "esper.events.v1.>"}
    with pytest.raises(ValueError, match=word):
        ConsumerConfig(**{**base, **kwargs})
    with pytest.raises(ConfigError, match="ack"):
        ConsumerConfig.from_dict({**base, "ack": "none"})


def test_sqlite_seen_store_persists_and_prunes(tmp_path: Path) -> None:
    store = SqliteSeenStore(tmp_path / "s.db", max_entries=10)
    for i in range(25):
        store.add(f"e{i}")
    assert store.contains("e24") and not store.contains("e0")
    assert 10 <= len(store) <= 20
    store.close()
    again = SqliteSeenStore(tmp_path / "s.db", max_entries=10)
    assert again.contains("e24")
    again.add("new")
    assert again.contains("new")
    again.close()
    with pytest.raises(ConfigError, match="max_entries"):
        MemorySeenStore(0)


def test_unusable_url_keeps_the_publisher_alive_and_reports_it() -> None:
    degraded: list[tuple[str, str]] = []
    pub = Publisher(
        "nats://", reconnect_wait_s=0.05, on_degraded=lambda k, d: degraded.append((k, d))
    )
    try:
        env = make_envelope(ev.GateEvent(), run_id="r", source="t")
        assert pub.publish(env)
        deadline = time.monotonic() + 5
        while not degraded and time.monotonic() < deadline:
            time.sleep(0.02)
        assert degraded and degraded[0][0] == "unavailable" and "connect failed" in degraded[0][1]
        assert pub._thread.is_alive() and pub.stats().queued == 1
    finally:
        pub.close(timeout=0.05)
