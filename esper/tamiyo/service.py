"""TamiyoService adapter: decode the request, call `TamiyoController`, encode the reply.

Settings: `ctx.settings["tamiyo"]` (see `esper.tamiyo.config.TamiyoConfig`). Urza is reached
at `ctx.endpoints["urza"]`; without it the service still decides, but cannot germinate.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from google.protobuf import timestamp_pb2

from esper.errors import EsperError
from esper.runtime.errors import abort_with
from esper.runtime.spec import PlatformContext, ServiceSpec
from esper.tamiyo import candidates as caller_candidates
from esper.tamiyo.config import TamiyoConfig
from esper.tamiyo.controller import CandidateSource, TamiyoController
from esper.tamiyo.policy import Policy
from esper.tamiyo.registry import make_policy
from esper.tamiyo.reload import PolicyReloader, watched_files
from esper.tamiyo.urza_source import UrzaCandidateSource
from generated.esper.tamiyo.v1 import tamiyo_service_pb2 as pb
from generated.esper.tamiyo.v1 import tamiyo_service_pb2_grpc as rpc

log = logging.getLogger(__name__)


class TamiyoServicer(rpc.TamiyoServiceServicer):
    def __init__(self, controller: TamiyoController) -> None:
        self.controller = controller

    async def Decide(self, request: pb.DecideRequest, context: grpc.aio.ServicerContext) -> pb.DecideResponse:
        try:
            offered = (caller_candidates.from_proto(request.candidates, request.snapshot)
                       if request.HasField("candidates") else None)
            result = await self.controller.decide(
                request.snapshot,
                request_id=request.request_id,
                allowed_blueprints=list(request.allowed_blueprints),
                time_remaining_s=context.time_remaining(),
                candidates=offered,
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
        settings = c.policy.settings()
        if c.reload_error:
            settings["reload_error"] = c.reload_error
        return pb.GetPolicyInfoResponse(
            policy=c.policy.name,
            policy_version=c.policy.version,
            loaded_at=loaded,
            settings=settings,
            fallback_policy=getattr(c.policy, "fallback_name", ""),
        )


def build_controller(ctx: PlatformContext, *, source: CandidateSource | None = None) -> TamiyoController:
    """The controller `ctx` describes; `source` overrides the Urza client (tests, embedding)."""
    config = TamiyoConfig.from_dict(ctx.settings.get("tamiyo", {}))
    if source is None and "urza" in ctx.endpoints:
        source = UrzaCandidateSource(ctx.endpoints["urza"], ctx.api_key)
    if source is None:
        log.warning("tamiyo: no Urza endpoint in the platform context; decisions cannot germinate")
    return TamiyoController(make_policy(config, data_dir=ctx.data_dir), source, config)


def _reload_gnn(config: TamiyoConfig, controller: TamiyoController, data_dir: Path) -> Policy:
    """A freshly verified GNN policy (signature, pin, shapes) that keeps the serving policy's
    heuristic (and its history)."""
    policy = make_policy(config, data_dir=data_dir)
    old_fallback = getattr(controller.policy, "fallback", None)
    if old_fallback is not None:
        policy.fallback = old_fallback  # type: ignore[attr-defined]
    return policy


def create_service(ctx: PlatformContext) -> ServiceSpec:
    controller = build_controller(ctx)
    source = controller.source
    config = controller.config
    reloader: PolicyReloader | None = None
    if config.policy == "gnn" and config.reload_check_s > 0:
        reloader = PolicyReloader(
            controller,
            watched_files(str(config.gnn.get("policy_file", ""))),
            lambda: _reload_gnn(config, controller, ctx.data_dir),
            every_s=config.reload_check_s,
        )

    async def on_start() -> None:
        if reloader is not None:
            reloader.start()

    async def on_stop() -> None:
        if reloader is not None:
            await reloader.stop()
        if isinstance(source, UrzaCandidateSource):
            await source.close()

    return ServiceSpec(
        part="tamiyo",
        service_name="esper.tamiyo.v1.TamiyoService",
        servicer=TamiyoServicer(controller),
        add_to_server=rpc.add_TamiyoServiceServicer_to_server,
        on_start=on_start,
        on_stop=on_stop,
    )
