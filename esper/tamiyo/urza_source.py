"""Kernel candidates from Urza (`QueryKernels` by site, best recorded outcomes first).

Uses the platform's `esper.urza.client.UrzaClient` (retries inside the deadline, a circuit
breaker, API key and trace context on every call). It is a blocking client, so each query
runs in a worker thread and the event loop keeps serving other Decides meanwhile.
"""

from __future__ import annotations

import asyncio

from esper.tamiyo.policy import KernelCandidate
from esper.urza.client import UrzaClient
from generated.esper.common.v1 import seed_pb2


class UrzaCandidateSource:
    """Asks Urza for the kernels compiled for a site."""

    def __init__(self, target: str, api_key: str | None, *, client: UrzaClient | None = None) -> None:
        self.target = target
        self.client = client or UrzaClient(target, api_key=api_key)

    async def query(
        self, site: seed_pb2.SiteSignature, *, max_parameters: int, limit: int, timeout_s: float
    ) -> list[KernelCandidate]:
        records, _ = await asyncio.to_thread(
            self.client.query_kernels, timeout_s, site=site, max_parameters=max_parameters, page_size=limit
        )
        return [KernelCandidate.from_record(r) for r in records]

    async def close(self) -> None:
        self.client.close()
