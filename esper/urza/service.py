"""UrzaService adapter. Its core is not built yet: every RPC answers UNIMPLEMENTED."""

from __future__ import annotations

from esper.runtime.spec import PlatformContext, ServiceSpec
from generated.esper.urza.v1 import urza_service_pb2_grpc as rpc


def create_service(ctx: PlatformContext) -> ServiceSpec:
    return ServiceSpec(
        part="urza",
        service_name="esper.urza.v1.UrzaService",
        servicer=rpc.UrzaServiceServicer(),
        add_to_server=rpc.add_UrzaServiceServicer_to_server,
    )
