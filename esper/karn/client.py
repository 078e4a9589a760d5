"""The public Karn client (blocking): ask for new blueprints, from a script or the CLI.

    with KarnClient("127.0.0.1:50051", api_key=key) as karn:
        resp = karn.propose_blueprints(site_signature("NCL", 8, [40]), 4, timeout_s=300.0)

Calls go through `esper.runtime.client.sync_channel` (API key, W3C trace context, client
spans, UNAVAILABLE retried inside the deadline); failures are `esper.errors` types. A
ProposeBlueprints carries a request_id, so a retry (by the channel, or by the caller with
the same `request_id`) gets Karn's first answer instead of a second round of proposals.
"""

from __future__ import annotations

import uuid
from typing import Self

import grpc

from esper.errors import FailedPreconditionError
from esper.runtime.client import as_esper_error, sync_channel
from esper.runtime.spec import PlatformContext
from generated.esper.common.v1 import seed_pb2
from generated.esper.karn.v1 import karn_service_pb2 as pb
from generated.esper.karn.v1 import karn_service_pb2_grpc as rpc


class KarnClient:
    """Blocking client for `esper.karn.v1.KarnService`; thread-safe."""

    def __init__(self, target: str, api_key: str | None = None, *,
                 channel: grpc.Channel | None = None) -> None:
        self.target = target
        self._channel = channel or sync_channel(target, api_key=api_key, default_timeout_s=None)
        self._stub = rpc.KarnServiceStub(self._channel)

    @classmethod
    def from_context(cls, ctx: PlatformContext, caller: str) -> KarnClient:
        """The client a service (`caller`) uses for the Karn in its platform context.

        Raises:
            FailedPreconditionError: the context has no "karn" endpoint.
        """
        if "karn" not in ctx.endpoints:
            raise FailedPreconditionError(f"{caller} needs Karn: no 'karn' endpoint in the context")
        return cls(ctx.endpoints["karn"], api_key=ctx.api_key)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def propose_blueprints(self, site: seed_pb2.SiteSignature, count: int, timeout_s: float, *,
                           seed: int = 0, request_id: str | None = None
                           ) -> pb.ProposeBlueprintsResponse:
        """Up to `count` children of Urza's blueprints that compile at `site`, each accepted
        (stored in Urza, with its kernel) or rejected with the reason.

        Raises:
            InvalidArgumentError: a bad site or count (1..64), or a request_id reused for
                another request.
            FailedPreconditionError: Urza holds no blueprint supporting the site.
            UnavailableError / DeadlineExceededError: Karn, Urza or Tezzeret cannot answer.
        """
        req = pb.ProposeBlueprintsRequest(request_id=request_id or str(uuid.uuid4()),
                                          count=count, site=site, seed=seed)
        try:
            return self._stub.ProposeBlueprints(req, timeout=timeout_s)
        except grpc.RpcError as e:
            raise as_esper_error(e) from e


__all__ = ["KarnClient"]
