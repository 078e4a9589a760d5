"""TezzeretService adapter. Its core is not built yet: every RPC answers UNIMPLEMENTED."""

from __future__ import annotations

from esper.runtime.spec import PlatformContext, ServiceSpec
from generated.esper.tezzeret.v1 import tezzeret_service_pb2_grpc as rpc


def create_service(ctx: PlatformContext) -> ServiceSpec:
    return ServiceSpec(
        part="tezzeret",
        service_name="esper.tezzeret.v1.TezzeretService",
        servicer=rpc.TezzeretServiceServicer(),
        add_to_server=rpc.add_TezzeretServiceServicer_to_server,
    )
