"""A small synchronous client for TamiyoService, as Tolaria uses it at epoch boundaries."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import grpc

from esper.runtime.breaker import CircuitBreaker
from esper.runtime.errors import as_esper_error
from generated.esper.common.v1 import health_pb2
from generated.esper.tamiyo.v1 import tamiyo_service_pb2 as pb
from generated.esper.tamiyo.v1 import tamiyo_service_pb2_grpc as rpc


class TamiyoClient:
    """`decide(snapshot, timeout_s)` over gRPC; failures raise esper errors.

    Args:
        target: "host:port" of the Tamiyo service.
        api_key: sent as "x-api-key" metadata (None: auth disabled).
        breaker: optional `esper.runtime.breaker.CircuitBreaker`; while it is open, calls
            raise `UnavailableError` without touching the network. Errors that are the
            caller's fault (bad argument) do not count as Tamiyo failures.
    """

    def __init__(self, target: str, api_key: str | None = None, breaker: CircuitBreaker | None = None) -> None:
        self.target = target
        self._metadata = (("x-api-key", api_key),) if api_key else ()
        self._channel = grpc.insecure_channel(target)
        self._stub = rpc.TamiyoServiceStub(self._channel)
        self.breaker = breaker

    def decide(
        self,
        snapshot: health_pb2.HealthSnapshot,
        timeout_s: float,
        *,
        request_id: str | None = None,
        allowed_blueprints: Sequence[str] = (),
    ) -> pb.DecideResponse:
        """One Decide within `timeout_s`; a fresh request_id unless the caller retries with its own."""
        req = pb.DecideRequest(
            request_id=request_id or str(uuid.uuid4()),
            snapshot=snapshot,
            allowed_blueprints=list(allowed_blueprints),
        )
        return self._call(self._stub.Decide, req, timeout_s)

    def policy_info(self, timeout_s: float = 1.0) -> pb.GetPolicyInfoResponse:
        return self._call(self._stub.GetPolicyInfo, pb.GetPolicyInfoRequest(), timeout_s)

    def _call(self, method: Any, req: Any, timeout_s: float) -> Any:
        if self.breaker is None:
            return self._invoke(method, req, timeout_s)
        with self.breaker.guard():
            return self._invoke(method, req, timeout_s)

    def _invoke(self, method: Any, req: Any, timeout_s: float) -> Any:
        try:
            return method(req, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise as_esper_error(e) from e

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TamiyoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
