"""Must hold: one trace connects StartRun → (worker) Decide → GetKernel, and the run's
NATS publishes carry that trace's context, as an OTLP receiver in the test sees them."""

from __future__ import annotations

import asyncio

import nats
import pytest

from esper.oona.subjects import run_events_filter
from esper.runtime import tracing
from tests.otlp_receiver import OtlpReceiver

from .conftest import tiny_config

pytestmark = pytest.mark.integration


@pytest.fixture
def otlp(monkeypatch):
    with OtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        tracing.shutdown_tracing()
        yield rx
        tracing.shutdown_tracing()


async def _traceparents(url: str, run_id: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(run_events_filter(run_id), durable="trace-test")
        msgs = await sub.fetch(1000, timeout=2.0)
        return [m.headers.get("traceparent", "") for m in msgs if m.headers]
    finally:
        await nc.close()


async def test_one_trace_from_start_run_to_decide_and_get_kernel(platform_factory, otlp):
    cfg = tiny_config(epochs=4)
    p = await platform_factory(cfg)
    run_id = await p.start_run(cfg)
    events = await p.watch(run_id, timeout=120)
    assert events[-1].run_state.state == "succeeded", p.worker_log(run_id)
    assert any(e.HasField("lifecycle") for e in events), "no seed germinated, so no GetKernel"

    def connected(spans) -> bool:
        server = {s.name for s in spans if s.kind == 2}
        return {"esper.tolaria.v1.TolariaService/StartRun", "esper.tamiyo.v1.TamiyoService/Decide",
                "esper.urza.v1.UrzaService/GetKernel"} <= server and any(
            s.service_name == "esper-tolaria-worker" and s.name == "tolaria.worker.run" for s in spans)

    spans = await asyncio.to_thread(otlp.wait_for, connected, 30.0)
    start = next(s for s in spans if s.name.endswith("TolariaService/StartRun") and s.kind == 2)
    trace = [s for s in spans if s.trace_id == start.trace_id]
    by_name = {}
    for s in trace:
        by_name.setdefault((s.service_name, s.name, s.kind), s)
    names = {(svc, n) for svc, n, _ in by_name}
    # The worker (its own process) continued StartRun's trace ...
    assert ("esper-tolaria-worker", "tolaria.worker.run") in names, sorted(names)
    run_span = by_name[("esper-tolaria-worker", "tolaria.worker.run", 1)]
    assert run_span.parent_span_id == start.span_id
    # ... called Tamiyo's Decide inside it (a CLIENT span per call, the server's span its child)
    decide = "esper.tamiyo.v1.TamiyoService/Decide"
    clients = {s.span_id for s in trace if s.name == decide and s.kind == 3
               and s.service_name == "esper-tolaria-worker"}
    servers = [s for s in trace if s.name == decide and s.kind == 2]
    assert clients and servers and all(s.parent_span_id in clients for s in servers), sorted(names)
    # ... and fetched the germinated kernel from Urza inside its tolaria.load_kernel span.
    loads = {s.span_id for s in trace if s.name == "tolaria.load_kernel"}
    fetches = [s for s in trace if s.name == "esper.urza.v1.UrzaService/GetKernel" and s.kind == 2]
    assert loads and fetches and all(s.parent_span_id in loads for s in fetches), sorted(names)
    # The bus: each published event carries a traceparent of the same trace.
    parents = await _traceparents(p.nats.url, run_id)
    assert parents and all(tp.split("-")[1] == start.trace_id for tp in parents), parents[:3]
