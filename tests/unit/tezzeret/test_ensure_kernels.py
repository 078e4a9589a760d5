"""On-demand catalog compiles: EnsureKernels is idempotent, bounded by the caller's time
and by Tezzeret's parallelism, and reachable over gRPC through the public client."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from esper.blueprints import site_signature, supports
from esper.errors import InvalidArgumentError
from esper.tezzeret.config import TezzeretConfig
from esper.tezzeret.jobs import JobStore
from esper.tezzeret.service import TezzeretCore
from generated.esper.tezzeret.v1 import tezzeret_service_pb2 as pb

from .test_tezzeret import BPS, KEY, MemoryLibrary

CATALOG = list(BPS.values())


@pytest.fixture
def core(tmp_path):
    lib = MemoryLibrary()
    store = JobStore(tmp_path / "jobs.sqlite")
    c = TezzeretCore(store, KEY, lambda: lib, TezzeretConfig(benchmark_iters=0), CATALOG)
    yield c, lib
    store.close()


async def test_ensure_compiles_each_supporting_blueprint_once(core):
    c, lib = core
    site = site_signature("NCL", 4, (40,))
    jobs, unsupported = await c.ensure_kernels(site, wait=True, timeout_s=60)
    expected = [bp.name for bp in CATALOG if supports(bp, site)]
    assert expected and [j.blueprint_id for j in jobs] == [BPS[n].blueprint_id for n in expected]
    assert all(j.state == pb.COMPILE_JOB_STATE_SUCCEEDED for j in jobs)
    assert set(unsupported) == {bp.name for bp in CATALOG} - set(expected)
    assert lib.puts == len(expected)
    again, _ = await c.ensure_kernels(site, wait=True, timeout_s=60)
    assert [(j.job_id, j.kernel_id) for j in again] == [(j.job_id, j.kernel_id) for j in jobs]
    assert lib.puts == len(expected)  # nothing compiled twice


async def test_ensure_takes_a_blueprint_filter_and_refuses_unknown_names(core):
    c, _lib = core
    site = site_signature("NC", 8)
    jobs, unsupported = await c.ensure_kernels(site, ["norm_scale", "conv3x3_residual"], wait=True,
                                               timeout_s=60)
    assert [j.blueprint_id for j in jobs] == [BPS["norm_scale"].blueprint_id]
    assert unsupported == ["conv3x3_residual"]
    with pytest.raises(InvalidArgumentError, match=r"\['resnet'\] are not in Tezzeret's catalog") as e:
        await c.ensure_kernels(site, ["resnet"], wait=False)
    assert e.value.field == "blueprint_names"


async def test_waiting_answers_before_the_callers_deadline_with_jobs_still_going(core):
    c, lib = core
    slow_put = lib.put_kernel

    def put_kernel(artifact, timeout_s):
        time.sleep(1.0)
        return slow_put(artifact, timeout_s)

    lib.put_kernel = put_kernel
    t0 = time.monotonic()
    jobs, _ = await c.ensure_kernels(site_signature("NC", 8), ["norm_scale"], wait=True, timeout_s=0.4)
    assert time.monotonic() - t0 < 0.4
    assert [j.state for j in jobs] in ([pb.COMPILE_JOB_STATE_RUNNING], [pb.COMPILE_JOB_STATE_QUEUED])
    await c.drain()
    assert c.store.get(jobs[0].job_id).state == pb.COMPILE_JOB_STATE_SUCCEEDED


async def test_compiles_run_at_most_max_parallel_at_once(core, monkeypatch):
    import esper.tezzeret.core as svc

    c, _ = core
    running, peak, lock = [0], [0], threading.Lock()
    real = svc.compile_kernel

    def counted(*a, **k):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.05)
            return real(*a, **k)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(svc, "compile_kernel", counted)
    jobs, _ = await c.ensure_kernels(site_signature("NC", 16), wait=True, timeout_s=60)
    assert len(jobs) >= 3 and all(j.state == pb.COMPILE_JOB_STATE_SUCCEEDED for j in jobs)
    assert peak[0] == c.config.max_parallel_compiles == 2


async def test_ensure_kernels_over_grpc_through_the_client(tmp_path):
    from esper.runtime.auth import AuthConfig
    from esper.runtime.host import Host
    from esper.runtime.spec import PlatformContext
    from esper.tezzeret.client import TezzeretClient
    from esper.tezzeret.service import create_service

    lib = MemoryLibrary()
    key_file = tmp_path / "signing.pem"
    KEY.save(key_file)  # the key MemoryLibrary trusts
    ctx = PlatformContext(data_dir=tmp_path, settings={"tezzeret": {
        "signing_key_file": str(key_file), "benchmark_iters": 0,
        "catalog_blueprints": ["norm_scale", "bottleneck_mlp"]}})
    host = Host([create_service(ctx, urza=lambda: lib)], auth=AuthConfig(disabled=True))
    port = await host.start()
    try:
        def call():
            with TezzeretClient(f"127.0.0.1:{port}") as tz:
                first = tz.ensure_kernels(site_signature("NC", 8), 30.0, wait=True)
                with pytest.raises(InvalidArgumentError) as e:
                    tz.ensure_kernels(site_signature("NC", 8), 5.0, blueprint_names=["resnet"])
                return first, e.value

        (jobs, unsupported), err = await asyncio.to_thread(call)
    finally:
        await host.stop()
    assert sorted(m.blueprint_name for m, _ in lib.kernels.values()) == ["bottleneck_mlp", "norm_scale"]
    assert all(j.state == pb.COMPILE_JOB_STATE_SUCCEEDED for j in jobs) and unsupported == []
    assert err.field == "blueprint_names"
