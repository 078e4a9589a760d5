"""Many concurrent clients against the platform: throughput and latency under load.

    .venv/bin/python benchmarks/load.py [--duration 30] [--clients 200] [--client-procs 2]
                                        [--servers esper,bare] [--server-procs 1]

Each client loops over Decide (Tamiyo, whose heuristic asks Urza for kernels), GetKernel
(Urza, the whole artifact streamed) and QueryKernels (Urza), one call at a time, each
with a 5 s deadline, for `--duration` seconds; the clients are spread over
`--client-procs` processes (a plain grpc.aio client each, 8 channels per process).

Servers, measured one after the other on this machine:
* `esper`: the services as `esper up` hosts them — `esper up` itself as a subprocess
  (all five services on one port behind the runtime host: API keys, protovalidate,
  error mapping, an access-log line per call at the default INFO level, written to a
  file; plus its nats-server). `--server-procs N` runs N such processes behind one port
  (SO_REUSEPORT; the kernel spreads connections), sharing one data dir.
* `bare`: the same five servicers on a bare grpc.aio server (no auth, no validation,
  no error mapping, no access log), in one process: the baseline.

Before the clients start, one kernel is compiled for the snapshot's site through
Tezzeret, so Decide can germinate it and GetKernel/QueryKernels find it.

Prints a table per server: calls/s and p50/p99 latency per RPC and overall, and errors
by code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

API_KEY = "load-bench-key-0123456789abcdef"
CHANNELS_PER_PROC = 8
DEADLINE_S = 5.0
RPCS = ("Decide", "GetKernel", "QueryKernels")


# --- the servers -------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_serving(target: str, timeout: float = 180.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with grpc.insecure_channel(target) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{target} did not become SERVING within {timeout:.0f} s")


def _settings_env(data: Path) -> dict[str, str]:
    # The same settings for both servers, as `esper demo` runs `esper up`: Urza trusts the
    # keys Tezzeret publishes; Tezzeret benchmarks each compile only twice (only the seed
    # kernel is compiled; the load never compiles).
    keys = data / "trusted_keys"
    keys.mkdir(parents=True, exist_ok=True)
    return {"ESPER_TEZZERET_BENCHMARK_ITERS": "2", "ESPER_TRUSTED_KEYS_DIR": str(keys)}


def start_esper(data: Path, port: int, procs: int) -> list[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ESPER_"))}
    env.update({"ESPER_API_KEYS": f"{API_KEY}=*", "ESPER_API_KEY": API_KEY, "PYTHONPATH": str(ROOT),
                **_settings_env(data)})
    out = []
    for i in range(procs):
        cmd = [sys.executable, "-m", "esper.cli", "up", "--data-dir", str(data / "state"),
               "--base-port", str(port)]
        log = open(data / f"esper-up-{i}.log", "wb")  # noqa: SIM115 - closed with the process
        out.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return out


def serve_bare(data: Path, port: int) -> None:
    """The same servicers on a bare grpc.aio server (this process, until SIGTERM)."""
    import grpc

    from esper.runtime.cli import _create
    from esper.runtime.spec import PARTS, PlatformContext

    for k, v in _settings_env(data.parent).items():
        os.environ[k] = v
    from esper.runtime.config import PlatformConfig

    cfg = PlatformConfig.load(None)
    target = f"127.0.0.1:{port}"
    ctx = PlatformContext(data_dir=data, endpoints={p: target for p in PARTS}, api_key=API_KEY, nats_url=None,
                          settings={k: dict(v) for k, v in cfg.settings.items()})

    async def main() -> None:
        specs = [_create(part, ctx) for part in PARTS]
        server = grpc.aio.server()
        for spec in specs:
            spec.add_to_server(spec.servicer, server)
        from grpc_health.v1 import health_pb2_grpc
        from grpc_health.v1._async import HealthServicer

        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
        server.add_insecure_port(target)
        await server.start()
        for spec in specs:
            if spec.on_start is not None:
                await spec.on_start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(1)
        for spec in specs:
            if spec.on_stop is not None:
                await spec.on_stop()

    asyncio.run(main())


# --- seeding -----------------------------------------------------------------------------

def seed(target: str) -> dict[str, str]:
    """Compile one kernel for the site Decide's snapshot has; returns ids for the clients."""
    import grpc

    from esper.blueprints import builtin_blueprints
    from generated.esper.tezzeret.v1 import tezzeret_service_pb2 as tz
    from generated.esper.tezzeret.v1 import tezzeret_service_pb2_grpc as tz_rpc

    bp = next(b for b in builtin_blueprints() if b.name == "lowrank_adapter")
    with grpc.insecure_channel(target) as ch:
        job = tz_rpc.TezzeretServiceStub(ch).Compile(
            tz.CompileRequest(blueprint=bp, site=_site(), wait=True), timeout=300,
            metadata=(("x-api-key", API_KEY),)).job
    if job.state != tz.COMPILE_JOB_STATE_SUCCEEDED:
        raise SystemExit(f"seed compile failed: {job.error}")
    return {"kernel_id": job.kernel_id, "blueprint_id": job.blueprint_id}


def _site() -> Any:
    from generated.esper.common.v1 import seed_pb2

    return seed_pb2.SiteSignature(layout=seed_pb2.ACTIVATION_LAYOUT_NC, channels=64, dtype=seed_pb2.D_TYPE_FLOAT32)


# --- the clients -------------------------------------------------------------------------

def _snapshot(epoch: int) -> Any:
    from generated.esper.common.v1 import health_pb2, seed_pb2

    losses = [2.0, 1.2, 0.9, 0.80, 0.799, 0.7985, 0.7984][: max(1, min(7, epoch))]
    snap = health_pb2.HealthSnapshot(
        run_id="run-load", epoch=epoch, total_epochs=30, global_step=epoch * 100,
        train_loss_history=[v * 0.9 for v in losses], val_loss_history=losses,
        val_accuracy_history=[1 - v / 3 for v in losses], host_parameters=5000, total_parameters=5000,
        seeds_left=3, parameters_left=100_000, task="mnist1d")
    for i in range(4):
        snap.slots.add(slot_id=f"block{i}", stage=seed_pb2.SEED_STAGE_DORMANT, site=_site(), depth=i,
                       host_grad_norm=1.0 + i, finite=True, host_parameters=1000)
    return snap


async def _client_main(target: str, clients: int, duration: float, ids: dict[str, str], seed_: int,
                       rate: float, mix: tuple[str, ...] = RPCS) -> dict[str, Any]:
    import uuid

    import grpc

    from generated.esper.tamiyo.v1 import tamiyo_service_pb2 as tpb
    from generated.esper.tamiyo.v1 import tamiyo_service_pb2_grpc as trpc
    from generated.esper.urza.v1 import urza_service_pb2 as upb
    from generated.esper.urza.v1 import urza_service_pb2_grpc as urpc

    md = (("x-api-key", API_KEY),)
    channels = [grpc.aio.insecure_channel(target) for _ in range(CHANNELS_PER_PROC)]
    tamiyo = [trpc.TamiyoServiceStub(c) for c in channels]
    urza = [urpc.UrzaServiceStub(c) for c in channels]
    for c in channels:
        await c.channel_ready()
    snaps = [_snapshot(e) for e in range(1, 8)]
    get_req = upb.GetKernelRequest(kernel_id=ids["kernel_id"])
    query_req = upb.QueryKernelsRequest(site=_site(), page_size=10)
    lat: dict[str, list[float]] = {r: [] for r in RPCS}
    codes: Counter[str] = Counter()
    t_end = time.monotonic() + duration
    rng = random.Random(seed_)

    # rate > 0: each client sends on its own fixed schedule (open loop: a slow reply does
    # not slow the offered load, and latency counts from the scheduled send time, so
    # queueing in the client is not hidden); rate == 0: each client calls back to back.
    period = clients / rate if rate > 0 else 0.0

    async def one(i: int) -> None:
        k = i % CHANNELS_PER_PROC
        n = rng.randrange(len(mix))
        next_at = time.perf_counter() + rng.uniform(0, period)
        while time.monotonic() < t_end:
            rpc = mix[n % len(mix)]
            n += 1
            if period:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                t0 = next_at
                next_at += period
            else:
                t0 = time.perf_counter()
            try:
                if rpc == "Decide":
                    await tamiyo[k].Decide(tpb.DecideRequest(request_id=str(uuid.uuid4()), snapshot=snaps[n % 7]),
                                           timeout=DEADLINE_S, metadata=md)
                elif rpc == "GetKernel":
                    async for _ in urza[k].GetKernel(get_req, timeout=DEADLINE_S, metadata=md):
                        pass
                else:
                    await urza[k].QueryKernels(query_req, timeout=DEADLINE_S, metadata=md)
                codes["OK"] += 1
                lat[rpc].append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(clients)))
    wall = time.monotonic() - t0
    for c in channels:
        await c.close()
    return {"lat": lat, "codes": dict(codes), "wall": wall}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its waited-for children so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def run_clients(target: str, clients: int, procs: int, duration: float, ids: dict[str, str],
                rate: float, server_pids: list[int], mix: tuple[str, ...] = RPCS) -> dict[str, Any]:
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    cpu0 = sum(_cpu_s(p) for p in server_pids)
    ps = [subprocess.Popen([sys.executable, __file__, "--_client", target, str(n), str(duration), json.dumps(ids),
                            str(i), str(rate * n / clients), ",".join(mix)], stdout=subprocess.PIPE, text=True)
          for i, n in enumerate(per)]
    results = [json.loads(p.communicate(timeout=duration + 120)[0]) for p in ps]
    server_cpu = sum(_cpu_s(p) for p in server_pids) - cpu0
    lat: dict[str, list[float]] = {r: [] for r in RPCS}
    codes: Counter[str] = Counter()
    for r in results:
        for k in RPCS:
            lat[k] += r["lat"][k]
        codes.update(r["codes"])
    return {"lat": lat, "codes": codes, "wall": max(r["wall"] for r in results), "server_cpu": server_cpu}


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000.0


def report(name: str, r: dict[str, Any]) -> list[str]:
    rows = []
    used = [k for k in RPCS if r["lat"][k]]
    total = [x for k in used for x in r["lat"][k]]
    for label, xs in [*((k, r["lat"][k]) for k in used), ("all", total)]:
        rows.append(f"{name:<8}{label:<14}{len(xs) / r['wall']:>9.0f}{_pct(xs, 0.5):>10.1f}{_pct(xs, 0.99):>10.1f}")
    errors = {k: v for k, v in r["codes"].items() if k != "OK"}
    rows.append(f"{name:<8}{'errors':<14}{sum(errors.values()):>9}  {errors or ''}")
    per_call = 1e6 * r["server_cpu"] / max(1, len(total))
    rows.append(f"{name:<8}{'server CPU':<14}{r['server_cpu'] / r['wall']:>8.2f}c  {per_call:.0f} µs per call")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load per server")
    ap.add_argument("--clients", type=int, default=200, help="concurrent clients")
    ap.add_argument("--client-procs", type=int, default=2, help="processes the clients run in")
    ap.add_argument("--servers", default="esper,bare", help="which servers to measure: esper, bare")
    ap.add_argument("--server-procs", type=int, default=1, help="esper up processes behind one port")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="calls/s offered by all clients together, each on a fixed schedule (0: back to back)")
    ap.add_argument("--rpcs", default=",".join(RPCS), help=f"the RPCs each client calls in turn (of {RPCS})")
    ap.add_argument("--_client", nargs=7, help=argparse.SUPPRESS)
    ap.add_argument("--_bare", nargs=2, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns._client:
        target, n, duration, ids, i, rate, mix = ns._client
        print(json.dumps(asyncio.run(_client_main(target, int(n), float(duration), json.loads(ids), int(i),
                                                  float(rate), tuple(mix.split(","))))))
        return
    if ns._bare:
        serve_bare(Path(ns._bare[0]), int(ns._bare[1]))
        return
    mix = tuple(r.strip() for r in ns.rpcs.split(",") if r.strip())
    if not mix or set(mix) - set(RPCS):
        ap.error(f"--rpcs must name some of {RPCS}, got {ns.rpcs!r}")
    servers = [s.strip() for s in ns.servers.split(",") if s.strip()]
    if not servers or set(servers) - {"esper", "bare"}:
        ap.error(f"--servers must list esper and/or bare, got {ns.servers!r}")
    lines = [f"{'server':<8}{'rpc':<14}{'calls/s':>9}{'p50 ms':>10}{'p99 ms':>10}"]
    for name in servers:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp)
            port = _free_port()
            target = f"127.0.0.1:{port}"
            if name == "esper":
                procs = start_esper(data, port, 1)
            else:
                procs = [subprocess.Popen([sys.executable, __file__, "--_bare", str(data / "state"), str(port)],
                                          cwd=ROOT)]
            try:
                _wait_serving(target, proc=procs[0])
                ids = seed(target)
                if name == "esper" and ns.server_procs > 1:
                    # More processes on the same port, sharing the first one's data dir.
                    procs += start_esper(data, port, ns.server_procs)[1:]
                    time.sleep(15)  # imports and store opening; health cannot tell processes apart
                r = run_clients(target, ns.clients, ns.client_procs, ns.duration, ids, ns.rate,
                                [p.pid for p in procs], mix)
            finally:
                for p in procs:
                    p.send_signal(signal.SIGTERM)
                for p in procs:
                    try:
                        p.wait(30)
                    except subprocess.TimeoutExpired:
                        p.kill()
            lines += report(name, r)
    offered = f"{ns.rate:.0f} calls/s offered" if ns.rate else "back to back"
    print(f"{ns.clients} clients in {ns.client_procs} processes ({offered}), {ns.duration:.0f} s per server, "
          f"{'/'.join(mix)} in turn, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
