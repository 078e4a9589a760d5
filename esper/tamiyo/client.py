"""Synchronous clients for TamiyoService.

* `TamiyoClient` — `decide(snapshot, timeout_s)` as Tolaria's worker uses it.
* `TamiyoController` — an `esper.grow` `Controller`: the grower's snapshot and kernel
  candidates go to `Decide` over gRPC, the decisions come back. Swap it for an in-process
  controller (`esper.grow.heuristic_controller()`) and nothing else in the loop changes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from esper.errors import ConfigError
from esper.runtime.breaker import BreakerConfig, CircuitBreaker
from esper.runtime.client import channel, sync_channel
from esper.runtime.errors import as_esper_error
from esper.tamiyo import candidates as caller_candidates
from esper.tamiyo.policy import KernelCandidate
from generated.esper.common.v1 import decision_pb2, health_pb2
from generated.esper.tamiyo.v1 import tamiyo_service_pb2 as pb
from generated.esper.tamiyo.v1 import tamiyo_service_pb2_grpc as rpc

CONTROL_BREAKER = BreakerConfig(
    failure_rate_threshold=50.0, window_size=4, minimum_calls=2, open_wait_s=3.0, half_open_calls=1
)
"""One call per epoch boundary: a short window, so a dead Tamiyo stops costing a whole
deadline per boundary after two misses; a half-open trial then finds out when it is back."""

# A restarted Tamiyo must be found again within a boundary or two: gRPC's default
# reconnect backoff grows to minutes.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


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


class TamiyoController:
    """`esper.grow` `Controller` over gRPC: `TamiyoService.Decide` with the caller's candidates.

    Args:
        target: "host:port" of the Tamiyo service.
        api_key: sent as "x-api-key" (None: the service runs without auth).
        timeout_s: deadline of one Decide, retries included (the channel retries
            UNAVAILABLE with jittered backoff inside it; one request id for all attempts,
            so a retried Decide is answered once).
        breaker: circuit breaker (default: opens after 2 failures of the last 4 calls,
            tries again after 3 s); while open, `decide` raises at once.
        allowed_blueprints: blueprint ids the service may choose (empty: any offered).
        uses_probes: whether the served policy reads `HealthSnapshot.probes` (the heuristic
            and the learned policy do): the grower then probes offered kernels at
            boundaries where Tamiyo wants to germinate and asks again. False for a
            service running the random or fixed baseline saves the probes' compute.

    `decide` raises typed `EsperError`s (`UnavailableError`, `DeadlineExceededError`,
    `AuthError`, `PermissionDeniedError`, `InvalidArgumentError`); the grower turns them
    into a degradation event and trains on. `last_response` is the last `DecideResponse`.

    Raises:
        ConfigError: a target that is not "host:port" or a timeout that is not > 0.
    """

    component = "tamiyo"

    def __init__(self, target: str, *, api_key: str | None = None, timeout_s: float = 1.0,
                 breaker: CircuitBreaker | None = None, allowed_blueprints: Sequence[str] = (),
                 uses_probes: bool = True) -> None:
        if not (isinstance(timeout_s, int | float) and timeout_s > 0):
            raise ConfigError(f"timeout_s={timeout_s!r} must be a number of seconds > 0")
        self.target = target
        self.timeout_s = float(timeout_s)
        self.allowed_blueprints = list(allowed_blueprints)
        self.uses_probes = bool(uses_probes)
        self.breaker = breaker or CircuitBreaker(f"tamiyo@{target}", CONTROL_BREAKER)
        self._channel = sync_channel(target, api_key=api_key, default_timeout_s=self.timeout_s,
                                     options=_CHANNEL_OPTIONS)
        self._stub = rpc.TamiyoServiceStub(self._channel)
        self.last_response: pb.DecideResponse | None = None
        self.last_latency_ms = 0.0

    def decide(self, snapshot: health_pb2.HealthSnapshot,
               candidates: Mapping[str, Sequence[KernelCandidate]]) -> list[decision_pb2.Decision]:
        """Tamiyo's decisions for this boundary, chosen among `candidates`."""
        req = pb.DecideRequest(
            request_id=str(uuid.uuid4()),
            snapshot=snapshot,
            allowed_blueprints=self.allowed_blueprints,
            candidates=caller_candidates.to_proto(candidates),
        )
        t0 = time.perf_counter()
        try:
            with self.breaker.guard():
                try:
                    resp = self._stub.Decide(req, timeout=self.timeout_s)
                except grpc.RpcError as e:
                    raise as_esper_error(e) from e
        finally:
            self.last_latency_ms = (time.perf_counter() - t0) * 1e3
        self.last_response = resp
        return list(resp.decisions)

    def policy_info(self, timeout_s: float | None = None) -> pb.GetPolicyInfoResponse:
        """Which policy the service runs (name, version, settings)."""
        try:
            return self._stub.GetPolicyInfo(pb.GetPolicyInfoRequest(),
                                            timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as e:
            raise as_esper_error(e) from e

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TamiyoController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTamiyoClient:
    """Tamiyo from an asyncio service (Tolaria's supervisor asks, at StartRun, which policy
    Tamiyo serves). Errors come back as `EsperError`s.

    Args:
        target: "host:port".
        api_key: a key with `tamiyo:read`.
        timeout_s: each call's deadline.
    """

    def __init__(self, target: str, *, api_key: str | None = None, timeout_s: float = 1.0) -> None:
        self._channel = channel(target, None, api_key=api_key, default_timeout_s=timeout_s)
        self._stub = rpc.TamiyoServiceStub(self._channel)

    async def policy_info(self) -> pb.GetPolicyInfoResponse:
        try:
            return await self._stub.GetPolicyInfo(pb.GetPolicyInfoRequest())
        except grpc.RpcError as e:
            raise as_esper_error(e) from None

    async def close(self) -> None:
        await self._channel.close()
