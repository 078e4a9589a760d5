"""Tezzeret and Urza served on loopback: Compile over gRPC publishes a signed kernel that
Kasmina's loader fetches from Urza, verifies and attaches."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from esper.blueprints import builtin_blueprints, site_signature, supports
from esper.blueprints.artifact import TrustedKeys
from esper.kasmina.loader import KernelLoader
from esper.runtime.auth import AuthConfig
from esper.runtime.host import Host, HostConfig
from esper.runtime.spec import PlatformContext
from esper.tezzeret.service import create_service as tezzeret_service
from esper.urza.client import UrzaClient
from esper.urza.service import create_service as urza_service
from generated.esper.tezzeret.v1 import tezzeret_service_pb2 as pb
from generated.esper.tezzeret.v1 import tezzeret_service_pb2_grpc as rpc

pytestmark = pytest.mark.integration


async def test_compile_publish_fetch_attach(tmp_path):
    keys_dir = tmp_path / "trusted_keys"
    keys_dir.mkdir()
    ctx = PlatformContext(data_dir=tmp_path, settings={
        "urza": {"trusted_keys_dir": str(keys_dir)},
        "tezzeret": {"trusted_keys_dir": str(keys_dir), "benchmark_iters": 3,
                     "catalog_sites": [{"layout": "NC", "channels": 8}]},
    })
    auth = AuthConfig(disabled=True)
    urza = Host([urza_service(ctx)], config=HostConfig(port=0), auth=auth)
    ctx.endpoints["urza"] = f"127.0.0.1:{await urza.start()}"
    tez = Host([tezzeret_service(ctx)], config=HostConfig(port=0), auth=auth)
    tez_port = await tez.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{tez_port}") as ch:
            stub = rpc.TezzeretServiceStub(ch)
            bp = next(b for b in builtin_blueprints() if b.name == "conv3x3_residual")
            site = site_signature("NCHW", 4, (6, 6))
            resp = await stub.Compile(pb.CompileRequest(blueprint=bp, site=site, wait=True),
                                      timeout=60)
            job = resp.job
            assert job.state == pb.COMPILE_JOB_STATE_SUCCEEDED, job.error
            again = await stub.Compile(pb.CompileRequest(blueprint_id=bp.blueprint_id,
                                                         site=site, wait=True), timeout=60)
            assert (again.job.job_id, again.job.kernel_id) == (job.job_id, job.kernel_id)
            got = await stub.GetCompileJob(pb.GetCompileJobRequest(job_id=job.job_id),
                                           timeout=5)
            assert got.job.manifest.profile.parameters == 2 * (4 * 4 * 9 + 4)

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetCompileJob(pb.GetCompileJobRequest(job_id="cj-missing"), timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Compile(pb.CompileRequest(blueprint=bp, site=site_signature("NC", 4),
                                                     wait=True), timeout=30)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        def attach() -> torch.nn.Module:
            with UrzaClient(ctx.endpoints["urza"]) as client:
                loader = KernelLoader(client.get_kernel, TrustedKeys.from_dir(keys_dir),
                                      tmp_path / "cache")
                return loader.load(job.kernel_id, timeout_s=10.0)

        module = await asyncio.to_thread(attach)
        x = torch.randn(2, 4, 6, 6)
        assert torch.equal(module(x), torch.zeros_like(x))

        # The catalog configured for NC:8 compiles in the background at start.
        def catalog_count() -> int:
            with UrzaClient(ctx.endpoints["urza"]) as client:
                nc8 = site_signature("NC", 8)
                return sum(len(client.query_kernels(10.0, blueprint_id=b.blueprint_id,
                                                    site=nc8)[0])
                           for b in builtin_blueprints() if supports(b, nc8))

        expected = sum(1 for b in builtin_blueprints() if supports(b, site_signature("NC", 8)))
        for _ in range(120):
            if await asyncio.to_thread(catalog_count) == expected:
                break
            await asyncio.sleep(0.25)
        assert await asyncio.to_thread(catalog_count) == expected
    finally:
        await tez.stop("test over")
        await urza.stop("test over")
