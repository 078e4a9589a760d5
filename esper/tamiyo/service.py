"""TamiyoService adapter: decode the request, call `TamiyoController`, encode the reply.

Settings: `ctx.settings["tamiyo"]` (see `esper.tamiyo.config.TamiyoConfig`). Urza is reached
at `ctx.endpoints["urza"]`; without it the service still decides, but cannot germinate.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import timestamp_pb2

from esper.errors import EsperError
from esper.runtime.errors import abort_with
from esper.runtime.spec import PlatformContext, ServiceSpec
from esper.tamiyo.config import TamiyoConfig
from esper.tamiyo.controller import CandidateSource, TamiyoController
from esper.tamiyo.registry import make_policy
from esper.tamiyo.urza_source import UrzaCandidateSource
from generated.esper.tamiyo.v1 import tamiyo_service_pb2 as pb
from generated.esper.tamiyo.v1 import tamiyo_service_pb2_grpc as rpc

log = logging.getLogger(__name__)


class TamiyoServicer(rpc.TamiyoServiceServicer):
    def __init__(self, controller: TamiyoController) -> None:
        self.controller = controller

    async def Decide(self, request: pb.DecideRequest, context: grpc.aio.ServicerContext) -> pb.DecideResponse:
        try:
            result = await self.controller.decide(
                request.snapshot,
                request_id=request.request_id,
                allowed_blueprints=list(request.allowed_blueprints),
                time_remaining_s=context.time_remaining(),
            )
        except EsperError as e:
            await abort_with(context, e)
        return pb.DecideResponse(
            decisions=result.decisions,
            policy=result.policy,
            policy_version=result.policy_version,
            latency_ms=result.latency_ms,
        )

    async def GetPolicyInfo(
        self, request: pb.GetPolicyInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPolicyInfoResponse:
        c = self.controller
        loaded = timestamp_pb2.Timestamp()
        loaded.FromNanoseconds(int(c.loaded_at * 1e9))
        return pb.GetPolicyInfoResponse(
            policy=c.policy.name,
            policy_version=c.policy.version,
            loaded_at=loaded,
            settings=c.policy.settings(),
            fallback_policy=getattr(c.policy, "fallback_name", ""),
        )


def build_controller(ctx: PlatformContext, *, source: CandidateSource | None = None) -> TamiyoController:
    """The controller `ctx` describes; `source` overrides the Urza client (tests, embedding)."""
    config = TamiyoConfig.from_dict(ctx.settings.get("tamiyo", {}))
    if source is None and "urza" in ctx.endpoints:
        source = UrzaCandidateSource(ctx.endpoints["urza"], ctx.api_key)
    if source is None:
        log.warning("tamiyo: no Urza endpoint in the platform context; decisions cannot germinate")
    return TamiyoController(make_policy(config), source, config)


def create_service(ctx: PlatformContext) -> ServiceSpec:
    controller = build_controller(ctx)
    source = controller.source

    async def on_stop() -> None:
        if isinstance(source, UrzaCandidateSource):
            await source.close()

    return ServiceSpec(
        part="tamiyo",
        service_name="esper.tamiyo.v1.TamiyoService",
        servicer=TamiyoServicer(controller),
        add_to_server=rpc.add_TamiyoServiceServicer_to_server,
        on_stop=on_stop,
    )
