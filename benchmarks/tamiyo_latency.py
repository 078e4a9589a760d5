"""Tamiyo Decide latency over gRPC for model graphs of 16, 64 and 256 nodes.

    .venv/bin/python benchmarks/tamiyo_latency.py [--policies heuristic,gnn] [--calls 300]

Tamiyo is served on loopback by a grpc.aio server in a background thread; Urza is a
second grpc.aio server answering QueryKernels from a small catalog (after the first call
the candidates come from Tamiyo's cache, as in a run). The client is `TamiyoClient`, as
Tolaria calls it. The gnn rows time the full ensemble (4 members by default) plus the
heuristic it runs for its fallback. Baseline measured in the same run: a GetPolicyInfo round trip (the bare
cost of one gRPC call on this machine). Each Decide uses a fresh request_id, so nothing
is served from the idempotency cache.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from esper.runtime.spec import PlatformContext
from esper.tamiyo.client import TamiyoClient
from esper.tamiyo.service import create_service
from generated.esper.common.v1 import health_pb2, kernel_pb2, seed_pb2
from generated.esper.urza.v1 import urza_service_pb2 as upb
from generated.esper.urza.v1 import urza_service_pb2_grpc as urpc

SITE = seed_pb2.SiteSignature(layout=seed_pb2.ACTIVATION_LAYOUT_NC, channels=64, dtype=seed_pb2.D_TYPE_FLOAT32)


def catalog() -> list[kernel_pb2.KernelRecord]:
    out = []
    for i, (params, outcomes, fossils, contrib) in enumerate(
        [(2_000, 12, 9, 0.04), (8_000, 5, 2, 0.01), (500, 0, 0, 0.0), (30_000, 20, 18, 0.09)]
    ):
        h = hashlib.sha256(f"kernel-{i}".encode()).hexdigest()
        out.append(
            kernel_pb2.KernelRecord(
                kernel_id=f"sha256:{h}",
                manifest=kernel_pb2.KernelManifest(
                    blueprint_id=f"bp-{h[:16]}",
                    blueprint_name=f"family{i}",
                    site=SITE,
                    profile=kernel_pb2.KernelProfile(parameters=params),
                ),
                stats=kernel_pb2.KernelStats(
                    outcomes=outcomes, fossilized=fossils, pruned=outcomes - fossils, mean_contribution=contrib
                ),
            )
        )
    return out


class Catalog(urpc.UrzaServiceServicer):
    def __init__(self) -> None:
        self.records = catalog()

    async def QueryKernels(self, request, context):
        rs = [r for r in self.records if not request.max_parameters or r.manifest.profile.parameters <= request.max_parameters]
        return upb.QueryKernelsResponse(kernels=rs)


def snapshot_for(nodes: int, epoch: int) -> health_pb2.HealthSnapshot:
    """A chain graph of `nodes` nodes, one slot per 8 nodes, mixed stages, a plateaued loss."""
    n_slots = max(1, nodes // 8)
    stages = [
        seed_pb2.SEED_STAGE_DORMANT,
        seed_pb2.SEED_STAGE_HOLDING,
        seed_pb2.SEED_STAGE_DORMANT,
        seed_pb2.SEED_STAGE_FOSSILIZED,
    ]
    snap = health_pb2.HealthSnapshot(
        run_id="bench",
        epoch=epoch,
        total_epochs=10_000,
        global_step=epoch * 100,
        train_loss_history=[1.0 / (1 + 0.1 * e) for e in range(min(epoch, 32))],
        val_loss_history=[max(0.5, 1.0 / (1 + 0.1 * e)) for e in range(min(epoch, 32))],
        val_accuracy_history=[min(0.9, 0.1 + 0.02 * e) for e in range(min(epoch, 32))],
        host_parameters=200_000,
        total_parameters=200_000,
        seeds_left=4,
        parameters_left=40_000,
        task="bench",
    )
    for i in range(n_slots):
        stage = stages[i % len(stages)]
        live = stage in (seed_pb2.SEED_STAGE_HOLDING, seed_pb2.SEED_STAGE_FOSSILIZED)
        snap.slots.add(
            slot_id=f"body.{i}",
            stage=stage,
            alpha=1.0 if live else 0.0,
            site=SITE,
            host_grad_norm=0.1 + (i * 37 % 11) / 10,
            activation_mean=0.01 * i,
            activation_std=1.0,
            contribution=0.02 if live else 0.0,
            contribution_measured=live,
            epochs_in_stage=1,
            finite=True,
            depth=i,
            kernel_id=catalog()[0].kernel_id if live else "",
            blueprint_id=catalog()[0].manifest.blueprint_id if live else "",
        )
    hosts = nodes - n_slots
    per = max(1, hosts // n_slots)
    k = 0
    for h in range(hosts):
        snap.graph.nodes.add(name=f"layer{h}", kind="linear", parameters=1_000)
        if (h + 1) % per == 0 and k < n_slots:
            snap.graph.nodes.add(name=f"body.{k}", kind="slot", slot_id=f"body.{k}")
            k += 1
    while k < n_slots:
        snap.graph.nodes.add(name=f"body.{k}", kind="slot", slot_id=f"body.{k}")
        k += 1
    snap.graph.edges.extend(health_pb2.GraphEdge(src=i, dst=i + 1) for i in range(len(snap.graph.nodes) - 1))
    return snap


class Servers:
    """Urza and Tamiyo on loopback, served from one event loop in a background thread."""

    def __init__(self, settings: dict) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Servers:
        self.thread.start()
        self.target = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=60)
        return self

    async def _start(self) -> str:
        self.urza = grpc.aio.server()
        urpc.add_UrzaServiceServicer_to_server(Catalog(), self.urza)
        urza_port = self.urza.add_insecure_port("127.0.0.1:0")
        await self.urza.start()
        self.tmp = tempfile.TemporaryDirectory()
        ctx = PlatformContext(
            data_dir=Path(self.tmp.name), endpoints={"urza": f"127.0.0.1:{urza_port}"}, settings={"tamiyo": self.settings}
        )
        self.spec = create_service(ctx)
        self.tamiyo = grpc.aio.server()
        self.spec.add_to_server(self.spec.servicer, self.tamiyo)
        port = self.tamiyo.add_insecure_port("127.0.0.1:0")
        await self.tamiyo.start()
        return f"127.0.0.1:{port}"

    async def _stop(self) -> None:
        await self.tamiyo.stop(None)
        if self.spec.on_stop:
            await self.spec.on_stop()
        await self.urza.stop(None)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.tmp.cleanup()


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def gnn_policy_file(directory: Path) -> tuple[str, str]:
    """A policy file with the default architecture, freshly initialised, and the directory of
    the (throwaway) key that signed it, for `gnn.trusted_keys_dir`.

    Latency does not depend on the weights' values, only on the architecture, so the
    benchmark needs no trained policy (pass --gnn-policy-file to time a trained one).
    """
    from esper.blueprints.artifact import SigningKey
    from esper.tamiyo.gnn import Ensemble, NetConfig, save_policy

    key = SigningKey.generate()
    keys = directory / "bench_keys"
    keys.mkdir(exist_ok=True)
    (keys / f"bench-{key.key_id}.pub").write_bytes(key.public_pem())
    path = save_policy(Ensemble(NetConfig(), vocab=[]), directory / "bench_gnn.json", version="bench-untrained",
                       signing_key=key)
    return str(path), str(keys)


def measure(settings: dict, calls: int, warmup: int) -> tuple[list[float], list[tuple], object]:
    rows = []
    with Servers(settings) as srv, TamiyoClient(srv.target) as client:
        for _ in range(warmup):
            client.policy_info()
        rtt = []
        for _ in range(calls):
            t = time.perf_counter()
            client.policy_info()
            rtt.append((time.perf_counter() - t) * 1e3)
        for nodes in (16, 64, 256):
            snaps = [snapshot_for(nodes, 10 + e) for e in range(calls + warmup)]
            for s in snaps[:warmup]:
                client.decide(s, timeout_s=5.0)
            lat, server = [], []
            for s in snaps[warmup:]:
                t = time.perf_counter()
                resp = client.decide(s, timeout_s=5.0)
                lat.append((time.perf_counter() - t) * 1e3)
                server.append(resp.latency_ms)
            rows.append((nodes, len(snaps[0].slots), resp.policy, lat, server))
        info = client.policy_info()
    return rtt, rows, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="heuristic,gnn", help="comma-separated: heuristic, random, fixed, gnn")
    ap.add_argument("--gnn-policy-file", default="", help="trained policy for gnn (default: untrained, same architecture)")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--torch-threads", type=int, default=1, help="intra-op threads for the gnn (tiny graphs: 1)")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.policies.split(","):
            settings: dict = {"policy": policy, "decide_reserve_s": 0.002}
            if policy == "gnn":
                import torch

                torch.set_num_threads(args.torch_threads)
                if args.gnn_policy_file:
                    # A trained policy verifies under the operator's keys (ESPER_TRUSTED_KEYS_DIR).
                    settings["gnn"] = {"policy_file": args.gnn_policy_file}
                else:
                    policy_file, keys_dir = gnn_policy_file(Path(tmp))
                    settings["gnn"] = {"policy_file": policy_file, "trusted_keys_dir": keys_dir}
            results.append((policy, *measure(settings, args.calls, args.warmup)))
    rtt = [x for _, r, _, _ in results for x in r]
    rtt50 = statistics.median(rtt)
    heur = {n: statistics.median(lat) for p, _, rows, _ in results if p == "heuristic" for n, _, _, lat, _ in rows}
    print(f"Tamiyo Decide over gRPC (loopback, sync TamiyoClient), {args.calls} calls per row, fresh request_id each")
    print(f"baseline: GetPolicyInfo round trip p50 {rtt50:.3f} ms, p99 {pct(rtt, 0.99):.3f} ms (bare gRPC cost)")
    for policy, _, _, info in results:
        print(f"  {policy}: serving {info.policy} v{info.policy_version} {dict(info.settings) if policy == 'gnn' else ''}")
    print()
    hdr = (
        f"{'nodes':>5} {'slots':>5} {'policy':>10} {'p50 ms':>8} {'p99 ms':>8} {'server p50':>10} "
        f"{'server p99':>10} {'p50/RTT':>8} {'p50/heur':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for _, _, rows, _ in results:
        for nodes, slots, policy, lat, server in rows:
            p50 = statistics.median(lat)
            vs = f"{p50 / heur[nodes]:>8.2f}" if nodes in heur else f"{'-':>8}"
            print(
                f"{nodes:>5} {slots:>5} {policy:>10} {p50:>8.3f} {pct(lat, 0.99):>8.3f} "
                f"{statistics.median(server):>10.3f} {pct(server, 0.99):>10.3f} {p50 / rtt50:>8.2f} {vs}"
            )


if __name__ == "__main__":
    main()
