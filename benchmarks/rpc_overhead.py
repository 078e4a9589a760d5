"""What Esper's interceptor stack costs per unary call, against a bare grpc.aio server.

Both servers host the same UrzaService servicer (GetBlueprint answers from a dict) in
this process; both clients run on the same event loop. "bare" is grpc.aio with no
interceptors and a plain channel. "esper" is `esper.runtime.host.Host` (auth with an API
key, protovalidate, error mapping, a JSON log line per call, an OpenTelemetry SERVER
span) called through `esper.runtime.client.channel` (API key, CLIENT span, trace context
in metadata, retry service config), with spans exported over OTLP/gRPC to a collector in
a separate process (tests/otlp_receiver.py). Call logs are formatted and written to
/dev/null, so their cost is counted.

Blocks of 50 calls alternate between the servers so drift on a shared machine hits all
alike. A third row, the Esper host and channel with tracing off, splits the cost.

    .venv/bin/python benchmarks/rpc_overhead.py [--calls 1000] [--rounds 3] [--trace-ratio 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc

from esper.runtime.spec import ServiceSpec
from generated.esper.common.v1 import blueprint_pb2
from generated.esper.urza.v1 import urza_service_pb2 as pb
from generated.esper.urza.v1 import urza_service_pb2_grpc as rpc

API_KEY = "bench-key-0123456789abcdef"
BLUEPRINT_ID = "bp-0123456789abcdef"


class Library(rpc.UrzaServiceServicer):
    def __init__(self) -> None:
        self._store = {BLUEPRINT_ID: blueprint_pb2.Blueprint(blueprint_id=BLUEPRINT_ID, family="residual_mlp")}

    async def GetBlueprint(self, request: pb.GetBlueprintRequest, context: grpc.aio.ServicerContext) -> pb.GetBlueprintResponse:
        return pb.GetBlueprintResponse(blueprint=self._store[request.blueprint_id])


def spec() -> ServiceSpec:
    return ServiceSpec(part="urza", service_name="esper.urza.v1.UrzaService", servicer=Library(),
                       add_to_server=rpc.add_UrzaServiceServicer_to_server)


async def timed(stub: rpc.UrzaServiceStub, n: int) -> list[float]:
    req = pb.GetBlueprintRequest(blueprint_id=BLUEPRINT_ID)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await stub.GetBlueprint(req, timeout=5.0)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(calls: int, rounds: int, warmup: int) -> dict[str, list[float]]:
    from esper.runtime.auth import AuthConfig
    from esper.runtime.client import channel
    from esper.runtime.host import Host, HostConfig

    bare = grpc.aio.server()
    s = spec()
    s.add_to_server(s.servicer, bare)
    bare_port = bare.add_insecure_port("127.0.0.1:0")
    await bare.start()

    auth = AuthConfig(keys={API_KEY: frozenset({"urza:read"})})
    host = Host([spec()], config=HostConfig(notice_s=0, grace_s=1), auth=auth)
    esper_port = await host.start()
    untraced = Host([spec()], config=HostConfig(notice_s=0, grace_s=1, tracing=False), auth=auth)
    untraced_port = await untraced.start()

    channels = {
        "bare": grpc.aio.insecure_channel(f"127.0.0.1:{bare_port}"),
        "untraced": channel(f"127.0.0.1:{untraced_port}", api_key=API_KEY, traced=False),
        # The server's whole stack with a plain (untraced) client: what one service costs.
        "server": channel(f"127.0.0.1:{esper_port}", api_key=API_KEY, traced=False),
        "esper": channel(f"127.0.0.1:{esper_port}", api_key=API_KEY),
    }
    stubs = {name: rpc.UrzaServiceStub(ch) for name, ch in channels.items()}
    for stub in stubs.values():
        await timed(stub, warmup)
    samples: dict[str, list[float]] = {name: [] for name in stubs}
    # Small alternating blocks: load from other processes on a shared machine comes and
    # goes within seconds, and must hit every variant alike.
    block = 50
    for _ in range(rounds):
        for _ in range(max(1, calls // block)):
            for name, stub in stubs.items():
                samples[name] += await timed(stub, block)
    for ch in channels.values():
        await ch.close()
    await bare.stop(0)
    await host.stop()
    await untraced.stop()
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000, help="calls per round per server")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--trace-ratio", type=float, default=1.0,
                    help="fraction of traces sampled (OTEL_TRACES_SAMPLER=parentbased_traceidratio); 1 = all")
    ns = ap.parse_args()
    if not 0 < ns.trace_ratio <= 1:
        ap.error(f"--trace-ratio must be in (0, 1], got {ns.trace_ratio}")

    collector = subprocess.Popen([sys.executable, str(ROOT / "tests/otlp_receiver.py")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert collector.stdout is not None
        port = int(collector.stdout.readline())
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
        os.environ["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
        os.environ.pop("OTEL_SDK_DISABLED", None)
        os.environ.pop("OTEL_TRACES_EXPORTER", None)
        if ns.trace_ratio < 1:
            os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
            os.environ["OTEL_TRACES_SAMPLER_ARG"] = str(ns.trace_ratio)
        else:
            os.environ.pop("OTEL_TRACES_SAMPLER", None)

        from esper.runtime import tracing
        from esper.runtime.logging import configure_logging

        with open(os.devnull, "w") as devnull:
            configure_logging("INFO", stream=devnull)
            samples = asyncio.run(run(ns.calls, ns.rounds, ns.warmup))
            tracing.force_flush()
            tracing.shutdown_tracing()
    finally:
        collector.send_signal(signal.SIGINT)
        _, err = collector.communicate(timeout=10)

    rows = [("bare grpc.aio", "bare"), ("esper, tracing off", "untraced"),
            ("esper server stack, untraced client", "server"),
            ("esper full (auth+validate+trace+log)", "esper")]
    b50, b99 = pct(samples["bare"], 0.5), pct(samples["bare"], 0.99)
    n = len(samples["bare"])
    print(f"unary GetBlueprint round trip on loopback, {n} calls per server "
          f"(alternating blocks of 50), one process, one event loop; traces sampled: {ns.trace_ratio:g}")
    print(f"{'server':<38}{'p50 µs':>9}{'p99 µs':>9}{'mean µs':>9}{'p50 ×':>7}{'p99 ×':>7}")
    for label, key in rows:
        xs = samples[key]
        p50, p99, mean = pct(xs, 0.5), pct(xs, 0.99), statistics.fmean(xs)
        print(f"{label:<38}{p50:>9.1f}{p99:>9.1f}{mean:>9.1f}{p50 / b50:>7.2f}{p99 / b99:>7.2f}")
    e50 = pct(samples["esper"], 0.5)
    s50 = pct(samples["server"], 0.5)
    print(f"server stack overhead at p50: {100 * (s50 / b50 - 1):+.1f}%; with the client's span "
          f"too (full): {100 * (e50 / b50 - 1):+.1f}% (target ≤ +30%)")
    print(f"collector: {err.strip().splitlines()[-1] if err.strip() else 'no report'}")


if __name__ == "__main__":
    main()
