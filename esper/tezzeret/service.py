"""TezzeretService: the gRPC adapter over `TezzeretCore` (decode → core → encode).

What Tezzeret does is in `esper.tezzeret.core` (compile jobs, on-demand kernels, the
signing key and catalog it starts from) and `esper.tezzeret.compiler` (build, validate,
profile, sign); this module only hosts it on the shared runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from esper.runtime.spec import PlatformContext, ServiceSpec
from esper.tezzeret.config import TezzeretConfig
from esper.tezzeret.core import TezzeretCore, publish_public_key, signing_key_for
from esper.urza.client import UrzaClient, UrzaLibrary
from generated.esper.tezzeret.v1 import tezzeret_service_pb2 as pb
from generated.esper.tezzeret.v1 import tezzeret_service_pb2_grpc as rpc


class TezzeretServicer(rpc.TezzeretServiceServicer):
    def __init__(self, core: TezzeretCore):
        self.core = core

    async def Compile(self, request: pb.CompileRequest, context: Any) -> pb.CompileResponse:
        source = (request.blueprint_id if request.WhichOneof("source") == "blueprint_id"
                  else request.blueprint)
        left = context.time_remaining() if context is not None else None
        job = await self.core.compile(source, request.site, wait=request.wait, timeout_s=left)
        return pb.CompileResponse(job=job)

    async def GetCompileJob(self, request: pb.GetCompileJobRequest, context: Any
                            ) -> pb.GetCompileJobResponse:
        return pb.GetCompileJobResponse(job=self.core.store.get(request.job_id))

    async def EnsureKernels(self, request: pb.EnsureKernelsRequest, context: Any
                            ) -> pb.EnsureKernelsResponse:
        left = context.time_remaining() if context is not None else None
        jobs, unsupported = await self.core.ensure_kernels(
            request.site, list(request.blueprint_names), wait=request.wait, timeout_s=left)
        return pb.EnsureKernelsResponse(jobs=jobs, unsupported_blueprints=unsupported)


def create_service(ctx: PlatformContext, *, urza: Callable[[], UrzaLibrary] | None = None
                   ) -> ServiceSpec:
    """Tezzeret hosted on the shared runtime; `urza` replaces the Urza client (tests)."""
    config = TezzeretConfig.from_dict(ctx.settings.get("tezzeret"))
    core = TezzeretCore.open(
        config, state_dir=ctx.part_dir("tezzeret"), data_dir=ctx.data_dir,
        urza=urza or (lambda: UrzaClient.from_context(ctx, "tezzeret")))
    return ServiceSpec(
        part="tezzeret",
        service_name="esper.tezzeret.v1.TezzeretService",
        servicer=TezzeretServicer(core),
        add_to_server=rpc.add_TezzeretServiceServicer_to_server,
        write_methods=frozenset({"Compile", "EnsureKernels"}),
        on_start=core.start,
        on_stop=core.stop,
    )


__all__ = ["TezzeretCore", "TezzeretServicer", "create_service", "publish_public_key",
           "signing_key_for"]
