"""Tolaria's API papercuts (issue 11 point 8), each over real gRPC: StopRun honours its
request_id and reason and says where the run is headed; a controller the platform's Tamiyo
does not serve is refused at StartRun; GetRun shows the effective config; RunStateChanged
carries an enum beside its string; a run that ended never counts against the pool."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from esper.runtime.auth import AuthConfig
from esper.runtime.host import Host, HostConfig
from esper.runtime.spec import PlatformContext
from esper.tolaria.service import create_service
from generated.esper.oona.v1 import events_pb2 as ev
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb
from generated.esper.tolaria.v1 import tolaria_service_pb2_grpc as rpc

WORKER = "tests.unit.tolaria_service.scripted_worker"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve(tmp_path, *, worker_args=(), tamiyo: bool = False, dead_tamiyo: bool = False,
                 **supervisor):  # type: ignore[no-untyped-def]
    port = _free_port()
    endpoints = {"tolaria": f"127.0.0.1:{port}"}
    if tamiyo:
        endpoints["tamiyo"] = f"127.0.0.1:{port}"
        endpoints["urza"] = f"127.0.0.1:{_free_port()}"  # nobody; GetPolicyInfo does not ask it
    if dead_tamiyo:
        endpoints["tamiyo"] = f"127.0.0.1:{_free_port()}"
    ctx = PlatformContext(
        data_dir=tmp_path, endpoints=endpoints,
        settings={"tolaria": {"supervisor": {"worker_module": WORKER, "poll_interval_s": 0.02,
                                             "policy_check_timeout_s": 1.0, **supervisor},
                              "worker_args": ["--epoch-seconds", "0.05", *worker_args]}},
    )
    specs = [create_service(ctx)]
    if tamiyo:
        from esper.tamiyo.service import create_service as tamiyo_service

        specs.append(tamiyo_service(ctx))
    host = Host(specs, config=HostConfig(port=port, tracing=False), auth=AuthConfig(disabled=True))
    await host.start()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield rpc.TolariaServiceStub(ch)
    finally:
        await ch.close()
        await host.stop()


@pytest.fixture
async def tolaria(tmp_path):
    async for stub in _serve(tmp_path):
        yield stub


def _cfg(**kw) -> pb.RunConfig:
    base = {"task": "mnist1d", "host": "cnn", "controller": "heuristic", "epochs": 4, "batch_size": 32}
    return pb.RunConfig(**{**base, **kw})


def _info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for d in status_pb2.Status.FromString(value).details:
                if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    d.Unpack(info)
                    return info
    raise AssertionError("no ErrorInfo")


async def _events(stub, run_id: str) -> list[ev.EventEnvelope]:
    return [r.event async for r in stub.WatchRun(pb.WatchRunRequest(run_id=run_id))]


async def test_stop_run_is_idempotent_records_its_reason_and_says_where_the_run_is_headed(tolaria):
    run = (await tolaria.StartRun(pb.StartRunRequest(config=_cfg(epochs=400)))).run
    other = (await tolaria.StartRun(pb.StartRunRequest(config=_cfg(epochs=400)))).run
    rid = "6c1f0e2a-7b3d-4e5f-8a9b-0c1d2e3f4a5b"
    first = await tolaria.StopRun(pb.StopRunRequest(request_id=rid, run_id=run.run_id, reason="budget spent"))
    assert first.expected_state == pb.RUN_STATE_STOPPED
    assert first.run.stop_requested and first.run.stop_reason == "budget spent"
    assert first.run.state in (pb.RUN_STATE_PENDING, pb.RUN_STATE_RUNNING)
    retry = await tolaria.StopRun(pb.StopRunRequest(request_id=rid, run_id=run.run_id, reason="budget spent"))
    assert retry.requested_at == first.requested_at and retry.run.stop_reason == "budget spent"
    got = (await tolaria.GetRun(pb.GetRunRequest(run_id=run.run_id))).run
    assert got.stop_requested and got.stop_reason == "budget spent"
    events = await _events(tolaria, run.run_id)
    assert events[-1].run_state.state == "stopped"
    # A retry after the run stopped still succeeds, and says the state it ended in.
    late = await tolaria.StopRun(pb.StopRunRequest(request_id=rid, run_id=run.run_id, reason="x"))
    assert late.expected_state == pb.RUN_STATE_STOPPED and late.run.state == pb.RUN_STATE_STOPPED
    assert late.requested_at == first.requested_at and late.run.stop_reason == "budget spent"
    # A new request on an ended run is refused; the same request id for another run too.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await tolaria.StopRun(pb.StopRunRequest(request_id="0f2e4d6c-8b0a-4c1e-9d3f-5a7b9c1d3e5f",
                                                run_id=run.run_id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await tolaria.StopRun(pb.StopRunRequest(request_id=rid, run_id=other.run_id))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and run.run_id in e.value.details()
    # Request ids are case-insensitive (the host lower-cases them): the same request.
    upper = await tolaria.StopRun(pb.StopRunRequest(request_id=rid.upper(), run_id=run.run_id))
    assert upper.requested_at == first.requested_at
    await tolaria.StopRun(pb.StopRunRequest(run_id=other.run_id))
    await _events(tolaria, other.run_id)


async def test_get_run_shows_the_effective_config_not_wire_zero_values(tolaria):
    cfg = _cfg()  # no width, no decide_timeout, no optimizer, no budget
    run = (await tolaria.StartRun(pb.StartRunRequest(config=cfg))).run
    for shown in (run, (await tolaria.GetRun(pb.GetRunRequest(run_id=run.run_id))).run):
        c = shown.config
        assert c.width == 1.0
        assert c.decide_timeout.ToTimedelta().total_seconds() == 0.5
        assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.schedule) == ("adamw", 3e-3, "cosine")
        assert c.budget.max_seeds == 4 and c.checkpoint_every == 0 and c.epochs == 4
    listed = (await tolaria.ListRuns(pb.ListRunsRequest())).runs
    assert listed[0].config.width == 1.0
    # The request as sent stays what a retried StartRun is compared with.
    rid = "1d3f5a7b-9c1e-4d2f-8a0b-6c4e2a0f8d6b"
    a = (await tolaria.StartRun(pb.StartRunRequest(request_id=rid, config=cfg))).run
    b = (await tolaria.StartRun(pb.StartRunRequest(request_id=rid, config=cfg))).run
    assert a.run_id == b.run_id
    for r in (run, a):
        await _events(tolaria, r.run_id)


async def test_run_state_changes_carry_the_enum_beside_the_string(tolaria):
    run = (await tolaria.StartRun(pb.StartRunRequest(config=_cfg(epochs=2)))).run
    states = [e.run_state for e in await _events(tolaria, run.run_id) if e.HasField("run_state")]
    assert [(s.state, s.run_state) for s in states] == [
        ("pending", ev.RUN_STATE_PENDING), ("running", ev.RUN_STATE_RUNNING),
        ("succeeded", ev.RUN_STATE_SUCCEEDED)]
    # The same numbers as the Run's own state enum.
    assert ev.RUN_STATE_SUCCEEDED == pb.RUN_STATE_SUCCEEDED and ev.RUN_STATE_STOPPED == pb.RUN_STATE_STOPPED


async def test_a_run_that_ended_never_counts_against_the_pool(tmp_path):
    # The worker lingers 3 s after its terminal state (the real one flushes the bus and its
    # traces then); the slot is free the moment the log says the run ended.
    async for tolaria in _serve(tmp_path, max_active_runs=1, worker_args=["--linger-s", "3"]):
        first = (await tolaria.StartRun(pb.StartRunRequest(config=_cfg(epochs=2)))).run
        events = await _events(tolaria, first.run_id)
        assert events[-1].run_state.state == "succeeded"
        second = (await tolaria.StartRun(pb.StartRunRequest(config=_cfg(epochs=2)))).run
        assert second.run_id != first.run_id
        with pytest.raises(grpc.aio.AioRpcError) as e:  # the pool is really one run wide
            await tolaria.StartRun(pb.StartRunRequest(config=_cfg(epochs=2)))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 runs are already active" in e.value.details()
        await _events(tolaria, second.run_id)


async def test_a_controller_tamiyo_does_not_serve_is_refused_at_start_run(tmp_path):
    async for tolaria in _serve(tmp_path, tamiyo=True):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await tolaria.StartRun(pb.StartRunRequest(config=_cfg(controller="random")))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "config.controller='random'" in e.value.details() and "'heuristic'" in e.value.details()
        info = _info(e.value)
        assert info.reason == "CONTROLLER_NOT_SERVED" and info.metadata["field"] == "config.controller"
        assert info.metadata["servedPolicy"] == "heuristic"
        assert list((await tolaria.ListRuns(pb.ListRunsRequest())).runs) == []
        ok = (await tolaria.StartRun(pb.StartRunRequest(config=_cfg(controller="heuristic")))).run
        none = (await tolaria.StartRun(pb.StartRunRequest(config=_cfg(controller="none")))).run
        for r in (ok, none):
            assert (await _events(tolaria, r.run_id))[-1].run_state.state == "succeeded"


async def test_an_unreachable_tamiyo_does_not_refuse_the_run_and_the_detail_says_so(tmp_path):
    async for tolaria in _serve(tmp_path, dead_tamiyo=True):
        run = (await tolaria.StartRun(pb.StartRunRequest(config=_cfg(controller="random")))).run
        events = await _events(tolaria, run.run_id)
        assert "could not ask Tamiyo which policy it serves" in events[0].run_state.detail
        assert events[-1].run_state.state == "succeeded"


async def test_gpus_are_refused_by_a_local_launcher(tolaria):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await tolaria.StartRun(pb.StartRunRequest(config=_cfg(resources=pb.RunResources(gpus=1))))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _info(e.value).metadata["field"] == "config.resources.gpus"
    run = (await tolaria.StartRun(pb.StartRunRequest(config=_cfg(
        epochs=1, resources=pb.RunResources(cpu_millis=500, memory_mib=256))))).run
    assert run.config.resources.memory_mib == 256
    await asyncio.wait_for(_events(tolaria, run.run_id), 30)
