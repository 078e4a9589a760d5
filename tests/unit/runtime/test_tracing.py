"""A call through the stack yields a CLIENT and a SERVER span of one trace, exported over OTLP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from esper.runtime import tracing
from esper.runtime.auth import AuthConfig
from esper.runtime.client import channel
from esper.runtime.host import Host, HostConfig
from esper.runtime.spec import ServiceSpec
from generated.esper.common.v1 import blueprint_pb2
from generated.esper.urza.v1 import urza_service_pb2 as pb
from generated.esper.urza.v1 import urza_service_pb2_grpc as rpc
from tests.otlp_receiver import OtlpReceiver

KEY = "trace-key-0123456789"
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR = 2


class Library(rpc.UrzaServiceServicer):
    async def GetBlueprint(self, request: pb.GetBlueprintRequest, context: grpc.aio.ServicerContext) -> pb.GetBlueprintResponse:
        return pb.GetBlueprintResponse(blueprint=blueprint_pb2.Blueprint(blueprint_id=request.blueprint_id))

    async def GetKernel(self, request: pb.GetKernelRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GetKernelResponse]:
        yield pb.GetKernelResponse(chunk=pb.KernelChunk(offset=0, data=b"abc"))


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        tracing.shutdown_tracing()
        monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
        monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "esper-test")
        yield rx
        tracing.shutdown_tracing()


def test_tracing_is_off_without_otel_configuration() -> None:
    cfg = tracing.TracingConfig.from_env("esper-x", {})
    assert cfg.exporter == "none"
    assert tracing.TracingConfig.from_env("esper-x", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}).exporter == "otlp"
    assert tracing.TracingConfig.from_env("esper-x", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
                                                      "OTEL_SDK_DISABLED": "true"}).exporter == "none"
    with pytest.raises(ValueError, match="zipkin"):
        tracing.TracingConfig.from_env("esper-x", {"OTEL_TRACES_EXPORTER": "zipkin"})


async def test_client_and_server_spans_share_one_trace(receiver: OtlpReceiver) -> None:
    spec = ServiceSpec(part="urza", service_name="esper.urza.v1.UrzaService", servicer=Library(),
                       add_to_server=rpc.add_UrzaServiceServicer_to_server)
    h = Host([spec], config=HostConfig(notice_s=0), auth=AuthConfig(keys={KEY: frozenset({"*"})}))
    port = await h.start()
    try:
        async with channel(f"127.0.0.1:{port}", api_key=KEY) as ch:
            stub = rpc.UrzaServiceStub(ch)
            await stub.GetBlueprint(pb.GetBlueprintRequest(blueprint_id="bp-0123456789abcdef"))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetBlueprint(pb.GetBlueprintRequest(blueprint_id="bad"))
            chunks = [m async for m in stub.GetKernel(pb.GetKernelRequest(kernel_id="sha256:" + "0" * 64))]
            assert len(chunks) == 1
    finally:
        await h.stop()
    assert tracing.force_flush()
    spans = receiver.wait_for(lambda s: len(s) >= 6, timeout=10)

    def pair(method: str, n: int) -> tuple[object, object]:
        named = [s for s in spans if s.name == f"esper.urza.v1.UrzaService/{method}"]
        client = [s for s in named if s.kind == CLIENT][n]
        # The n-th call's server span, chosen by call order (calls are sequential and spans
        # export as they end), not by the trace id the caller then asserts on.
        server = [s for s in named if s.kind == SERVER][n]
        return client, server

    client, server = pair("GetBlueprint", 0)
    assert client.trace_id == server.trace_id and len(client.trace_id) == 32
    assert server.parent_span_id == client.span_id  # the server continued the client's trace
    assert server.attributes["rpc.grpc.status_code"] == "OK"
    assert server.service_name == "esper-test"

    bad_client, bad_server = pair("GetBlueprint", 1)
    assert bad_client.trace_id != client.trace_id
    assert bad_server.attributes["rpc.grpc.status_code"] == "INVALID_ARGUMENT"
    assert bad_server.status_code == STATUS_ERROR and bad_client.status_code == STATUS_ERROR

    stream_client, stream_server = pair("GetKernel", 0)
    assert stream_server.parent_span_id == stream_client.span_id
