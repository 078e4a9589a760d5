"""An OTLP/gRPC trace collector for tests and benchmarks (Jaeger has no package here).

Implements `opentelemetry.proto.collector.trace.v1.TraceService/Export` and keeps every
span it receives:

    with OtlpReceiver() as rx:             # background thread, port picked by the OS
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = rx.endpoint
        ...
        spans = rx.wait_for(lambda s: len(s) >= 2, timeout=5)

or as a process: `python tests/otlp_receiver.py` prints its port on the first line of
stdout and counts spans until it is terminated.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    service_name: str
    name: str
    kind: int
    """opentelemetry.proto.trace.v1.Span.SpanKind value (2 = SERVER, 3 = CLIENT)."""
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, object]
    status_code: int


def _value(v: object) -> object:
    kind = v.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(v, kind) if kind else None


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: OtlpReceiver) -> None:
        self._sink = sink

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        got: list[ReceivedSpan] = []
        for rs in request.resource_spans:
            attrs = {a.key: _value(a.value) for a in rs.resource.attributes}
            service = str(attrs.get("service.name", ""))
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    got.append(ReceivedSpan(
                        service_name=service, name=sp.name, kind=sp.kind,
                        trace_id=sp.trace_id.hex(), span_id=sp.span_id.hex(),
                        parent_span_id=sp.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in sp.attributes},
                        status_code=sp.status.code,
                    ))
        self._sink._add(got)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """A gRPC server on 127.0.0.1 that stores exported spans."""

    def __init__(self, port: int = 0) -> None:
        self._spans: list[ReceivedSpan] = []
        self._cond = threading.Condition()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self.exports = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._cond:
            self._spans.extend(spans)
            self.exports += 1
            self._cond.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._spans)

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0) -> list[ReceivedSpan]:
        """Block until predicate(spans) holds; returns the spans. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"spans never satisfied the predicate; got {self._spans}")
                self._cond.wait(left)
            return list(self._spans)

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0).wait()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    rx = OtlpReceiver().start()
    print(rx.port, flush=True)
    try:
        rx._server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        print(f"received {len(rx.spans)} spans in {rx.exports} exports", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
