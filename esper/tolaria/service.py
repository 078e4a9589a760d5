"""TolariaService adapter. Its core is not built yet: every RPC answers UNIMPLEMENTED."""

from __future__ import annotations

from esper.runtime.spec import PlatformContext, ServiceSpec
from generated.esper.tolaria.v1 import tolaria_service_pb2_grpc as rpc


def create_service(ctx: PlatformContext) -> ServiceSpec:
    return ServiceSpec(
        part="tolaria",
        service_name="esper.tolaria.v1.TolariaService",
        servicer=rpc.TolariaServiceServicer(),
        add_to_server=rpc.add_TolariaServiceServicer_to_server,
    )
