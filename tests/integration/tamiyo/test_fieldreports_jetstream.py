"""Field reports read back from a real nats-server with JetStream: Tolaria's envelopes published
on their subjects (run events and telemetry streams) become the same run report as in process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from esper.oona.envelope import encode, headers_for, subject_for
from esper.oona.natsd import NatsServer
from esper.oona.subjects import ensure_streams
from esper.oona.testing import nats_server
from esper.tamiyo.fieldreports import boundary_rewards, read_jetstream, reports_from_events
from tests.unit.tamiyo.test_fieldreports import K, run_events

pytestmark = pytest.mark.integration


@pytest.fixture
def natsd(tmp_path: Path) -> Iterator[NatsServer]:
    yield from nats_server(tmp_path)


async def publish(url: str, envelopes) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        for e in envelopes:
            await js.publish(subject_for(e), encode(e), headers=headers_for(e))
    finally:
        await nc.close()


async def test_jetstream_reader_rebuilds_run_reports_from_published_events(natsd: NatsServer) -> None:
    events = run_events("r1") + run_events("r2")
    # A retried publish carries the same Nats-Msg-Id and is stored once.
    await publish(natsd.url, events + events[:4])
    reports = read_jetstream(natsd.url, lambda site: [K], durable="t1", timeout_s=1.0, baselines={"r1": 0.75})
    assert [r.run_id for r in reports] == ["r1", "r2"]
    expected = reports_from_events(run_events("r1"), lambda site: [K], baselines={"r1": 0.75})[0]
    got = reports[0]
    assert [b.snapshot for b in got.boundaries] == [b.snapshot for b in expected.boundaries]
    assert [(o.slot_id, o.fate, o.contribution, o.rejected_by_gate) for o in got.seeds] == [
        ("s0", "fossilized", 0.02, False), ("s1", "rolled_back", 0.0, True)]
    assert [r for r, _ in boundary_rewards(got)] == pytest.approx([r for r, _ in boundary_rewards(expected)])
    assert reports[1].baseline_val_accuracy is None
    # The durable consumer remembers its place: nothing new, no reports.
    assert read_jetstream(natsd.url, lambda site: [K], durable="t1", timeout_s=0.5) == []
