"""The public Tezzeret client (blocking): compile on demand, from a run's worker, Karn, or
a script.

    with TezzeretClient("127.0.0.1:50051", api_key=key) as tezzeret:
        jobs, unsupported = tezzeret.ensure_kernels(site, timeout_s=30.0, wait=True)

Calls go through `esper.runtime.client.sync_channel` (API key, W3C trace context, client
spans, UNAVAILABLE retried inside the deadline, which is capped by what the request being
served has left); failures are `esper.errors` types. No circuit breaker: its callers ask
once per site (UrzaKernels) or per proposal (Karn), and treat a failure as that item's.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import grpc

from esper.runtime.client import PartClient
from generated.esper.common.v1 import blueprint_pb2, seed_pb2
from generated.esper.tezzeret.v1 import tezzeret_service_pb2 as pb
from generated.esper.tezzeret.v1 import tezzeret_service_pb2_grpc as rpc

DONE = frozenset({pb.COMPILE_JOB_STATE_SUCCEEDED, pb.COMPILE_JOB_STATE_FAILED})
"""Compile job states that will not change any more."""


class TezzeretClient(PartClient):
    """Blocking client for `esper.tezzeret.v1.TezzeretService`; thread-safe."""

    part = "tezzeret"

    def __init__(self, target: str, api_key: str | None = None, *,
                 channel: grpc.Channel | None = None) -> None:
        super().__init__(target, api_key, channel=channel)
        self._stub = rpc.TezzeretServiceStub(self._channel)

    def ensure_kernels(self, site: seed_pb2.SiteSignature, timeout_s: float, *,
                       blueprint_names: Sequence[str] = (), wait: bool = False
                       ) -> tuple[list[pb.CompileJob], list[str]]:
        """(jobs, unsupported blueprint names): one compile job per catalog blueprint that
        supports `site`; with `wait`, as they stand when they finished or the deadline neared.

        Raises:
            InvalidArgumentError: a name in `blueprint_names` is not in Tezzeret's catalog.
            UnavailableError / DeadlineExceededError: Tezzeret (or its Urza) cannot answer.
        """
        req = pb.EnsureKernelsRequest(request_id=str(uuid.uuid4()), site=site,
                                      blueprint_names=list(blueprint_names), wait=wait)
        resp = self._invoke(self._stub.EnsureKernels, req, timeout_s)
        return list(resp.jobs), list(resp.unsupported_blueprints)

    def compile(self, blueprint: str | blueprint_pb2.Blueprint, site: seed_pb2.SiteSignature,
                timeout_s: float, *, wait: bool = False, request_id: str | None = None
                ) -> pb.CompileJob:
        """The compile job of a blueprint (Urza's, by id; or inline, stored in Urza only
        once it compiled) at `site`; with `wait`, as it stands when it finished or the
        deadline came.

        Raises:
            InvalidArgumentError: the blueprint's IR is invalid for the site.
            FailedPreconditionError: it does not declare the site's layout.
            NotFoundError: Urza has no blueprint of that id.
            UnavailableError / DeadlineExceededError: Tezzeret (or its Urza) cannot answer.
        """
        req = pb.CompileRequest(request_id=request_id or str(uuid.uuid4()), site=site, wait=wait)
        if isinstance(blueprint, str):
            req.blueprint_id = blueprint
        else:
            req.blueprint.CopyFrom(blueprint)
        return self._invoke(self._stub.Compile, req, timeout_s).job

    def get_job(self, job_id: str, timeout_s: float) -> pb.CompileJob:
        return self._invoke(self._stub.GetCompileJob, pb.GetCompileJobRequest(job_id=job_id),
                          timeout_s).job


__all__ = ["DONE", "TezzeretClient"]
