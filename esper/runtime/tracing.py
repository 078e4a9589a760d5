"""OpenTelemetry for Esper services and clients, configured by the standard OTEL_* variables.

Tracing is on when the environment asks for an exporter:
* `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` → off;
* `OTEL_TRACES_EXPORTER=otlp` (or `console`) → on;
* unset exporter → on iff `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
  is set. (The SDK's own default would export to localhost:4317 and log a failure per
  batch where no collector runs; Esper only exports where one was named.)
Spans go over OTLP/gRPC through a BatchSpanProcessor; the exporter reads its endpoint,
headers and `OTEL_EXPORTER_OTLP_INSECURE` from the environment itself. Trace context
travels in gRPC metadata as W3C `traceparent`/`tracestate`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import SpanKind, Status, StatusCode

log = logging.getLogger(__name__)

_EXPORTERS = ("otlp", "console", "none")


@dataclass(kw_only=True, frozen=True)
class TracingConfig:
    """Where spans go."""

    exporter: str
    """"otlp", "console" or "none"."""
    service_name: str
    """`service.name` resource attribute (OTEL_SERVICE_NAME overrides the default)."""

    def __post_init__(self) -> None:
        if self.exporter not in _EXPORTERS:
            raise ValueError(f"OTEL_TRACES_EXPORTER must be one of {_EXPORTERS}, got {self.exporter!r}")
        if not self.service_name:
            raise ValueError("tracing service_name must be non-empty")

    @classmethod
    def from_env(cls, default_service_name: str, env: Mapping[str, str] | None = None) -> TracingConfig:
        env = os.environ if env is None else env
        name = env.get("OTEL_SERVICE_NAME") or default_service_name
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls(exporter="none", service_name=name)
        exporters = [e.strip() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
        if exporters:
            if len(exporters) > 1:
                raise ValueError(f"OTEL_TRACES_EXPORTER: one exporter is supported, got {exporters}")
            return cls(exporter=exporters[0], service_name=name)
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return cls(exporter="otlp" if endpoint else "none", service_name=name)


_lock = threading.Lock()
_provider: object | None = None
_tracer: trace.Tracer | None = None


def setup_tracing(default_service_name: str, env: Mapping[str, str] | None = None) -> trace.Tracer | None:
    """Configure span export once per process; returns the tracer, or None when tracing is off.

    A second call returns the tracer of the first (one provider per process, as the OTel
    API requires); call `shutdown_tracing()` first to reconfigure (tests do).
    """
    global _provider, _tracer
    with _lock:
        if _tracer is not None:
            return _tracer
        cfg = TracingConfig.from_env(default_service_name, env)
        if cfg.exporter == "none":
            return None
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )

        provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name}))
        exporter: SpanExporter
        if cfg.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        _provider = provider
        _tracer = provider.get_tracer("esper.runtime")
        log.info("tracing on: exporter=%s service.name=%s", cfg.exporter, cfg.service_name)
        return _tracer


def tracer() -> trace.Tracer | None:
    """The configured tracer, or None when tracing is off."""
    return _tracer


def force_flush(timeout_ms: int = 5000) -> bool:
    provider = _provider
    return bool(provider.force_flush(timeout_ms)) if provider is not None else True  # type: ignore[attr-defined]


def shutdown_tracing() -> None:
    """Flush and stop the exporter; the next setup_tracing() configures afresh."""
    global _provider, _tracer
    with _lock:
        provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()  # type: ignore[attr-defined]


# --- propagation over gRPC metadata -------------------------------------------------------

class _MetadataGetter(Getter[Iterable[tuple[str, str | bytes]]]):
    def get(self, carrier: Iterable[tuple[str, str | bytes]], key: str) -> list[str] | None:
        vals = [v for k, v in carrier if k == key and isinstance(v, str)]
        return vals or None

    def keys(self, carrier: Iterable[tuple[str, str | bytes]]) -> list[str]:
        return [k for k, _ in carrier]


class _ListSetter(Setter[list[tuple[str, str]]]):
    def set(self, carrier: list[tuple[str, str]], key: str, value: str) -> None:
        carrier.append((key, value))


_GETTER = _MetadataGetter()
_SETTER = _ListSetter()


def extract(metadata: Iterable[tuple[str, str | bytes]] | None) -> otel_context.Context | None:
    """The caller's trace context from call metadata (None when it sent none)."""
    carrier = metadata or ()
    if not any(k == "traceparent" for k, _ in carrier):
        return None
    return propagate.extract(carrier, getter=_GETTER)


def inject(metadata: list[tuple[str, str]], context: otel_context.Context | None = None) -> None:
    propagate.inject(metadata, context=context, setter=_SETTER)


def split_method(method: str) -> tuple[str, str]:
    """"/pkg.Service/Method" → ("pkg.Service", "Method")."""
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def start_span(t: trace.Tracer, method: str, kind: SpanKind, parent: otel_context.Context | None) -> trace.Span:
    service, name = split_method(method)
    return t.start_span(
        f"{service}/{name}",
        context=parent,
        kind=kind,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )


def end_span(span: trace.Span, code_name: str, message: str = "") -> None:
    """Record the gRPC status on the span and end it (ERROR for anything but OK)."""
    span.set_attribute("rpc.grpc.status_code", code_name)
    if code_name != "OK":
        span.set_status(Status(StatusCode.ERROR, f"{code_name}: {message}" if message else code_name))
    span.end()


def current_trace_id() -> str:
    """Hex trace id of the active span ("" when none)."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
