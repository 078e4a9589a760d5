"""Kernel fetch and attach latency: memory cache, disk cache, signature check, and (when
Urza's service is built) uncached fetches from Urza over loopback.

    .venv/bin/python benchmarks/kernel_fetch.py [--iters 200]

Targets (ISSUE 4): memory-cache attach ≤ 1 ms; 1 MB uncached fetch ≤ 20 ms p99.
The baseline column is attach from the memory cache measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from esper.blueprints import build_module, make_blueprint, node, site_signature
from esper.blueprints.artifact import (
    SigningKey,
    TrustedKeys,
    pack_kernel,
    verify_artifact,
)
from esper.kasmina.loader import KernelLoader
from generated.esper.common.v1 import kernel_pb2


def kernel_of_size(target_bytes: int, key: SigningKey) -> tuple[str, bytes]:
    """A bottleneck-MLP kernel whose float32 weights make the artifact about target_bytes."""
    c = 64
    hidden = max(1, target_bytes // (4 * 2 * c))
    bp = make_blueprint(f"bench_{target_bytes}", "bench", "", [1],
                        [node("down", "linear", ["input"], features=hidden, bias=False),
                         node("act", "relu", ["down"]),
                         node("up", "linear", ["act"], zero_init=True, bias=False)], "up")
    site = site_signature("NC", c)
    return pack_kernel(bp, site, build_module(bp, site), kernel_pb2.KernelProfile(),
                       kernel_pb2.ValidationReport(), key)


def measure(fn: Callable[[], object], iters: int) -> tuple[float, float]:
    fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(0.99 * len(samples)))]


def urza_rows(key: SigningKey, iters: int, tmp: Path) -> list[tuple[str, float, float, int]]:
    """Fetch 10 KB / 1 MB / 10 MB artifacts from an in-process Urza over loopback."""
    from esper.runtime.auth import AuthConfig
    from esper.runtime.host import Host, HostConfig
    from esper.runtime.spec import PlatformContext
    from esper.urza.client import UrzaClient
    from esper.urza.service import create_service

    keys_dir = tmp / "keys"
    keys_dir.mkdir()
    (keys_dir / "bench.pub").write_bytes(key.public_pem())
    ctx = PlatformContext(data_dir=tmp / "urza_data",
                          settings={"urza": {"trusted_keys_dir": str(keys_dir)}})
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, object] = {}

    async def run_server() -> None:
        host = Host([create_service(ctx)], config=HostConfig(port=0),
                    auth=AuthConfig(disabled=True))
        state["port"] = await host.start()
        state["host"] = host
        ready.set()
        await host.wait_stopped()

    thread = threading.Thread(target=lambda: loop.run_until_complete(run_server()), daemon=True)
    thread.start()
    ready.wait(30)
    rows = []
    try:
        with UrzaClient(f"127.0.0.1:{state['port']}") as client:
            for label, size in (("10 KB", 10_000), ("1 MB", 1_000_000), ("10 MB", 10_000_000)):
                kid, data = kernel_of_size(size, key)
                client.put_kernel(data, 60.0)
                n = max(10, iters // (1 if size < 5_000_000 else 10))
                p50, p99 = measure(lambda kid=kid: client.get_kernel(kid, 30.0), n)
                rows.append((f"fetch from Urza, uncached ({label})", p50, p99, len(data)))
                trusted = TrustedKeys([key])

                def fetch_verify_attach(kid: str = kid, trusted: TrustedKeys = trusted) -> None:
                    with tempfile.TemporaryDirectory() as d:
                        KernelLoader(client.get_kernel, trusted, d).load(kid, 30.0)

                p50, p99 = measure(fetch_verify_attach, max(5, n // 2))
                rows.append((f"fetch+verify+attach, cold ({label})", p50, p99, len(data)))
    finally:
        host = state["host"]
        fut = asyncio.run_coroutine_threadsafe(host.stop("benchmark done"), loop)  # type: ignore[attr-defined]
        fut.result(30)
        thread.join(30)
    return rows


def urza_available() -> bool:
    try:
        from esper.urza import service
        from generated.esper.urza.v1 import urza_service_pb2_grpc as rpc
    except ImportError:
        return False
    return type(service.create_service(__import__("esper.runtime.spec", fromlist=["x"])
                                       .PlatformContext(data_dir=Path(tempfile.mkdtemp()))
                                       ).servicer) is not rpc.UrzaServiceServicer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    key = SigningKey.from_bytes(b"77" * 32)
    trusted = TrustedKeys([key])
    kid, data = kernel_of_size(1_000_000, key)
    rows: list[tuple[str, float, float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        loader = KernelLoader(lambda k, t: data, trusted, tmp_path / "cache")
        loader.load(kid, 5.0)
        mem = measure(lambda: loader.load(kid, 5.0), args.iters)
        rows.append(("attach from memory cache (1 MB)", *mem, len(data)))

        def from_disk() -> None:
            loader.evict_memory()
            loader.load(kid, 5.0)

        rows.append(("attach from disk cache: verify+materialise (1 MB)",
                     *measure(from_disk, max(20, args.iters // 4)), len(data)))
        art = kernel_pb2.KernelArtifact.FromString(data)
        man = kernel_pb2.KernelManifest.FromString(art.manifest)
        pub = trusted.get(man.key_id)
        assert isinstance(pub, Ed25519PublicKey)
        rows.append(("Ed25519 signature verification alone",
                     *measure(lambda: pub.verify(art.signature, art.manifest), args.iters),
                     len(art.manifest)))
        rows.append(("verify_artifact, full (1 MB)",
                     *measure(lambda: verify_artifact(data, trusted), max(20, args.iters // 4)),
                     len(data)))
        if urza_available():
            rows += urza_rows(key, args.iters, tmp_path)
        else:
            print("Urza service not built yet: skipping fetch-over-loopback rows")

    base = rows[0][1]
    print(f"\n{'case':<52} {'bytes':>10} {'p50 ms':>9} {'p99 ms':>9} {'p50/mem':>9}")
    for name, p50, p99, size in rows:
        print(f"{name:<52} {size:>10} {p50:>9.3f} {p99:>9.3f} {p50 / base:>9.1f}")
    mem_p50 = rows[0][1]
    print(f"\ntarget: memory attach <= 1 ms: p50 {mem_p50:.3f} ms "
          f"({'met' if mem_p50 <= 1 else 'MISSED'})")
    one_mb = [r for r in rows if r[0] == "fetch from Urza, uncached (1 MB)"]
    if one_mb:
        print(f"target: 1 MB uncached fetch p99 <= 20 ms: {one_mb[0][2]:.3f} ms "
              f"({'met' if one_mb[0][2] <= 20 else 'MISSED'})")


if __name__ == "__main__":
    main()
