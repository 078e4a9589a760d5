"""UrzaService: the gRPC adapter over `esper.urza.library.UrzaLibrary`.

Errors are raised as `esper.errors` types and mapped to status codes by the runtime
host. Store and verification work runs in worker threads so one slow upload never
stalls the event loop that serves everyone else's downloads.

Beside the RPCs the service runs the orphan sweep (at start, then every
`orphan_sweep_interval_s`) and, where it runs in the main thread (`esper serve urza`,
`esper up`), reloads the trusted signer keys on SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from esper.errors import InvalidArgumentError
from esper.runtime.spec import PlatformContext, ServiceSpec
from esper.urza.blobs import Blobs, BlobStore
from esper.urza.config import MAX_CHUNK, MIN_CHUNK, UrzaConfig
from esper.urza.library import KernelUpload, TrustedKeySource, UrzaLibrary
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

    async def ListBlueprints(self, request: pb.ListBlueprintsRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListBlueprintsResponse:
        page = await asyncio.to_thread(
            lambda: self.lib.list_blueprint_page(
                family=request.family, tags=list(request.tags), layout=request.layout,
                page_size=request.page_size, page_token=request.page_token,
                include_retired=request.include_retired))
        return pb.ListBlueprintsResponse(blueprints=page.blueprints,
                                         next_page_token=page.next_page_token,
                                         retired_blueprint_ids=page.retired_ids)

    async def RetireBlueprint(self, request: pb.RetireBlueprintRequest,
                              context: grpc.aio.ServicerContext) -> pb.RetireBlueprintResponse:
        changed, retired = await asyncio.to_thread(
            self.lib.retire_blueprint, request.blueprint_id, reason=request.reason,
            restore=request.restore)
        return pb.RetireBlueprintResponse(changed=changed, retired=retired)

    async def DeleteBlueprint(self, request: pb.DeleteBlueprintRequest,
                              context: grpc.aio.ServicerContext) -> pb.DeleteBlueprintResponse:
        deleted, kernels, reports = await asyncio.to_thread(self.lib.delete_blueprint,
                                                            request.blueprint_id)
        return pb.DeleteBlueprintResponse(deleted=deleted, kernels_deleted=kernels,
                                          field_reports_deleted=reports)

    async def PutKernel(self, request_iterator: AsyncIterator[pb.PutKernelRequest],
                        context: grpc.aio.ServicerContext) -> pb.PutKernelResponse:
        upload: KernelUpload | None = None
        try:
            async for msg in request_iterator:
                part = msg.WhichOneof("part")
                if upload is None:
                    if part != "header":
                        raise InvalidArgumentError(
                            f"the first PutKernel message carries {part!r}; it must be the "
                            "header (request_id, total_size, artifact_sha256)", field="header")
                    upload = await asyncio.to_thread(self.lib.begin_upload,
                                                     msg.header.artifact_sha256,
                                                     msg.header.total_size)
                    continue
                if part != "chunk":
                    raise InvalidArgumentError(
                        "a second header arrived after the first; send one header, then "
                        "chunks", field="header")
                # The chunk is written (and hashed) off the event loop, then dropped: the
                # upload never accumulates in memory.
                await asyncio.to_thread(upload.write, msg.chunk)
            if upload is None:
                raise InvalidArgumentError(
                    "PutKernel stream was empty; send a header, then chunks", field="header")
            kernel_id, created = await asyncio.to_thread(upload.finish)
        finally:
            if upload is not None:
                upload.abort()  # refused, failed or cancelled: its temp file goes
        return pb.PutKernelResponse(kernel_id=kernel_id, created=created)

    async def GetKernel(self, request: pb.GetKernelRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GetKernelResponse]:
        kb = await asyncio.to_thread(self.lib.read_kernel, request.kernel_id, request.offset)
        yield pb.GetKernelResponse(info=kb.record)
        size = min(max(request.chunk_size or self.lib.config.chunk_size, MIN_CHUNK), MAX_CHUNK)
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
                page_size=request.page_size, page_token=request.page_token,
                include_retired=request.include_retired))
        return pb.QueryKernelsResponse(kernels=records, next_page_token=token)

    async def DeleteKernel(self, request: pb.DeleteKernelRequest,
                           context: grpc.aio.ServicerContext) -> pb.DeleteKernelResponse:
        deleted, reports = await asyncio.to_thread(self.lib.delete_kernel, request.kernel_id)
        return pb.DeleteKernelResponse(deleted=deleted, field_reports_deleted=reports)

    async def RecordOutcome(self, request: pb.RecordOutcomeRequest,
                            context: grpc.aio.ServicerContext) -> pb.RecordOutcomeResponse:
        created = await asyncio.to_thread(self.lib.record_outcome, request.report,
                                          request.request_id)
        return pb.RecordOutcomeResponse(created=created)

    async def DeleteFieldReports(self, request: pb.DeleteFieldReportsRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> pb.DeleteFieldReportsResponse:
        n = await asyncio.to_thread(self.lib.delete_field_reports, kernel_id=request.kernel_id,
                                    run_id=request.run_id)
        return pb.DeleteFieldReportsResponse(deleted=n)

    async def GetBlueprint(self, request: pb.GetBlueprintRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetBlueprintResponse:
        bp, row = await asyncio.to_thread(self.lib.blueprint_row, request.blueprint_id)
        resp = pb.GetBlueprintResponse(blueprint=bp, retired=row.retired_at is not None,
                                       retired_reason=row.retired_reason)
        if row.retired_at is not None:
            resp.retired_at.FromNanoseconds(int(row.retired_at * 1e9))
        return resp


def open_library(ctx: PlatformContext) -> UrzaLibrary:
    """Open Urza's stores as `ctx.settings["urza"]` says (see `UrzaConfig`)."""
    config = UrzaConfig.from_dict(dict(ctx.settings.get("urza", {})))
    part_dir = ctx.part_dir("urza")
    store = open_store(config.database_url or None, part_dir / "urza.db")
    blobs: Blobs
    if config.blob_url:
        try:
            blobs = S3BlobStore(config.blob_url, endpoint_url=config.s3_endpoint_url,
                                region=config.s3_region, staging_dir=part_dir / "uploads")
        except BaseException:
            store.close()
            raise
    else:
        # One Urza process owns its blob dir, so every temp file found at open is a crash
        # leftover and is swept at once.
        blobs = BlobStore(Path(config.blob_dir) if config.blob_dir else part_dir / "blobs")
    try:
        lib = UrzaLibrary(store, blobs, TrustedKeySource.from_config(config), config)
    except BaseException:
        store.close()
        blobs.close()
        raise
    log.info("urza: %s metadata (schema v%d), blobs in %s, %d trusted signer key(s)",
             store.backend, store.schema_version(), blobs.location, len(lib.trusted.keys))
    return lib


async def sweep_forever(lib: UrzaLibrary) -> None:
    """The orphan sweep at once, then every `orphan_sweep_interval_s` (0: once)."""
    while True:
        try:
            await asyncio.to_thread(lib.sweep_orphans)
        except Exception:  # a failed sweep (store unreachable) is retried later
            log.exception("urza: orphan sweep failed; retrying at the next interval")
        if not lib.config.orphan_sweep_interval_s:
            return
        await asyncio.sleep(lib.config.orphan_sweep_interval_s)


def create_service(ctx: PlatformContext) -> ServiceSpec:
    lib = open_library(ctx)
    tasks: list[asyncio.Task[None]] = []
    sighup: list[asyncio.AbstractEventLoop] = []

    async def on_start() -> None:
        loop = asyncio.get_running_loop()
        tasks.append(loop.create_task(sweep_forever(lib)))

        def reload_keys() -> None:
            log.info("urza: SIGHUP: re-reading the trusted signer keys")
            loop.run_in_executor(None, lib.trusted.reload)

        try:
            loop.add_signal_handler(signal.SIGHUP, reload_keys)
            sighup.append(loop)
        except (ValueError, RuntimeError, NotImplementedError):
            # Not the main thread (an embedded host, tests): the keys directory is still
            # looked at every trusted_keys_reload_s.
            log.debug("urza: no SIGHUP handler outside the main thread")

    async def on_stop() -> None:
        for loop in sighup:
            loop.remove_signal_handler(signal.SIGHUP)
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        lib.close()

    return ServiceSpec(
        part="urza",
        service_name="esper.urza.v1.UrzaService",
        servicer=UrzaServicer(lib),
        add_to_server=rpc.add_UrzaServiceServicer_to_server,
        write_methods=frozenset({"PutBlueprint", "RetireBlueprint", "DeleteBlueprint",
                                 "PutKernel", "DeleteKernel", "RecordOutcome",
                                 "DeleteFieldReports"}),
        on_start=on_start,
        on_stop=on_stop,
    )
