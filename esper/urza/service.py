"""UrzaService: the gRPC adapter over `esper.urza.library.UrzaLibrary`.

Errors are raised as `esper.errors` types and mapped to status codes by the runtime
host. Store and verification work runs in worker threads so one slow upload never
stalls the event loop that serves everyone else's downloads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from esper.errors import InvalidArgumentError
from esper.runtime.spec import PlatformContext, ServiceSpec
from esper.urza.blobs import Blobs, BlobStore
from esper.urza.config import MAX_CHUNK, UrzaConfig
from esper.urza.library import TrustedKeySource, UrzaLibrary
from esper.urza.s3blobs import S3BlobStore
from esper.urza.store import open_store
from generated.esper.urza.v1 import urza_service_pb2 as pb
from generated.esper.urza.v1 import urza_service_pb2_grpc as rpc

log = logging.getLogger(__name__)


class UrzaServicer(rpc.UrzaServiceServicer):
    def __init__(self, library: UrzaLibrary) -> None:
        self.lib = library

    async def PutBlueprint(self, request: pb.PutBlueprintRequest,
                           context: grpc.aio.ServicerContext) -> pb.PutBlueprintResponse:
        bp_id, created = await asyncio.to_thread(self.lib.put_blueprint, request.blueprint)
        return pb.PutBlueprintResponse(blueprint_id=bp_id, created=created)

    async def GetBlueprint(self, request: pb.GetBlueprintRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetBlueprintResponse:
        bp = await asyncio.to_thread(self.lib.get_blueprint, request.blueprint_id)
        return pb.GetBlueprintResponse(blueprint=bp)

    async def ListBlueprints(self, request: pb.ListBlueprintsRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListBlueprintsResponse:
        bps, token = await asyncio.to_thread(
            lambda: self.lib.list_blueprints(
                family=request.family, tags=list(request.tags), layout=request.layout,
                page_size=request.page_size, page_token=request.page_token))
        return pb.ListBlueprintsResponse(blueprints=bps, next_page_token=token)

    async def PutKernel(self, request_iterator: AsyncIterator[pb.PutKernelRequest],
                        context: grpc.aio.ServicerContext) -> pb.PutKernelResponse:
        header: pb.KernelUploadHeader | None = None
        buf = bytearray()
        async for msg in request_iterator:
            part = msg.WhichOneof("part")
            if header is None:
                if part != "header":
                    raise InvalidArgumentError(
                        f"the first PutKernel message carries {part!r}; it must be the "
                        "header (request_id, total_size, artifact_sha256)", field="header")
                header = msg.header
                if header.total_size > self.lib.config.max_artifact_bytes:
                    raise InvalidArgumentError(
                        f"header.total_size={header.total_size}: Urza accepts at most "
                        f"{self.lib.config.max_artifact_bytes} bytes", field="header.total_size")
                continue
            if part != "chunk":
                raise InvalidArgumentError(
                    "a second header arrived after the first; send one header, then chunks",
                    field="header")
            if len(buf) + len(msg.chunk) > header.total_size:
                raise InvalidArgumentError(
                    f"chunks exceed header.total_size={header.total_size} (at least "
                    f"{len(buf) + len(msg.chunk)} bytes sent)", field="header.total_size")
            buf += msg.chunk
        if header is None:
            raise InvalidArgumentError("PutKernel stream was empty; send a header, then chunks",
                                       field="header")
        kernel_id, created = await asyncio.to_thread(
            self.lib.put_kernel, bytes(buf), expected_sha256=header.artifact_sha256,
            expected_size=header.total_size)
        return pb.PutKernelResponse(kernel_id=kernel_id, created=created)

    async def GetKernel(self, request: pb.GetKernelRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GetKernelResponse]:
        kb = await asyncio.to_thread(self.lib.read_kernel, request.kernel_id, request.offset)
        yield pb.GetKernelResponse(info=kb.record)
        size = min(request.chunk_size or self.lib.config.chunk_size, MAX_CHUNK)
        view = memoryview(kb.data)
        for off in range(request.offset, len(kb.data), size):
            yield pb.GetKernelResponse(chunk=pb.KernelChunk(offset=off,
                                                            data=bytes(view[off:off + size])))

    async def QueryKernels(self, request: pb.QueryKernelsRequest,
                           context: grpc.aio.ServicerContext) -> pb.QueryKernelsResponse:
        records, token = await asyncio.to_thread(
            lambda: self.lib.query_kernels(
                blueprint_id=request.blueprint_id,
                site=request.site if request.HasField("site") else None,
                tags=list(request.tags), max_parameters=request.max_parameters,
                page_size=request.page_size, page_token=request.page_token))
        return pb.QueryKernelsResponse(kernels=records, next_page_token=token)

    async def RecordOutcome(self, request: pb.RecordOutcomeRequest,
                            context: grpc.aio.ServicerContext) -> pb.RecordOutcomeResponse:
        created = await asyncio.to_thread(self.lib.record_outcome, request.report,
                                          request.request_id)
        return pb.RecordOutcomeResponse(created=created)


def open_library(ctx: PlatformContext) -> UrzaLibrary:
    """Open Urza's stores as `ctx.settings["urza"]` says (see `UrzaConfig`)."""
    config = UrzaConfig.from_dict(dict(ctx.settings.get("urza", {})))
    part_dir = ctx.part_dir("urza")
    store = open_store(config.database_url or None, part_dir / "urza.db")
    blobs: Blobs
    if config.blob_url:
        try:
            blobs = S3BlobStore(config.blob_url, endpoint_url=config.s3_endpoint_url,
                                region=config.s3_region)
        except BaseException:
            store.close()
            raise
    else:
        # One Urza process owns its blob dir, so every temp file found at open is a crash
        # leftover and is swept at once.
        blobs = BlobStore(Path(config.blob_dir) if config.blob_dir else part_dir / "blobs")
    lib = UrzaLibrary(store, blobs, TrustedKeySource.from_config(config), config)
    log.info("urza: %s metadata (schema v%d), blobs in %s, %d trusted signer key(s)",
             store.backend, store.schema_version(), blobs.location, len(lib.trusted.keys))
    return lib


def create_service(ctx: PlatformContext) -> ServiceSpec:
    lib = open_library(ctx)

    async def on_stop() -> None:
        lib.close()

    return ServiceSpec(
        part="urza",
        service_name="esper.urza.v1.UrzaService",
        servicer=UrzaServicer(lib),
        add_to_server=rpc.add_UrzaServiceServicer_to_server,
        write_methods=frozenset({"PutBlueprint", "PutKernel", "RecordOutcome"}),
        on_stop=on_stop,
    )
