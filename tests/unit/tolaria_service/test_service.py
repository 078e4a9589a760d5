"""TolariaService over real gRPC (the runtime host): validation, runs, paging, watch, stop."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from esper.runtime.auth import AuthConfig
from esper.runtime.host import Host
from esper.runtime.spec import PlatformContext
from esper.tolaria.service import create_service
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb
from generated.esper.tolaria.v1 import tolaria_service_pb2_grpc as rpc

WORKER = "tests.unit.tolaria_service.scripted_worker"


SAMPLE_JOBS = {"two-branch": "tests.unit.jobs.sample_jobs:tiny",
               "needs-size": "tests.unit.jobs.sample_jobs:required"}


async def _serve(tmp_path, **supervisor):  # type: ignore[no-untyped-def]
    ctx = PlatformContext(
        data_dir=tmp_path,
        settings={"tolaria": {"supervisor": {"worker_module": WORKER, "poll_interval_s": 0.02,
                                             **supervisor},
                              "worker_args": ["--epoch-seconds", "0.05"],
                              "jobs": SAMPLE_JOBS}},
    )
    host = Host([create_service(ctx)], auth=AuthConfig(disabled=True))
    port = await host.start()
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


@pytest.fixture
async def tolaria_one_slot(tmp_path):
    async for stub in _serve(tmp_path, max_active_runs=1):
        yield stub


def _good(**kw) -> pb.RunConfig:
    base = {"task": "mnist1d", "host": "cnn", "controller": "heuristic", "epochs": 4, "batch_size": 32}
    return pb.RunConfig(**{**base, **kw})


def _job(**kw) -> pb.RunConfig:
    base = {"job": "two-branch", "controller": "heuristic", "epochs": 2, "batch_size": 32}
    return pb.RunConfig(**{**base, **kw})


def _violations(err: grpc.aio.AioRpcError) -> list[str]:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            st = status_pb2.Status.FromString(value)
            for d in st.details:
                if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    br = error_details_pb2.BadRequest()
                    d.Unpack(br)
                    return [v.field for v in br.field_violations]
    return []


def _bad_configs() -> list[tuple[str, pb.RunConfig]]:
    unknown_key = pb.RunConfig()
    unknown_key.ParseFromString(_good().SerializeToString() + bytes([0xF8, 0x06, 0x01]))  # field 111
    negative = _good()
    negative.budget.max_added_parameters = -5
    return [
        ("config.job", pb.RunConfig(job="imagenet", controller="heuristic", epochs=4, batch_size=32)),
        ("config.job_params.hidden", _job(job_params={"hidden": "wide"})),
        ("config.job_params.hiden", _job(job_params={"hiden": "3"})),
        ("config.job_params.size", _job(job="needs-size")),
        ("config.job_params.seed", _job(job_params={"seed": "3"})),
        ("config.task", _job(task="digits")),
        ("config.job_params", _good(job_params={"host": "cnn"})),
        ("config.job", pb.RunConfig(controller="heuristic", epochs=4, batch_size=32)),
        ("config.sites[1]", _good(sites=["conv1", "no_such_layer"])),
        ("config.task", _good(task="imagenet")),
        ("config.host", _good(host="resnet50")),
        ("config.111", unknown_key),
        ("config.budget.max_added_parameters", negative),
    ]


@pytest.mark.parametrize("field,cfg", _bad_configs(), ids=lambda v: v if isinstance(v, str) else "")
async def test_bad_config_is_invalid_argument_naming_the_field(tolaria, field, cfg):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await tolaria.StartRun(pb.StartRunRequest(config=cfg))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in _violations(e.value), (field, e.value.details())
    listed = await tolaria.ListRuns(pb.ListRunsRequest(page_size=10))
    assert list(listed.runs) == []


async def test_run_lifecycle_over_grpc(tolaria):
    rid = "3a8f0c52-7c43-4a5e-8f0e-2f5d8b1c9e01"
    started = await tolaria.StartRun(pb.StartRunRequest(request_id=rid, config=_good()))
    again = await tolaria.StartRun(pb.StartRunRequest(request_id=rid, config=_good()))
    run_id = started.run.run_id
    assert again.run.run_id == run_id and started.run.config.epochs == 4
    events = [r.event async for r in tolaria.WatchRun(pb.WatchRunRequest(run_id=run_id))]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].run_state.state == "succeeded"
    assert [e.epoch_metrics.epoch for e in events if e.HasField("epoch_metrics")] == [1, 2, 3, 4]
    got = (await tolaria.GetRun(pb.GetRunRequest(run_id=run_id))).run
    assert got.state == pb.RUN_STATE_SUCCEEDED and got.epoch == 4 and got.last_sequence == events[-1].sequence
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await tolaria.StopRun(pb.StopRunRequest(run_id=run_id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await tolaria.GetRun(pb.GetRunRequest(run_id="run-missing"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_pages_and_stop(tolaria):
    ids = [(await tolaria.StartRun(pb.StartRunRequest(config=_good(epochs=200)))).run.run_id for _ in range(3)]
    page1 = await tolaria.ListRuns(pb.ListRunsRequest(page_size=2))
    page2 = await tolaria.ListRuns(pb.ListRunsRequest(page_size=2, page_token=page1.next_page_token))
    assert [r.run_id for r in page1.runs] + [r.run_id for r in page2.runs] == ids
    assert page2.next_page_token == ""
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await tolaria.ListRuns(pb.ListRunsRequest(page_token="garbage"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for run_id in ids:
        await tolaria.StopRun(pb.StopRunRequest(run_id=run_id, reason="test over"))
    for run_id in ids:
        events = [r.event async for r in tolaria.WatchRun(pb.WatchRunRequest(run_id=run_id))]
        assert events[-1].run_state.state == "stopped"
    stopped = await tolaria.ListRuns(pb.ListRunsRequest(page_size=10, state=pb.RUN_STATE_STOPPED))
    assert sorted(r.run_id for r in stopped.runs) == sorted(ids)


def _reason(err: grpc.aio.AioRpcError) -> str:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for d in status_pb2.Status.FromString(value).details:
                if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    d.Unpack(info)
                    return info.reason
    return ""


async def test_start_run_beyond_the_worker_pool_is_resource_exhausted(tolaria_one_slot):
    tolaria = tolaria_one_slot
    rid = "5b0e8a1c-2f4d-4c6e-9a7b-1d3f5e7a9c0b"
    first = (await tolaria.StartRun(pb.StartRunRequest(request_id=rid, config=_good(epochs=200)))).run
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await tolaria.StartRun(pb.StartRunRequest(config=_good()))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _reason(e.value) == "RESOURCE_EXHAUSTED"
    assert "max_active_runs=1" in e.value.details()
    # The refused call left nothing behind, and the running run is untouched.
    listed = await tolaria.ListRuns(pb.ListRunsRequest(page_size=10))
    assert [r.run_id for r in listed.runs] == [first.run_id]
    assert listed.runs[0].state in (pb.RUN_STATE_PENDING, pb.RUN_STATE_RUNNING)
    # A retried StartRun of the run that holds the slot still gets its run back.
    again = await tolaria.StartRun(pb.StartRunRequest(request_id=rid, config=_good(epochs=200)))
    assert again.run.run_id == first.run_id
    # Once it ends, the slot is free again.
    await tolaria.StopRun(pb.StopRunRequest(run_id=first.run_id, reason="make room"))
    events = [r.event async for r in tolaria.WatchRun(pb.WatchRunRequest(run_id=first.run_id))]
    assert events[-1].run_state.state == "stopped"
    for _ in range(100):  # the supervisor lets go of the worker right after its last event
        try:
            second = (await tolaria.StartRun(pb.StartRunRequest(config=_good(epochs=2)))).run
            break
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.05)
    else:
        raise AssertionError("the slot was not freed after the run stopped")
    events = [r.event async for r in tolaria.WatchRun(pb.WatchRunRequest(run_id=second.run_id))]
    assert events[-1].run_state.state == "succeeded"


async def test_an_unregistered_job_is_invalid_argument_listing_the_registered_ones(tolaria):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await tolaria.StartRun(pb.StartRunRequest(config=_job(job="imagenet")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(e.value) == ["config.job"]
    assert ("job 'imagenet' is not registered; registered jobs: digits, mnist1d, needs-size, "
            "spirals, two-branch") in e.value.details()
    # An import path is not even a job name: the contract refuses it before any lookup.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await tolaria.StartRun(pb.StartRunRequest(config=_job(job="os:system")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(e.value) == ["config.job"]
    listed = await tolaria.ListRuns(pb.ListRunsRequest(page_size=10))
    assert list(listed.runs) == []


async def test_a_registered_job_runs_and_its_config_is_echoed(tolaria):
    cfg = _job(job_params={"hidden": "4", "mode": "xor"})
    run = (await tolaria.StartRun(pb.StartRunRequest(config=cfg))).run
    assert run.config.job == "two-branch" and dict(run.config.job_params) == {"hidden": "4", "mode": "xor"}
    assert run.config.task == "" and run.config.host == ""
    events = [r.event async for r in tolaria.WatchRun(pb.WatchRunRequest(run_id=run.run_id))]
    assert events[-1].run_state.state == "succeeded"


async def test_list_jobs_describes_every_registered_job_and_pages(tolaria):
    everything = await tolaria.ListJobs(pb.ListJobsRequest())
    assert [j.name for j in everything.jobs] == ["digits", "mnist1d", "needs-size", "spirals",
                                                 "two-branch"]
    assert everything.next_page_token == ""
    tiny = next(j for j in everything.jobs if j.name == "two-branch")
    assert tiny.source == "platform config" and tiny.description.startswith("A 4-feature")
    params = {p.name: p for p in tiny.parameters}
    assert (params["hidden"].type, params["hidden"].default_value, params["hidden"].required) == ("int", "6", False)
    assert list(params["mode"].choices) == ["sum", "xor"] and params["noise"].accepts_none
    assert params["seed"].run_config_field == "seed"
    needs = next(j for j in everything.jobs if j.name == "needs-size")
    assert needs.parameters[0].required and needs.parameters[0].default_value == ""
    mnist = next(j for j in everything.jobs if j.name == "mnist1d")
    assert mnist.source == "builtin"
    page1 = await tolaria.ListJobs(pb.ListJobsRequest(page_size=2))
    page2 = await tolaria.ListJobs(pb.ListJobsRequest(page_size=2, page_token=page1.next_page_token))
    page3 = await tolaria.ListJobs(pb.ListJobsRequest(page_size=2, page_token=page2.next_page_token))
    assert [j.name for p in (page1, page2, page3) for j in p.jobs] == [j.name for j in everything.jobs]
    assert page3.next_page_token == ""
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await tolaria.ListJobs(pb.ListJobsRequest(page_token="zzz"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_bad_job_registration_fails_the_service_at_start(tmp_path):
    from esper.errors import ConfigError

    ctx = PlatformContext(data_dir=tmp_path, settings={"tolaria": {"jobs": {"x": "not a target"}}})
    with pytest.raises(ConfigError, match="must be 'package.module:function'"):
        create_service(ctx)
