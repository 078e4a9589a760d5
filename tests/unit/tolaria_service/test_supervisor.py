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


def _sup(tmp_path, *, max_restarts: int = 2, epoch_seconds: float = 0.02,
         launcher: str = "spawn") -> RunSupervisor:
    sup = RunSupervisor(
        RunStore(tmp_path),
        endpoints={},
        nats_url=None,
        api_key=None,
        validate=_validate,
        config=SupervisorConfig(worker_module=WORKER, max_restarts=max_restarts, poll_interval_s=0.02,
                                launcher=launcher),
        worker_args=["--epoch-seconds", str(epoch_seconds)],
    )
    if launcher == "fork":
        sup.start()
        # Every run of these tests is forked: none falls back to spawning.
        assert sup.forks is not None and sup.forks.wait_ready(60)
    return sup


def _parent(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


def _check_launch(sup: RunSupervisor, run_id: str) -> None:
    """A forked worker is the fork server's child; a spawned one is ours."""
    pid = sup.worker_pid(run_id)
    expected = sup.forks._proc.pid if sup.forks is not None else os.getpid()
    assert _parent(pid) == expected


@pytest.fixture(params=["spawn", "fork"])
def launcher(request) -> str:
    return request.param


async def _collect(sup: RunSupervisor, run_id: str, from_sequence: int = 0) -> list:
    return [e async for e in sup.watch(run_id, from_sequence)]


async def test_run_completes_and_watch_replays_in_order(tmp_path, launcher):
    sup = _sup(tmp_path, launcher=launcher)
    rec = await sup.start_run(_cfg(5), request_id=None, traceparent=None)
    _check_launch(sup, rec.run_id)
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


async def test_sigkilled_worker_is_restarted_and_resumes(tmp_path, launcher):
    sup = _sup(tmp_path, epoch_seconds=0.15, launcher=launcher)
    rec = await sup.start_run(_cfg(20), request_id=None, traceparent=None)
    _check_launch(sup, rec.run_id)
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


async def test_gives_up_after_max_restarts(tmp_path, launcher):
    sup = _sup(tmp_path, max_restarts=0, epoch_seconds=0.2, launcher=launcher)
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


async def test_stop_run_stops_at_a_boundary_and_cannot_repeat(tmp_path, launcher):
    sup = _sup(tmp_path, epoch_seconds=0.1, launcher=launcher)
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


async def test_a_restarted_service_adopts_live_workers_and_restarts_dead_ones(tmp_path, launcher):
    first = _sup(tmp_path, epoch_seconds=0.15, launcher=launcher)
    live = await first.start_run(_cfg(6), request_id=None, traceparent=None)
    dead = await first.start_run(_cfg(6), request_id=None, traceparent=None)
    await asyncio.sleep(0.4)
    # The service process dies: its monitors stop, its workers go on without it.
    for state in first._live.values():
        state.task.cancel()
    dead_pid = first.worker_pid(dead.run_id)
    os.kill(dead_pid, signal.SIGKILL)
    first._live[dead.run_id].proc.wait(10)  # gone before the new service looks
    if first.forks is not None:
        # The whole old service is gone, its fork server with it: the live worker it forked
        # is nobody's child now, like a spawned worker of a killed service.
        first.forks.close()
    second = _sup(tmp_path, epoch_seconds=0.15, launcher=launcher)
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
    with pytest.raises(ValueError, match="launcher='thread': must be 'fork' or 'spawn'"):
        SupervisorConfig(launcher="thread")


async def test_a_worker_forked_before_the_fork_server_died_is_still_watched(tmp_path):
    """Its exit status is lost with the server; the supervisor still sees it go and
    restarts the run from its checkpoint (spawned while a new fork server preloads)."""
    sup = _sup(tmp_path, epoch_seconds=0.15, launcher="fork")
    rec = await sup.start_run(_cfg(12), request_id=None, traceparent=None)
    first_pid, old_server = sup.worker_pid(rec.run_id), sup.forks._proc.pid
    seen = []
    async for env in sup.watch(rec.run_id, 0):
        seen.append(env)
        if len([e for e in seen if e.HasField("epoch_metrics")]) == 2 and sup.forks._proc.pid == old_server:
            os.kill(old_server, signal.SIGKILL)
            sup.forks._proc.wait(10)
            os.kill(first_pid, signal.SIGKILL)
    assert seen[-1].run_state.state == "succeeded"
    told = [e.degradation.detail for e in seen if e.HasField("degradation")]
    assert len(told) == 1 and "exited with an unknown status" in told[0]
    assert sup.get_run(rec.run_id).restarts == 1
    assert sup.forks._proc.pid != old_server and sup.forks.wait_ready(60)
    await sup.close()


def test_a_fork_server_whose_preload_fails_is_given_up_and_workers_are_spawned(tmp_path):
    from esper.tolaria.forkserver import ForkServer

    fs = ForkServer("no_such_module_for_esper_tests")
    fs.start()
    assert not fs.wait_ready(60)  # it died importing the module
    helpers = {fs._proc.pid}
    for _ in range(ForkServer.MAX_FAILED_PRELOADS + 2):
        assert fs.spawn(["--x"], env={}, log_path=tmp_path / "log") is None  # the caller spawns
        fs._proc.wait(60)
        helpers.add(fs._proc.pid)
    assert len(helpers) == ForkServer.MAX_FAILED_PRELOADS  # then no new helper is started
    fs.close()
