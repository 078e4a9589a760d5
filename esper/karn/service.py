"""KarnService adapter. Its core is not built yet: every RPC answers UNIMPLEMENTED."""

from __future__ import annotations

from esper.runtime.spec import PlatformContext, ServiceSpec
from generated.esper.karn.v1 import karn_service_pb2_grpc as rpc


def create_service(ctx: PlatformContext) -> ServiceSpec:
    return ServiceSpec(
        part="karn",
        service_name="esper.karn.v1.KarnService",
        servicer=rpc.KarnServiceServicer(),
        add_to_server=rpc.add_KarnServiceServicer_to_server,
    )
