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

import grpc

from esper.runtime.client import PartClient
from generated.esper.common.v1 import seed_pb2
from generated.esper.karn.v1 import karn_service_pb2 as pb
from generated.esper.karn.v1 import karn_service_pb2_grpc as rpc


class KarnClient(PartClient):
    """Blocking client for `esper.karn.v1.KarnService`; thread-safe."""

    part = "karn"

    def __init__(self, target: str, api_key: str | None = None, *,
                 channel: grpc.Channel | None = None) -> None:
        super().__init__(target, api_key, channel=channel)
        self._stub = rpc.KarnServiceStub(self._channel)

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
        return self._invoke(self._stub.ProposeBlueprints, req, timeout_s)


__all__ = ["KarnClient"]
