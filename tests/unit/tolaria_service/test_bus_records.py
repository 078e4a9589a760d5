"""The run's record carries how its events reached the bus, before its terminal state, and
the events the supervisor writes itself reach the bus too (issue 10 point 5), against a real
nats-server."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest

from esper.oona.consumer import drain
from esper.oona.subjects import run_events_filter
from esper.oona.testing import nats_server
from esper.tolaria.runs import RunStore
from esper.tolaria.supervisor import RunSupervisor, SupervisorConfig
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

WORKER = "tests.unit.tolaria_service.scripted_worker"


@pytest.fixture
def nats(tmp_path):
    yield from nats_server(tmp_path)


class EverySeen:
    """A consumer's seen-store that remembers nothing: every stored copy is counted."""

    def contains(self, event_id: str) -> bool:
        return False

    def add(self, event_id: str) -> None:
        return None

    def close(self) -> None:
        return None


def _sup(tmp_path, url: str, *worker_args: str) -> RunSupervisor:
    sup = RunSupervisor(
        RunStore(tmp_path / "tolaria"), endpoints={}, nats_url=url, api_key=None,
        validate=lambda cfg: None,
        config=SupervisorConfig(worker_module=WORKER, poll_interval_s=0.02, launcher="spawn"),
        worker_args=["--epoch-seconds", "0.05", *worker_args])
    sup.start()
    return sup


def _cfg(epochs: int) -> pb.RunConfig:
    return pb.RunConfig(task="mnist1d", host="cnn", controller="none", epochs=epochs, batch_size=8)


async def _collect(sup: RunSupervisor, run_id: str) -> list:
    return [e async for e in sup.watch(run_id, 0)]


async def test_the_delivery_record_comes_before_the_terminal_state(tmp_path, nats):
    sup = _sup(tmp_path, nats.url)
    rec = await sup.start_run(_cfg(3), request_id=None, traceparent=None)
    events = await asyncio.wait_for(_collect(sup, rec.run_id), 60)
    kinds = [e.WhichOneof("payload") for e in events]
    assert kinds[-2:] == ["delivery", "run_state"] and events[-1].run_state.state == "succeeded"
    d = events[-2].delivery
    # The worker's own events before it: running + 3 epochs, every one acknowledged.
    assert (d.published, d.lost, d.undelivered, d.dropped) == (4, 0, 0, 0)
    await asyncio.sleep(0.1)
    run = sup.get_run(rec.run_id).to_proto()
    assert run.state == pb.RUN_STATE_SUCCEEDED and run.event_delivery == d
    # The record showed the delivery no later than the terminal state: it was logged first.
    assert events[-2].sequence < events[-1].sequence
    on_bus = drain(nats.url, run_events_filter(rec.run_id), "t1", 1.0, seen=EverySeen())
    assert {e.event_id for e in events} <= {e.event_id for e in on_bus}
    await sup.close()


async def test_a_run_whose_bus_is_down_records_what_it_lost(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"nats://127.0.0.1:{s.getsockname()[1]}"
    sup = _sup(tmp_path, dead, "--oona-max-queue", "2", "--settle-s", "0.5")
    rec = await sup.start_run(_cfg(5), request_id=None, traceparent=None)
    events = await asyncio.wait_for(_collect(sup, rec.run_id), 60)
    assert events[-1].run_state.state == "succeeded"
    (d,) = [e.delivery for e in events if e.HasField("delivery")]
    assert d.published == 0 and d.undelivered == 2 and d.lost == d.dropped >= 4
    assert d.degradations >= 1
    await asyncio.sleep(0.1)
    run = sup.get_run(rec.run_id).to_proto()
    assert run.event_delivery.lost == d.lost and run.degradations["oona"] >= 1
    await sup.close()


async def test_events_the_supervisor_writes_itself_reach_the_bus_once_each(tmp_path, nats):
    sup = _sup(tmp_path, nats.url, "--epoch-seconds", "0.15")
    rec = await sup.start_run(_cfg(5), request_id=None, traceparent=None)
    killed = False
    events = []
    async for env in sup.watch(rec.run_id, 0):
        events.append(env)
        if not killed and env.HasField("epoch_metrics"):
            os.kill(sup.worker_pid(rec.run_id), signal.SIGKILL)
            killed = True
    assert events[-1].run_state.state == "succeeded"
    own = [e for e in events if e.HasField("degradation") or e.run_state.state == "pending"]
    assert [e.WhichOneof("payload") for e in own] == ["run_state", "degradation"]
    assert own[1].degradation.kind == "restarted" and "SIGKILL" in own[1].degradation.detail
    await asyncio.sleep(0.3)  # the supervisor's publisher acks within milliseconds
    on_bus = drain(nats.url, run_events_filter(rec.run_id), "t2", 1.0, seen=EverySeen())
    ids = [e.event_id for e in on_bus]
    for e in own:
        assert ids.count(e.event_id) == 1, e
    assert len(ids) == len(set(ids))  # Nats-Msg-Id dedup: a re-published event is stored once
    bus = {e.event_id: e for e in on_bus}
    assert bus[own[0].event_id].run_state.run_state == pb.RUN_STATE_PENDING
    await sup.close()
