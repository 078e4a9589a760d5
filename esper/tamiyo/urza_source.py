"""Kernel candidates from Urza over gRPC (`QueryKernels` by site, best recorded outcomes first)."""

from __future__ import annotations

import grpc

from esper.tamiyo.errors import as_esper_error
from esper.tamiyo.policy import KernelCandidate
from generated.esper.common.v1 import seed_pb2
from generated.esper.urza.v1 import urza_service_pb2 as pb
from generated.esper.urza.v1 import urza_service_pb2_grpc as rpc


class UrzaCandidateSource:
    """Asks Urza for the kernels compiled for a site; the channel opens on first use (inside the loop)."""

    def __init__(self, target: str, api_key: str | None) -> None:
        self.target = target
        self._metadata = (("x-api-key", api_key),) if api_key else ()
        self._channel: grpc.aio.Channel | None = None
        self._stub: rpc.UrzaServiceStub | None = None

    async def query(
        self, site: seed_pb2.SiteSignature, *, max_parameters: int, limit: int, timeout_s: float
    ) -> list[KernelCandidate]:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.target)
            self._stub = rpc.UrzaServiceStub(self._channel)
        req = pb.QueryKernelsRequest(site=site, page_size=limit, max_parameters=max_parameters)
        try:
            resp = await self._stub.QueryKernels(req, timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise as_esper_error(e, what=f"Urza QueryKernels at {self.target}") from e
        return [KernelCandidate.from_record(r) for r in resp.kernels]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None
