"""Run supervisor: worker subprocesses are watched, restarted after a crash, stopped on request."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from esper.errors import FailedPreconditionError, InvalidArgumentError
from esper.tolaria.runs import RunStore
from esper.tolaria.supervisor import RunSupervisor, SupervisorConfig
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

WORKER = "tests.unit.tolaria_service.scripted_worker"


def _cfg(epochs: int) -> pb.RunConfig:
    return pb.RunConfig(task="mnist1d", host="cnn", controller="heuristic", epochs=epochs, batch_size=8)


def _validate(cfg: pb.RunConfig) -> None:
    if cfg.task != "mnist1d":
        raise InvalidArgumentError(f"unknown task {cfg.task!r}", field="config.task")


def _sup(tmp_path, *, max_restarts: int = 2, epoch_seconds: float = 0.02) -> RunSupervisor:
    return RunSupervisor(
        RunStore(tmp_path),
        endpoints={},
        nats_url=None,
        api_key=None,
        validate=_validate,
        config=SupervisorConfig(worker_module=WORKER, max_restarts=max_restarts, poll_interval_s=0.02),
        worker_args=["--epoch-seconds", str(epoch_seconds)],
    )


async def _collect(sup: RunSupervisor, run_id: str, from_sequence: int = 0) -> list:
    return [e async for e in sup.watch(run_id, from_sequence)]


async def test_run_completes_and_watch_replays_in_order(tmp_path):
    sup = _sup(tmp_path)
    rec = await sup.start_run(_cfg(5), request_id=None, traceparent=None)
    events = await asyncio.wait_for(_collect(sup, rec.run_id), 30)
    kinds = [e.WhichOneof("payload") for e in events]
    assert kinds == ["run_state", "run_state"] + ["epoch_metrics"] * 5 + ["run_state"]
    assert [e.sequence for e in events] == list(range(1, 9))
    assert events[-1].run_state.state == "succeeded"
    await asyncio.sleep(0.1)
    done = sup.get_run(rec.run_id)
    assert done.state == pb.RUN_STATE_SUCCEEDED and done.epoch == 5 and done.last_sequence == 8
    # Replay from a later sequence gives exactly the tail.
    tail = await asyncio.wait_for(_collect(sup, rec.run_id, from_sequence=6), 5)
    assert [e.sequence for e in tail] == [6, 7, 8]
    await sup.close()


async def test_sigkilled_worker_is_restarted_and_resumes(tmp_path):
    sup = _sup(tmp_path, epoch_seconds=0.15)
    rec = await sup.start_run(_cfg(20), request_id=None, traceparent=None)
    first_pid = sup.worker_pid(rec.run_id)
    seen = []
    killed = False
    async for env in sup.watch(rec.run_id, 0):
        seen.append(env)
        # Once: the restarted worker may report epoch 2 again (it was in flight at the kill).
        if not killed and env.WhichOneof("payload") == "epoch_metrics" and env.epoch_metrics.epoch == 2:
            os.kill(first_pid, signal.SIGKILL)
            killed = True
    assert seen[-1].run_state.state == "succeeded"
    restarts = [e for e in seen if e.WhichOneof("payload") == "degradation"]
    assert len(restarts) == 1 and "SIGKILL" in restarts[0].degradation.detail
    epochs = [e.epoch_metrics.epoch for e in seen if e.WhichOneof("payload") == "epoch_metrics"]
    # Every epoch ran at least once; at most the one in flight at the kill is repeated.
    assert sorted(set(epochs)) == list(range(1, 21)) and len(epochs) - 20 <= 1
    await asyncio.sleep(0.1)
    done = sup.get_run(rec.run_id)
    assert done.restarts == 1 and done.state == pb.RUN_STATE_SUCCEEDED
    assert done.worker_pid != first_pid
    await sup.close()


async def test_gives_up_after_max_restarts(tmp_path):
    sup = _sup(tmp_path, max_restarts=0, epoch_seconds=0.2)
    rec = await sup.start_run(_cfg(20), request_id=None, traceparent=None)
    killed = False
    async for env in sup.watch(rec.run_id, 0):
        if not killed and env.WhichOneof("payload") == "epoch_metrics":
            os.kill(sup.worker_pid(rec.run_id), signal.SIGKILL)
            killed = True
        last = env
    assert last.run_state.state == "failed" and "gave up after 0 restarts" in last.run_state.detail
    assert sup.get_run(rec.run_id).state == pb.RUN_STATE_FAILED
    await sup.close()


async def test_stop_run_stops_at_a_boundary_and_cannot_repeat(tmp_path):
    sup = _sup(tmp_path, epoch_seconds=0.1)
    rec = await sup.start_run(_cfg(100), request_id=None, traceparent=None)
    async for env in sup.watch(rec.run_id, 0):
        if env.WhichOneof("payload") == "epoch_metrics" and env.epoch_metrics.epoch == 1:
            await sup.stop_run(rec.run_id, "enough")
        last = env
    assert last.run_state.state == "stopped"
    await asyncio.sleep(0.1)
    assert sup.get_run(rec.run_id).state == pb.RUN_STATE_STOPPED
    with pytest.raises(FailedPreconditionError, match="already ended"):
        await sup.stop_run(rec.run_id, "again")
    await sup.close()


async def test_invalid_config_creates_no_run_and_request_id_is_idempotent(tmp_path):
    sup = _sup(tmp_path)
    with pytest.raises(InvalidArgumentError) as e:
        await sup.start_run(pb.RunConfig(task="imagenet", epochs=1), request_id=None, traceparent=None)
    assert e.value.field == "config.task"
    assert sup.store.list(page_size=10)[0] == []
    rid = "0b0f7f64-5f3c-4a86-9f4d-1b9c6c9b2a10"
    a = await sup.start_run(_cfg(2), request_id=rid, traceparent=None)
    b = await sup.start_run(_cfg(2), request_id=rid, traceparent=None)
    assert a.run_id == b.run_id and len(sup.store.list(page_size=10)[0]) == 1
    await asyncio.wait_for(_collect(sup, a.run_id), 30)
    await sup.close()


async def test_a_restarted_service_adopts_live_workers_and_restarts_dead_ones(tmp_path):
    first = _sup(tmp_path, epoch_seconds=0.15)
    live = await first.start_run(_cfg(6), request_id=None, traceparent=None)
    dead = await first.start_run(_cfg(6), request_id=None, traceparent=None)
    await asyncio.sleep(0.4)
    # The service process dies: its monitors stop, its workers go on without it.
    for state in first._live.values():
        state.task.cancel()
    dead_pid = first.worker_pid(dead.run_id)
    os.kill(dead_pid, signal.SIGKILL)
    first._live[dead.run_id].proc.wait(10)  # gone before the new service looks
    second = _sup(tmp_path, epoch_seconds=0.15)
    await second.resume_active()
    seen = {}
    for run_id in (live.run_id, dead.run_id):
        seen[run_id] = await asyncio.wait_for(_collect(second, run_id), 60)
        assert seen[run_id][-1].run_state.state == "succeeded"
    told = [e.degradation.detail for e in seen[dead.run_id] if e.HasField("degradation")]
    assert len(told) == 1 and "the service restarted" in told[0]
    assert not any(e.HasField("degradation") for e in seen[live.run_id])
    await asyncio.sleep(0.2)
    assert second.get_run(live.run_id).restarts == 0
    restarted = second.get_run(dead.run_id)
    assert restarted.state == pb.RUN_STATE_SUCCEEDED and restarted.worker_pid != dead_pid
    assert restarted.restarts == 1
    assert restarted.epoch == 6
    await second.close()


def test_the_worker_pool_size_must_be_positive():
    with pytest.raises(ValueError, match="max_active_runs=0: must be >= 1"):
        SupervisorConfig(max_active_runs=0)
