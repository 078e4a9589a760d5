"""KarnService: the gRPC adapter over `KarnCore` (decode → core → encode).

What Karn does is in `esper.karn.core` (ProposeBlueprints: Urza's records → `Evolver` →
Tezzeret) and `esper.karn.evolve` (operators, selection, pre-flight); this module only
hosts it on the shared runtime, with Urza's and Tezzeret's clients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from esper.karn.config import KarnConfig
from esper.karn.core import Compile, KarnCore, RequestStore, tezzeret_compiler
from esper.karn.evolve import Operator
from esper.runtime.spec import PlatformContext, ServiceSpec
from esper.tezzeret.client import TezzeretClient
from esper.urza.client import UrzaClient, UrzaLibrary
from generated.esper.karn.v1 import karn_service_pb2 as pb
from generated.esper.karn.v1 import karn_service_pb2_grpc as rpc


class KarnServicer(rpc.KarnServiceServicer):
    def __init__(self, core: KarnCore) -> None:
        self.core = core

    async def ProposeBlueprints(self, request: pb.ProposeBlueprintsRequest, context: Any
                                ) -> pb.ProposeBlueprintsResponse:
        left = context.time_remaining() if context is not None else None
        return await self.core.propose(request, left)


def create_service(ctx: PlatformContext, *, urza: Callable[[], UrzaLibrary] | None = None,
                   compile: Compile | None = None,
                   mutations: Mapping[str, Operator] | None = None) -> ServiceSpec:
    """Karn hosted on the shared runtime.

    `urza`, `compile` and `mutations` replace the clients and the operator set (tests
    pass an operator that is meant to break validation).
    """
    config = KarnConfig.from_dict(ctx.settings.get("karn"))
    tezzeret = TezzeretClient.from_context(ctx, "karn") if compile is None else None
    store = RequestStore(ctx.part_dir("karn") / "requests.sqlite")
    core = KarnCore(urza or (lambda: UrzaClient.from_context(ctx, "karn")),
                    compile or tezzeret_compiler(tezzeret),  # type: ignore[arg-type]
                    config, store, mutations)

    async def on_stop() -> None:
        if tezzeret is not None:
            tezzeret.close()
        core.close()
        store.close()

    return ServiceSpec(
        part="karn",
        service_name="esper.karn.v1.KarnService",
        servicer=KarnServicer(core),
        add_to_server=rpc.add_KarnServiceServicer_to_server,
        write_methods=frozenset({"ProposeBlueprints"}),
        on_stop=on_stop,
    )


__all__ = ["KarnConfig", "KarnCore", "KarnServicer", "RequestStore", "create_service",
           "tezzeret_compiler"]
