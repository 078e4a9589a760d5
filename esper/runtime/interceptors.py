"""The server call pipeline, outermost stage first: observability → auth → validation → errors.

* observability: an OpenTelemetry SERVER span per call (parent from the caller's
  `traceparent`) when tracing is on, and one JSON log line per call with method, code,
  latency_ms and trace_id;
* auth: API key and scope check (UNAUTHENTICATED / PERMISSION_DENIED);
* validation: protovalidate on the request, or on each request of a client stream
  (INVALID_ARGUMENT with BadRequest field violations);
* errors: esper.errors → status codes with google.rpc.Status details, anything else
  → INTERNAL with the traceback logged; makes the inbound deadline visible to outbound
  calls (`inbound_deadline()`).

The four stages are composed into ONE wrapper per method, built once when the host
registers the service, instead of four `grpc.aio.ServerInterceptor` objects: grpc.aio
runs interceptors as a chain of Python coroutines per call, and four pass-through
interceptors alone cost ≈ 40% of a loopback round trip here (benchmarks/rpc_overhead.py
has the budget: ≤ 30% for the whole stack). The stages keep their order and meaning.
Only methods of hosted Esper services are wrapped; health and reflection are registered
as they are (and therefore open). Client-stream validation covers the request iterator a
servicer receives; a servicer that reads with `context.read()` instead bypasses it.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from esper import errors as E
from esper.runtime import tracing
from esper.runtime.auth import KeyChecker, key_from_metadata
from esper.runtime.errors import abort_with, as_esper_error, to_rich_status, trailing_metadata
from esper.runtime.logging import call_log
from esper.runtime.validation import check as validate_message

log = logging.getLogger("esper.runtime")

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


Handler = grpc.RpcMethodHandler


def _kind(h: Handler) -> str:
    return ("s" if h.request_streaming else "u") + ("s" if h.response_streaming else "u")


def _behavior(h: Handler) -> Callable[..., Any]:
    return {"uu": h.unary_unary, "us": h.unary_stream, "su": h.stream_unary, "ss": h.stream_stream}[_kind(h)]


def _with_behavior(h: Handler, fn: Callable[..., Any]) -> Handler:
    make = {
        "uu": grpc.unary_unary_rpc_method_handler,
        "us": grpc.unary_stream_rpc_method_handler,
        "su": grpc.stream_unary_rpc_method_handler,
        "ss": grpc.stream_stream_rpc_method_handler,
    }[_kind(h)]
    return make(fn, request_deserializer=h.request_deserializer, response_serializer=h.response_serializer)


async def _iterate(result: Any) -> AsyncIterator[Any]:
    """Responses of a streaming behaviour, whichever style it uses.

    An async generator is iterated; a coroutine (the reader/writer style, which writes
    with `context.write`) is awaited and yields nothing; a sync iterable is iterated.
    """
    if inspect.isawaitable(result):
        await result
        return
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
        return
    for item in result:
        yield item


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


@dataclass(kw_only=True)
class Pipeline:
    """What every wrapped method shares: the tracer, the key checker, in-flight counting."""

    checker: KeyChecker
    tracer: trace.Tracer | None = None
    on_enter: Callable[[], None] = _nothing
    on_leave: Callable[[], None] = _nothing

    # --- auth ---------------------------------------------------------------------------
    def authorize(self, metadata: Any, info: MethodInfo) -> E.EsperError | None:
        """The error that rejects this call, or None when its key and scope allow it."""
        if self.checker.disabled:
            return None
        key = key_from_metadata(metadata)
        if not key:
            return E.AuthError(f"{info.path} needs an API key: send it as 'x-api-key' metadata")
        scopes = self.checker.scopes_for(key)
        if scopes is None:
            return E.AuthError(f"the API key sent to {info.path} is not recognised")
        if not self.checker.allows(scopes, info.part, info.write):
            need = f"{info.part}:{'write' if info.write else 'read'}"
            return E.PermissionDeniedError(f"{info.path} needs scope '{need}'; the key grants {sorted(scopes)}")
        return None

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
        log.error("unexpected %s in %s", type(exc).__name__, path, exc_info=exc,
                  extra={"fields": {"method": path, "trace_id": tracing.current_trace_id()}})
        msg = f"internal error ({type(exc).__name__}) in {path}; the server log has the traceback"
        st = to_rich_status(exc, message=msg, code=grpc.StatusCode.INTERNAL)
        await context.abort(grpc.StatusCode.INTERNAL, msg, trailing_metadata(st))

    @staticmethod
    async def start_deadline(context: grpc.aio.ServicerContext, path: str) -> contextvars.Token[float | None] | None:
        remaining = context.time_remaining()
        if remaining is None:
            return None
        if remaining <= 0:
            await abort_with(context, E.DeadlineExceededError(f"{path}: deadline expired before the call started"))
        return _deadline.set(time.monotonic() + remaining)

    # --- observability ------------------------------------------------------------------
    def begin(self, metadata: Any, path: str) -> tuple[trace.Span | None, object, str]:
        self.on_enter()
        if self.tracer is None:
            return None, None, ""
        span = tracing.start_span(self.tracer, path, SpanKind.SERVER, tracing.extract(metadata))
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token, format(span.get_span_context().trace_id, "032x")

    def finish(self, context: grpc.aio.ServicerContext, path: str, span: trace.Span | None, token: object,
               trace_id: str, t0: float, code: str | None) -> None:
        self.on_leave()
        code = code or _code_name(context)
        latency_ms = round((time.perf_counter() - t0) * 1000.0, 3)
        if span is not None:
            otel_context.detach(token)  # type: ignore[arg-type]
            tracing.end_span(span, code)
        call_log.emit(path, code, latency_ms, trace_id)

    # --- composition --------------------------------------------------------------------
    def wrap(self, h: Handler, info: MethodInfo) -> Handler:
        """`h` with every stage around it; called once per method at registration."""
        inner = _behavior(h)
        path = info.path
        authorize, fail, start_deadline = self.authorize, self.fail, self.start_deadline
        begin, finish = self.begin, self.finish

        async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            # Raised inside the servicer's iteration, so the errors stage maps it.
            async for msg in requests:
                validate_message(msg)
                yield msg

        async def admit(request: Any, context: grpc.aio.ServicerContext, metadata: Any) -> Any:
            """Auth, then validation of a unary request; returns what the servicer gets."""
            denied = authorize(metadata, info)
            if denied is not None:
                await abort_with(context, denied)
            if h.request_streaming:
                return checked(request)
            try:
                validate_message(request)
            except E.InvalidArgumentError as e:
                await abort_with(context, e)
            return request

        if h.response_streaming:
            async def stream_behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                t0 = time.perf_counter()
                metadata = context.invocation_metadata()
                span, token, trace_id = begin(metadata, path)
                code: str | None = None
                try:
                    request = await admit(request, context, metadata)
                    deadline_token = await start_deadline(context, path)
                    try:
                        async for item in _iterate(inner(request, context)):
                            yield item
                    except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
                        raise
                    except Exception as e:  # noqa: BLE001 - every other failure becomes a status, never UNKNOWN
                        await fail(context, path, e)
                    finally:
                        if deadline_token is not None:
                            _deadline.reset(deadline_token)
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                finally:
                    finish(context, path, span, token, trace_id, t0, code)

            return _with_behavior(h, stream_behavior)

        async def unary_behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            metadata = context.invocation_metadata()
            span, token, trace_id = begin(metadata, path)
            code: str | None = None
            try:
                request = await admit(request, context, metadata)
                deadline_token = await start_deadline(context, path)
                try:
                    result = inner(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                    return result
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as e:  # noqa: BLE001 - every other failure becomes a status, never UNKNOWN
                    await fail(context, path, e)
                finally:
                    if deadline_token is not None:
                        _deadline.reset(deadline_token)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                finish(context, path, span, token, trace_id, t0, code)

        return _with_behavior(h, unary_behavior)
