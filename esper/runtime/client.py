"""Channels to Esper services: API key, trace context, deadlines and retries built in.

    async with channel("urza", ctx) as ch:
        stub = urza_service_pb2_grpc.UrzaServiceStub(ch)
        try:
            resp = await stub.GetBlueprint(req, timeout=2.0)
        except grpc.RpcError as e:
            raise as_esper_error(e) from e

* `target_or_part` is a part name (looked up in `ctx.endpoints`) or "host:port".
* Every call carries `x-api-key` (when the context has a key) and W3C trace context;
  with tracing on, each call is a CLIENT span.
* Deadlines: a unary call without a timeout gets `default_timeout_s`; any call made while
  serving a request gets at most the time that request has left (deadline propagation).
  Streams get no default deadline (a watch may legitimately last hours).
* Retries: the channel's service config retries UNAVAILABLE only, at most 5 attempts with
  jittered exponential backoff, all inside the call's deadline.
* Load balancing: the service config asks for `round_robin`, so a target that resolves to
  several addresses (`dns:///urza-headless.esper.svc.cluster.local:50051`, a headless
  Service in deploy/k8s) spreads calls over every replica instead of pinning one HTTP/2
  connection; a single address behaves as before.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Self

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from esper.errors import ConfigError, FailedPreconditionError
from esper.runtime import tracing
from esper.runtime.errors import as_esper_error
from esper.runtime.interceptors import inbound_deadline
from esper.runtime.spec import PARTS, PlatformContext

__all__ = ["DEFAULT_TIMEOUT_S", "RETRY_POLICY", "EsperChannel", "PartClient", "as_esper_error",
           "channel", "propagate_trace_context", "resolve_target", "sync_channel"]

DEFAULT_TIMEOUT_S = 30.0
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 5,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
_SERVICE_CONFIG = json.dumps({"methodConfig": [{"name": [{}], "retryPolicy": RETRY_POLICY}],
                              "loadBalancingConfig": [{"round_robin": {}}]})
_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _SERVICE_CONFIG),
)


def resolve_target(target_or_part: str, ctx: PlatformContext | None) -> str:
    """"host:port" for a part name (from ctx.endpoints) or a target given as is.

    Raises:
        ConfigError: a part name with no endpoint in the context.
    """
    if target_or_part in PARTS:
        endpoints = ctx.endpoints if ctx is not None else {}
        if target_or_part not in endpoints:
            raise ConfigError(
                f"no endpoint for part {target_or_part!r}; known endpoints: {sorted(endpoints) or 'none'} "
                "(start it with `esper up` / `esper serve`, or pass 'host:port')"
            )
        return endpoints[target_or_part]
    if ":" not in target_or_part:
        raise ConfigError(f"target must be a part {list(PARTS)} or 'host:port', got {target_or_part!r}")
    return target_or_part


def _timeout(explicit: float | None, default: float | None) -> float | None:
    timeout = explicit if explicit is not None else default
    deadline = inbound_deadline()
    if deadline is not None:
        left = max(deadline - time.monotonic(), 0.0)
        timeout = left if timeout is None else min(timeout, left)
    return timeout


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


class _Outbound:
    """What both the aio and the sync interceptor add to a call."""

    def __init__(self, api_key: str | None, default_timeout_s: float | None, traced: bool = True) -> None:
        self.api_key = api_key
        self.default_timeout_s = default_timeout_s
        self.traced = traced

    def outgoing(self, method: str | bytes, metadata: Any, timeout: float | None,
                 unary: bool) -> tuple[list[tuple[str, str]], trace.Span | None, float | None]:
        """Metadata, CLIENT span (None when tracing is off) and timeout of one call."""
        md = list(metadata or ())
        if self.api_key is not None:
            md.append(("x-api-key", self.api_key))
        span = None
        t = tracing.tracer() if self.traced else None
        if t is not None:
            span = tracing.start_span(t, _method_name(method), SpanKind.CLIENT, None)
            tracing.inject(md, trace.set_span_in_context(span))
        elif trace.get_current_span().get_span_context().is_valid:
            # No exporter here, but keep the caller's trace connected downstream.
            tracing.inject(md)
        return md, span, _timeout(timeout, self.default_timeout_s if unary else None)


async def _end_when_done(span: trace.Span, call: Any) -> None:
    code = await call.code()
    tracing.end_span(span, code.name, await call.details() if code != grpc.StatusCode.OK else "")


class _TracedUnaryCall:
    """Awaits the real call, then ends its CLIENT span; everything else is the real call's."""

    __slots__ = ("_call", "_span")

    def __init__(self, call: Any, span: trace.Span) -> None:
        self._call = call
        self._span = span

    def __await__(self) -> Any:
        try:
            response = yield from self._call.__await__()
        except grpc.RpcError as e:
            tracing.end_span(self._span, e.code().name, e.details() or "")  # type: ignore[attr-defined]
            raise
        except BaseException:
            tracing.end_span(self._span, "CANCELLED")
            raise
        tracing.end_span(self._span, "OK")
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _MultiCallable:
    """One method of an Esper channel: adds key, trace context and deadline, then calls grpc."""

    __slots__ = ("_inner", "_method", "_outbound", "_unary")

    def __init__(self, inner: Any, method: str, outbound: _Outbound, unary: bool) -> None:
        self._inner = inner
        self._method = method
        self._outbound = outbound
        self._unary = unary

    def __call__(self, request: Any, *, timeout: float | None = None, metadata: Any = None,
                 credentials: Any = None, wait_for_ready: bool | None = None, compression: Any = None) -> Any:
        md, span, timeout = self._outbound.outgoing(self._method, metadata, timeout, self._unary)
        call = self._inner(request, timeout=timeout, metadata=md, credentials=credentials,
                           wait_for_ready=wait_for_ready, compression=compression)
        if span is None:
            return call
        if self._unary:
            return _TracedUnaryCall(call, span)
        call.add_done_callback(lambda c: asyncio.ensure_future(_end_when_done(span, c)))
        return call


class EsperChannel(grpc.aio.Channel):
    """A grpc.aio channel whose calls carry Esper's key, trace context and deadlines.

    It wraps each method's multicallable rather than using grpc.aio client interceptors:
    those run a chain of coroutines per call that cost more than the work they do here
    (benchmarks/rpc_overhead.py).
    """

    def __init__(self, inner: grpc.aio.Channel, outbound: _Outbound) -> None:
        self._inner = inner
        self._outbound = outbound

    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                    _registered_method: bool | None = False) -> Any:
        return _MultiCallable(self._inner.unary_unary(method, request_serializer, response_deserializer,
                                                      _registered_method), method, self._outbound, True)

    def unary_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: bool | None = False) -> Any:
        return _MultiCallable(self._inner.unary_stream(method, request_serializer, response_deserializer,
                                                       _registered_method), method, self._outbound, False)

    def stream_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                     _registered_method: bool | None = False) -> Any:
        return _MultiCallable(self._inner.stream_unary(method, request_serializer, response_deserializer,
                                                       _registered_method), method, self._outbound, False)

    def stream_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None,
                      _registered_method: bool | None = False) -> Any:
        return _MultiCallable(self._inner.stream_stream(method, request_serializer, response_deserializer,
                                                        _registered_method), method, self._outbound, False)

    async def __aenter__(self) -> EsperChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._inner.close()

    async def close(self, grace: float | None = None) -> None:
        await self._inner.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._inner.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._inner.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._inner.channel_ready()


def _end_sync(span: trace.Span, f: Any) -> None:
    code = f.code()
    tracing.end_span(span, code.name, (f.details() or "") if code != grpc.StatusCode.OK else "")


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, d: Any, metadata: list[tuple[str, str]], timeout: float | None) -> None:
        self.method = d.method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


class _SyncInterceptor(
    _Outbound,
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def _call(self, continuation: Any, details: Any, request: Any, unary: bool) -> Any:
        md, span, timeout = self.outgoing(details.method, details.metadata, details.timeout, unary)
        details = _SyncDetails(details, md, timeout)
        outcome = continuation(details, request)
        if span is not None:
            outcome.add_done_callback(lambda f: _end_sync(span, f))
        return outcome

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._call(continuation, details, request, True)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._call(continuation, details, request, False)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return self._call(continuation, details, request_iterator, False)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return self._call(continuation, details, request_iterator, False)


def channel(
    target_or_part: str,
    ctx: PlatformContext | None = None,
    *,
    api_key: str | None = None,
    default_timeout_s: float | None = DEFAULT_TIMEOUT_S,
    options: Sequence[tuple[str, Any]] = (),
    traced: bool = True,
) -> EsperChannel:
    """An aio channel to a part (or "host:port"); `api_key` overrides `ctx.api_key`.

    `traced=False` skips CLIENT spans on this channel (trace context is still forwarded).
    """
    target = resolve_target(target_or_part, ctx)
    key = api_key if api_key is not None else (ctx.api_key if ctx is not None else None)
    return EsperChannel(grpc.aio.insecure_channel(target, options=[*_OPTIONS, *options]),
                        _Outbound(key, default_timeout_s, traced))


def sync_channel(
    target_or_part: str,
    ctx: PlatformContext | None = None,
    *,
    api_key: str | None = None,
    default_timeout_s: float | None = DEFAULT_TIMEOUT_S,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A blocking channel with the same behaviour as `channel` (for threads and scripts)."""
    target = resolve_target(target_or_part, ctx)
    key = api_key if api_key is not None else (ctx.api_key if ctx is not None else None)
    ch = grpc.insecure_channel(target, options=[*_OPTIONS, *options])
    return grpc.intercept_channel(ch, _SyncInterceptor(key, default_timeout_s))


class _TraceContextOnly(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Puts the caller's W3C trace context in each call's metadata, and nothing else."""

    @staticmethod
    def _details(d: Any) -> grpc.ClientCallDetails:
        metadata = list(d.metadata or ())
        tracing.inject(metadata)
        return _SyncDetails(d, metadata, d.timeout)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


def propagate_trace_context(ch: grpc.Channel) -> grpc.Channel:
    """A blocking channel that only forwards the caller's trace context on each call.

    For a client that must keep its own channel (no service-config retries, its own
    deadline and key handling: `esper.urza.client`) yet keep the caller's trace connected
    downstream, so its calls do not start traces of their own.
    """
    return grpc.intercept_channel(ch, _TraceContextOnly())


class PartClient:
    """What every blocking client of a part shares (`<part>/client.py` subclasses it).

    A channel (by default `sync_channel`: API key, trace context, client spans, UNAVAILABLE
    retried inside each call's deadline), `from_context` for a service calling another part
    of its platform, `close` / `with`, and `_invoke`, which turns a `grpc.RpcError` into the
    one typed `esper.errors` error. Every method of a subclass takes `timeout_s`.
    """

    part: ClassVar[str] = ""
    """The part this client reaches ("urza", "tezzeret", ...)."""

    def __init__(self, target: str, api_key: str | None = None, *,
                 channel: grpc.Channel | None = None) -> None:
        self.target = target
        # Unary calls get the timeout each method passes; no default (a stream may be long).
        self._channel = channel or sync_channel(target, api_key=api_key, default_timeout_s=None)

    @classmethod
    def from_context(cls, ctx: PlatformContext, caller: str) -> Self:
        """The client a service (`caller`) uses for this part of its platform.

        Raises:
            FailedPreconditionError: the context has no endpoint for the part.
        """
        if cls.part not in ctx.endpoints:
            raise FailedPreconditionError(
                f"{caller} needs {cls.part.capitalize()}: no {cls.part!r} endpoint in the context")
        return cls(ctx.endpoints[cls.part], api_key=ctx.api_key)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _invoke(method: Any, request: Any, timeout_s: float) -> Any:
        try:
            return method(request, timeout=timeout_s)
        except grpc.RpcError as e:
            raise as_esper_error(e) from e
