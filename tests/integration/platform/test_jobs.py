"""Operator-registered jobs run by real workers: a job that raises while it builds fails
its own run with its error, and nothing else (the service, other runs) notices."""

from __future__ import annotations

import grpc
import pytest

from esper.runtime.auth import AuthConfig
from esper.runtime.host import Host
from esper.runtime.spec import PlatformContext
from esper.tolaria.service import create_service
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb
from generated.esper.tolaria.v1 import tolaria_service_pb2_grpc as rpc

pytestmark = pytest.mark.integration

JOBS = {"broken": "tests.unit.jobs.sample_jobs:broken", "two-branch": "tests.unit.jobs.sample_jobs:tiny"}


@pytest.fixture
async def tolaria(tmp_path):
    # controller "none": no Tamiyo needed; Urza's endpoint is never dialled without growth.
    ctx = PlatformContext(data_dir=tmp_path, endpoints={"urza": "127.0.0.1:9"},
                          settings={"tolaria": {"jobs": JOBS, "supervisor": {"poll_interval_s": 0.05}}})
    host = Host([create_service(ctx)], auth=AuthConfig(disabled=True))
    port = await host.start()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield rpc.TolariaServiceStub(ch), tmp_path
    finally:
        await ch.close()
        await host.stop()


def _cfg(job: str, **params: str) -> pb.RunConfig:
    return pb.RunConfig(job=job, job_params=params, controller="none", epochs=2, batch_size=32,
                        checkpoint_every=1)


async def test_a_job_that_raises_fails_its_run_with_its_error_and_nothing_else(tolaria):
    stub, data_dir = tolaria
    bad = (await stub.StartRun(pb.StartRunRequest(config=_cfg("broken")))).run
    events = [r.event async for r in stub.WatchRun(pb.WatchRunRequest(run_id=bad.run_id))]
    states = [e.run_state.state for e in events if e.HasField("run_state")]
    assert states == ["pending", "failed"]
    got = (await stub.GetRun(pb.GetRunRequest(run_id=bad.run_id))).run
    assert got.state == pb.RUN_STATE_FAILED
    assert "job 'broken' raised while building: FileNotFoundError: /data/train.csv" in got.detail
    assert "restarted" not in {e.degradation.kind for e in events if e.HasField("degradation")}
    log = (data_dir / "tolaria" / "runs" / bad.run_id / "worker.log").read_text()
    assert "Traceback" in log and "FileNotFoundError" in log  # the job's traceback, for its author
    # The same service runs the next job as if nothing had happened.
    good = (await stub.StartRun(pb.StartRunRequest(config=_cfg("two-branch", hidden="4")))).run
    events = [r.event async for r in stub.WatchRun(pb.WatchRunRequest(run_id=good.run_id))]
    assert events[-1].run_state.state == "succeeded", events[-1]
    assert [e.epoch_metrics.epoch for e in events if e.HasField("epoch_metrics")] == [1, 2]
    listed = await stub.ListRuns(pb.ListRunsRequest(page_size=10))
    assert {r.run_id: r.state for r in listed.runs} == {bad.run_id: pb.RUN_STATE_FAILED,
                                                         good.run_id: pb.RUN_STATE_SUCCEEDED}
