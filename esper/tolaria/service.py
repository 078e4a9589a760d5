"""TolariaService: a thin gRPC adapter over the run store and the run supervisor.

Validation that protovalidate cannot express (the task, host and sites exist; no field
this build does not know) happens here and answers INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import unknown_fields
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import propagate

from esper.errors import InvalidArgumentError
from esper.runtime.spec import PlatformContext, ServiceSpec
from esper.tolaria.runs import RunStore
from esper.tolaria.supervisor import RunSupervisor, SupervisorConfig
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb
from generated.esper.tolaria.v1 import tolaria_service_pb2_grpc as rpc


def validate_run_config(msg: pb.RunConfig) -> None:
    """Check what the proto rules cannot: known fields, task, host and site names.

    Raises:
        InvalidArgumentError: `field` is the dotted path under the request ("config.sites[1]").
    """
    from esper.tolaria.config import RunConfig, RunConfigError
    from esper.tolaria.tasks import get_task, resolve_sites

    _reject_unknown_fields(msg, "config")
    try:
        cfg = RunConfig.from_proto(msg)
        task = get_task(cfg.task)
        host = task.host(cfg.host)
        if cfg.sites:
            resolve_sites(host.build(cfg.width), cfg.sites)
    except RunConfigError as e:
        raise InvalidArgumentError(str(e), field=f"config.{e.field}") from e


def _reject_unknown_fields(msg, path: str) -> None:
    """A field this build does not know would be silently dropped: refuse it instead."""
    unknown = unknown_fields.UnknownFieldSet(msg)
    if len(unknown):
        numbers = sorted({f.field_number for f in unknown})
        raise InvalidArgumentError(
            f"{path} has field number(s) {numbers} that this Tolaria does not know "
            f"(a newer client?); known fields: {', '.join(f.name for f in msg.DESCRIPTOR.fields)}",
            field=f"{path}.{numbers[0]}",
        )
    for fd, value in msg.ListFields():
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        if fd.is_repeated:
            for i, item in enumerate(value):
                _reject_unknown_fields(item, f"{path}.{fd.name}[{i}]")
        elif fd.message_type.full_name.startswith("esper."):
            _reject_unknown_fields(value, f"{path}.{fd.name}")


def _current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


class TolariaServicer(rpc.TolariaServiceServicer):
    def __init__(self, supervisor: RunSupervisor) -> None:
        self.sup = supervisor

    async def StartRun(self, request: pb.StartRunRequest, context: grpc.aio.ServicerContext) -> pb.StartRunResponse:
        rec = await self.sup.start_run(
            request.config, request_id=request.request_id or None, traceparent=_current_traceparent()
        )
        return pb.StartRunResponse(run=rec.to_proto())

    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.GetRunResponse:
        return pb.GetRunResponse(run=self.sup.get_run(request.run_id).to_proto())

    async def ListRuns(self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext) -> pb.ListRunsResponse:
        runs, token = self.sup.list_runs(
            page_size=request.page_size, page_token=request.page_token, state=request.state
        )
        return pb.ListRunsResponse(runs=[r.to_proto() for r in runs], next_page_token=token)

    async def WatchRun(
        self, request: pb.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchRunResponse]:
        async for env in self.sup.watch(request.run_id, request.from_sequence):
            yield pb.WatchRunResponse(event=env)

    async def StopRun(self, request: pb.StopRunRequest, context: grpc.aio.ServicerContext) -> pb.StopRunResponse:
        requested = Timestamp()
        requested.GetCurrentTime()
        rec = await self.sup.stop_run(request.run_id, request.reason)
        return pb.StopRunResponse(run=rec.to_proto(), requested_at=requested)


def create_service(ctx: PlatformContext) -> ServiceSpec:
    """Settings (``ctx.settings["tolaria"]``): ``supervisor`` (SupervisorConfig keys) and
    ``worker_args`` (extra worker command-line arguments, e.g. ``["--trusted-keys", path]``)."""
    settings = dict(ctx.settings.get("tolaria", {}))
    unknown = sorted(set(settings) - {"supervisor", "worker_args"})
    if unknown:
        raise InvalidArgumentError(
            f"unknown tolaria settings {unknown}; allowed: ['supervisor', 'worker_args']",
            field=f"settings.tolaria.{unknown[0]}",
        )
    sup_cfg = settings.get("supervisor", {})
    store = RunStore(ctx.part_dir("tolaria"))
    sup = RunSupervisor(
        store,
        endpoints=dict(ctx.endpoints),
        nats_url=ctx.nats_url,
        api_key=ctx.api_key,
        validate=validate_run_config,
        config=SupervisorConfig.from_dict(dict(sup_cfg)),
        worker_args=[str(a) for a in settings.get("worker_args", [])],
    )

    async def on_start() -> None:
        # Endpoints are final only once every part listens (ports may be 0 until then).
        sup.endpoints = dict(ctx.endpoints)
        await sup.resume_active()

    async def on_stop() -> None:
        await sup.close()
        store.close()

    return ServiceSpec(
        part="tolaria",
        service_name="esper.tolaria.v1.TolariaService",
        servicer=TolariaServicer(sup),
        add_to_server=rpc.add_TolariaServiceServicer_to_server,
        write_methods=frozenset({"StartRun", "StopRun"}),
        on_start=on_start,
        on_stop=on_stop,
    )

