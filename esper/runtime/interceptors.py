"""The server call pipeline, outermost stage first: observability → auth → decoding →
validation → errors.

* observability: an OpenTelemetry SERVER span per call (parent from the caller's
  `traceparent`) when tracing is on, and exactly one access-log line per call, whatever
  its outcome, with method, code, latency_ms, trace_id and key_id (never the key);
* auth: API key and scope check on the call's metadata (UNAUTHENTICATED /
  PERMISSION_DENIED) BEFORE a byte of the request is decoded;
* decoding: the host registers every method with no request deserializer, so the
  request arrives as bytes and is parsed here, after auth. Bytes that are no message of
  the request type are INVALID_ARGUMENT (reason REQUEST_UNDECODABLE, a BadRequest) with
  one rate-limited warning, never UNKNOWN with a traceback (which is what grpc.aio
  answers when its own deserializer raises); each message of a client stream likewise;
* validation: protovalidate on the request, or on each request of a client stream
  (INVALID_ARGUMENT with BadRequest field violations); `request_id` UUIDs are then
  lower-cased, so an idempotency key means the same in any case;
* errors: esper.errors → status codes with google.rpc.Status details, anything else
  → INTERNAL with the traceback logged; makes the inbound deadline visible to outbound
  calls (`inbound_deadline()`).

The stages are composed into ONE wrapper per method, built once when the host
registers the service, instead of `grpc.aio.ServerInterceptor` objects: grpc.aio runs
interceptors as a chain of Python coroutines per call, and four pass-through
interceptors alone cost ≈ 40% of a loopback round trip here (benchmarks/rpc_overhead.py
has the budget: ≤ 30% for the whole stack).

Server-streaming methods are served with the reader/writer API (`context.write`) from
one coroutine, not as an async generator: grpc.aio leaves a generator whose client
cancelled it to the garbage collector, whose finaliser then runs the generator's
`finally` in another task and context ("Task exception was never retrieved"). Here the
servicer's generator is closed in the call's own task.

Open methods (health, reflection) get the observability and decoding stages only.
Client-stream decoding and validation cover the request iterator a servicer receives;
a servicer that reads with `context.read()` instead gets raw bytes.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from esper import errors as E
from esper.runtime import tracing
from esper.runtime.auth import KeyChecker, key_from_metadata
from esper.runtime.errors import (
    RequestDecodeError,
    abort_with,
    as_esper_error,
    current_method,
    to_rich_status,
    trailing_metadata,
)
from esper.runtime.logging import RateLimitedLog, call_log, json_safe
from esper.runtime.validation import check as validate_message

log = logging.getLogger("esper.runtime")
undecodable_log = RateLimitedLog(log, burst=10, window_s=60.0)
"""Warnings about undecodable requests: at most 10 a minute per process, the rest counted."""

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("esper_inbound_deadline", default=None)


def inbound_deadline() -> float | None:
    """`time.monotonic()` instant at which the call being served expires (None: no deadline)."""
    return _deadline.get()


@dataclass(frozen=True, slots=True)
class MethodInfo:
    part: str
    path: str
    """"/esper.urza.v1.UrzaService/GetBlueprint"."""
    write: bool
    client_streaming: bool
    server_streaming: bool
    open: bool = False
    """No key needed and no protovalidate (health, reflection)."""
    request_ids: tuple[tuple[str, ...], ...] = field(default=())
    """Paths of the request's `request_id` fields, lower-cased after validation."""


def request_id_paths(desc: Descriptor, depth: int = 2) -> tuple[tuple[str, ...], ...]:
    """Paths (field names) of string fields named `request_id`, through singular messages.

    PutKernelRequest → (("header", "request_id"),); StartRunRequest → (("request_id",),).
    """
    out: list[tuple[str, ...]] = []
    for f in desc.fields:
        if f.is_repeated:
            continue
        if f.name == "request_id" and f.type == FieldDescriptor.TYPE_STRING:
            out.append((f.name,))
        elif f.type == FieldDescriptor.TYPE_MESSAGE and depth > 1 and f.message_type.full_name.startswith("esper."):
            out += [(f.name, *p) for p in request_id_paths(f.message_type, depth - 1)]
    return tuple(out)


def _canonical_request_ids(msg: Message, paths: tuple[tuple[str, ...], ...]) -> None:
    for path in paths:
        m = msg
        for name in path[:-1]:
            if not m.HasField(name):
                break
            m = getattr(m, name)
        else:
            value = getattr(m, path[-1])
            if value:
                lowered = value.lower()
                if lowered != value:
                    setattr(m, path[-1], lowered)


Handler = grpc.RpcMethodHandler


def _kind(h: Handler) -> str:
    return ("s" if h.request_streaming else "u") + ("s" if h.response_streaming else "u")


def _behavior(h: Handler) -> Callable[..., Any]:
    return {"uu": h.unary_unary, "us": h.unary_stream, "su": h.stream_unary, "ss": h.stream_stream}[_kind(h)]


def _raw_handler(h: Handler, fn: Callable[..., Any]) -> Handler:
    """A handler of the same kind running `fn`, receiving request BYTES (no deserializer)."""
    make = {
        "uu": grpc.unary_unary_rpc_method_handler,
        "us": grpc.unary_stream_rpc_method_handler,
        "su": grpc.stream_unary_rpc_method_handler,
        "ss": grpc.stream_stream_rpc_method_handler,
    }[_kind(h)]
    return make(fn, request_deserializer=None, response_serializer=h.response_serializer)


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return _INT_CODES.get(code, str(code))


_INT_CODES = {c.value[0]: c.name for c in grpc.StatusCode}


def _nothing() -> None:
    return None


def _message_type(deserialize: Callable[[bytes], Any]) -> str:
    cls = getattr(deserialize, "__self__", None)
    desc = getattr(cls, "DESCRIPTOR", None)
    return desc.full_name if desc is not None else "request"


@dataclass(kw_only=True)
class Pipeline:
    """What every wrapped method shares: the tracer, the key checker, in-flight counting."""

    checker: KeyChecker
    tracer: trace.Tracer | None = None
    on_enter: Callable[[], None] = _nothing
    on_leave: Callable[[], None] = _nothing

    # --- auth ---------------------------------------------------------------------------
    def authorize(self, metadata: Any, info: MethodInfo) -> tuple[str, E.EsperError | None]:
        """(key id for the access log, the error that rejects this call or None)."""
        if info.open or self.checker.disabled:
            return "", None
        key = key_from_metadata(metadata)
        if not key:
            return "", E.AuthError(f"{info.path} needs an API key: send it as 'x-api-key' metadata "
                                   "(or 'authorization: Bearer <key>')", reason="API_KEY_MISSING",
                                   metadata={"header": "x-api-key"})
        found = self.checker.match(key)
        if found is None:
            return "unknown", E.AuthError(f"the API key sent to {info.path} is not recognised: "
                                          f"{self.checker.why_not(key)}", reason="API_KEY_INVALID")
        key_id, scopes = found
        if not self.checker.allows(scopes, info.part, info.write):
            need = f"{info.part}:{'write' if info.write else 'read'}"
            return key_id, E.PermissionDeniedError(
                f"{info.path} needs scope '{need}'; the key grants {sorted(scopes)}",
                reason="API_KEY_SCOPE_INSUFFICIENT",
                metadata={"requiredScope": need, "grantedScopes": ",".join(sorted(scopes)),
                          "keyId": key_id})
        return key_id, None

    # --- errors -------------------------------------------------------------------------
    @staticmethod
    async def fail(context: grpc.aio.ServicerContext, path: str, exc: Exception) -> None:
        """End the call with the status `exc` maps to; unexpected ones are INTERNAL and logged."""
        if isinstance(exc, grpc.RpcError) and not isinstance(exc, grpc.aio.AbortError):
            # A downstream call failed and the servicer let it through: keep its meaning.
            exc = as_esper_error(exc)
        if isinstance(exc, NotImplementedError):
            await abort_with(context, exc, f"{path} is not implemented yet ({exc or 'no core'})")
        if isinstance(exc, E.EsperError):
            await abort_with(context, exc)
        trace_id = tracing.current_trace_id()
        log.error("unexpected %s in %s", type(exc).__name__, path, exc_info=exc,
                  extra={"fields": {"method": path, "trace_id": trace_id}})
        msg = f"internal error ({type(exc).__name__}) in {path}; the server log has the traceback"
        st = to_rich_status(exc, message=msg, code=grpc.StatusCode.INTERNAL,
                            metadata={"exception": type(exc).__name__, **({"traceId": trace_id} if trace_id else {})})
        await context.abort(grpc.StatusCode.INTERNAL, msg, trailing_metadata(st))

    @staticmethod
    def start_deadline(context: grpc.aio.ServicerContext, path: str) -> contextvars.Token[float | None] | None:
        remaining = context.time_remaining()
        if remaining is None:
            return None
        if remaining <= 0:
            raise E.DeadlineExceededError(f"{path}: deadline expired before the call started",
                                          reason="DEADLINE_EXPIRED_ON_ARRIVAL")
        return _deadline.set(time.monotonic() + remaining)

    # --- observability ------------------------------------------------------------------
    def begin(self, metadata: Any, path: str, counted: bool = True) -> tuple[trace.Span | None, object, str]:
        """Start a call: in-flight count (`counted`: Esper methods, which shutdown drains),
        the method for error details, the SERVER span; returns (span, context token, trace id)."""
        if counted:
            self.on_enter()
        current_method.set(path)
        if self.tracer is None:
            return None, None, ""
        span = tracing.start_span(self.tracer, path, SpanKind.SERVER, tracing.extract(metadata))
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token, format(span.get_span_context().trace_id, "032x")

    def finish(self, context: grpc.aio.ServicerContext, path: str, span: trace.Span | None, token: object,
               trace_id: str, t0: float, code: str | None, key_id: str, counted: bool = True) -> None:
        if counted:
            self.on_leave()
        code = code or _code_name(context)
        latency_ms = round((time.perf_counter() - t0) * 1000.0, 3)
        if span is not None:
            otel_context.detach(token)  # type: ignore[arg-type]
            tracing.end_span(span, code)
        call_log.emit(path, code, latency_ms, trace_id, key_id)

    # --- composition --------------------------------------------------------------------
    def wrap(self, h: Handler, info: MethodInfo) -> Handler:
        """`h` with every stage around it, receiving raw bytes; called once per method at registration."""
        inner = _behavior(h)
        path = info.path
        deserialize = h.request_deserializer
        msg_type = _message_type(deserialize)
        validate = counted = not info.open
        ids = info.request_ids
        authorize, fail, start_deadline = self.authorize, self.fail, self.start_deadline
        begin, finish = self.begin, self.finish

        def decode(raw: bytes, key_id: str) -> Any:
            try:
                msg = deserialize(raw)
            except DecodeError as e:
                undecodable_log.warning("undecodable request", method=path, message_type=msg_type,
                                        size=len(raw), key_id=key_id, error=str(e)[:200])
                raise RequestDecodeError(
                    f"{path}: the request is not a serialized {msg_type} ({len(raw)} bytes: {e})",
                    message_type=msg_type, size=len(raw)) from None
            if validate:
                validate_message(msg)
                if ids:
                    _canonical_request_ids(msg, ids)
            return msg

        async def decoded(requests: AsyncIterator[bytes], key_id: str) -> AsyncIterator[Any]:
            # Raised inside the servicer's iteration, so the errors stage maps it.
            async for raw in requests:
                yield decode(raw, key_id)

        def admit(raw: Any, key_id: str) -> Any:
            return decoded(raw, key_id) if h.request_streaming else decode(raw, key_id)

        if h.response_streaming:
            async def stream_behavior(raw: Any, context: grpc.aio.ServicerContext) -> None:
                t0 = time.perf_counter()
                metadata = context.invocation_metadata()
                span, token, trace_id = begin(metadata, path, counted)
                code: str | None = None
                key_id = ""
                try:
                    key_id, denied = authorize(metadata, info)
                    if denied is not None:
                        raise denied
                    request = admit(raw, key_id)
                    deadline_token = start_deadline(context, path)
                    try:
                        result = inner(request, context)
                        if inspect.isawaitable(result):
                            await result  # reader/writer style: it wrote with context.write
                        elif hasattr(result, "__aiter__"):
                            try:
                                async for item in result:
                                    await context.write(item)
                            finally:
                                # Close the servicer's generator here, in this task, when
                                # the client went away mid-stream (see the module docstring).
                                aclose = getattr(result, "aclose", None)
                                if aclose is not None:
                                    await aclose()
                        else:
                            for item in result:
                                await context.write(item)
                    finally:
                        if deadline_token is not None:
                            _deadline.reset(deadline_token)
                except grpc.aio.AbortError:
                    raise
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                except Exception as e:  # noqa: BLE001 - every other failure becomes a status, never UNKNOWN
                    await fail(context, path, e)
                finally:
                    finish(context, path, span, token, trace_id, t0, code, key_id, counted)

            return _raw_handler(h, stream_behavior)

        async def unary_behavior(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            metadata = context.invocation_metadata()
            span, token, trace_id = begin(metadata, path, counted)
            code: str | None = None
            key_id = ""
            try:
                key_id, denied = authorize(metadata, info)
                if denied is not None:
                    raise denied
                request = admit(raw, key_id)
                deadline_token = start_deadline(context, path)
                try:
                    result = inner(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                    return result
                finally:
                    if deadline_token is not None:
                        _deadline.reset(deadline_token)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as e:  # noqa: BLE001 - every other failure becomes a status, never UNKNOWN
                await fail(context, path, e)
            finally:
                finish(context, path, span, token, trace_id, t0, code, key_id, counted)

        return _raw_handler(h, unary_behavior)

    def unknown_method(self) -> grpc.GenericRpcHandler:
        """A catch-all for paths no hosted service has: UNIMPLEMENTED, with an access-log line."""
        begin, finish = self.begin, self.finish

        class _Unknown(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> Handler:
                raw_path = details.method
                path = raw_path.decode("utf-8", "replace") if isinstance(raw_path, bytes) else str(raw_path)
                safe = json_safe(path)

                async def behavior(requests: Any, context: grpc.aio.ServicerContext) -> None:
                    t0 = time.perf_counter()
                    span, token, trace_id = begin(context.invocation_metadata(), safe, False)
                    try:
                        exc = E.EsperError(f"no method {safe!r} on this server; `grpcurl -plaintext "
                                           "<host:port> list` shows what it serves",
                                           reason="METHOD_UNKNOWN")
                        st = to_rich_status(exc, code=grpc.StatusCode.UNIMPLEMENTED)
                        await context.abort(grpc.StatusCode.UNIMPLEMENTED, st.message, trailing_metadata(st))
                    finally:
                        finish(context, safe, span, token, trace_id, t0, None, "", False)

                return grpc.stream_stream_rpc_method_handler(behavior)

        return _Unknown()
