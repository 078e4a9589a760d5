"""TamiyoService adapter. Its core is not built yet: every RPC answers UNIMPLEMENTED."""

from __future__ import annotations

from esper.runtime.spec import PlatformContext, ServiceSpec
from generated.esper.tamiyo.v1 import tamiyo_service_pb2_grpc as rpc


def create_service(ctx: PlatformContext) -> ServiceSpec:
    return ServiceSpec(
        part="tamiyo",
        service_name="esper.tamiyo.v1.TamiyoService",
        servicer=rpc.TamiyoServiceServicer(),
        add_to_server=rpc.add_TamiyoServiceServicer_to_server,
    )
