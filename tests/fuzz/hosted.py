"""Every Esper service on ONE runtime host on loopback, as `esper up` hosts them, in a thread.

`esper up` runs the five services of `esper.runtime.spec.PARTS` on one grpc.aio server
with API-key auth, each part calling the others through that one port. This does the
same in-process (no nats-server: events are logged instead, as with `nats_url=None`),
with settings that keep the work small: Tolaria runs the scripted test worker, Tezzeret
benchmarks a compiled kernel twice instead of twenty times. Before the tests run, it
compiles one built-in blueprint for one site and starts one run, so requests can name a
blueprint, a kernel and a run that exist.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esper.runtime.auth import AuthConfig, RunTokenVerifier, ensure_run_token_keys
from esper.runtime.host import Host, HostConfig
from esper.runtime.spec import PARTS, PlatformContext
from generated.esper.common.v1 import seed_pb2
from generated.esper.tamiyo.v1 import tamiyo_service_pb2 as tamiyo_pb
from generated.esper.tezzeret.v1 import tezzeret_service_pb2 as tezzeret_pb
from generated.esper.tolaria.v1 import tolaria_service_pb2 as tolaria_pb
from generated.esper.urza.v1 import urza_service_pb2 as urza_pb

ADMIN = "fuzz-admin-key-0123456789abcdef"
READER = "fuzz-reader-key-0123456789abcdef"
"""Scope urza:read only."""
WORKER = "tests.unit.tolaria_service.scripted_worker"
SITE = seed_pb2.SiteSignature(layout=seed_pb2.ACTIVATION_LAYOUT_NC, channels=8, dtype=seed_pb2.D_TYPE_FLOAT32)


@dataclass
class Platform:
    target: str
    host: Host
    loop: asyncio.AbstractEventLoop
    data_dir: Path
    blueprint_id: str = ""
    kernel_id: str = ""
    run_id: str = ""
    victims: dict[str, tuple[str, str]] | None = None
    """RPC name → (blueprint id, kernel id) compiled for the delete/retire RPCs to use up."""

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target, options=[("grpc.max_receive_message_length", 64 << 20)])

    def serving(self, timeout: float = 10.0) -> bool:
        with grpc.insecure_channel(self.target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return resp.status == health_pb2.HealthCheckResponse.SERVING


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(ch: grpc.Channel, path: str, request: Any, response_type: Any, timeout: float) -> Any:
    fn = ch.unary_unary(path, request_serializer=type(request).SerializeToString,
                        response_deserializer=response_type.FromString)
    return fn(request, timeout=timeout, metadata=(("x-api-key", ADMIN),))


def _seed(p: Platform) -> None:
    """A compiled kernel (blueprint + site) and a run, for requests to name."""
    from esper.blueprints import builtin_blueprints

    def compile_(ch: grpc.Channel, name: str) -> tuple[str, str]:
        bp = next(b for b in builtin_blueprints() if b.name == name)
        job = _call(ch, "/esper.tezzeret.v1.TezzeretService/Compile",
                    tezzeret_pb.CompileRequest(blueprint=bp, site=SITE, wait=True),
                    tezzeret_pb.CompileResponse, 120).job
        if job.state != tezzeret_pb.COMPILE_JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"seed compile failed: {job}")
        return job.blueprint_id, job.kernel_id

    with p.channel() as ch:
        p.blueprint_id, p.kernel_id = compile_(ch, "lowrank_adapter")
        # Deleting or retiring the kernel every other RPC names would change what they
        # meet; these two are there to be deleted and retired.
        p.victims = {"delete": compile_(ch, "norm_scale"), "retire": compile_(ch, "bottleneck_mlp")}
        run = _call(ch, "/esper.tolaria.v1.TolariaService/StartRun",
                    tolaria_pb.StartRunRequest(config=tolaria_pb.RunConfig(
                        task="mnist1d", host="cnn", controller="heuristic", epochs=3, batch_size=32)),
                    tolaria_pb.StartRunResponse, 30).run
        p.run_id = run.run_id
        # Urza holds the kernel: QueryKernels for the site finds it.
        found = _call(ch, "/esper.urza.v1.UrzaService/QueryKernels", urza_pb.QueryKernelsRequest(site=SITE),
                      urza_pb.QueryKernelsResponse, 30)
        assert p.kernel_id in {k.kernel_id for k in found.kernels}
        _call(ch, "/esper.tamiyo.v1.TamiyoService/GetPolicyInfo", tamiyo_pb.GetPolicyInfoRequest(),
              tamiyo_pb.GetPolicyInfoResponse, 30)


@contextmanager
def hosted_platform(data_dir: Path) -> Iterator[Platform]:
    """All five services on one port until the block ends."""
    port = _free_port()
    target = f"127.0.0.1:{port}"
    keys_dir = data_dir / "trusted_keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    # Tolaria signs its workers' run tokens with this key; every service accepts them.
    run_token_key, run_token_pub = ensure_run_token_keys(data_dir / "run-token")
    ctx = PlatformContext(
        data_dir=data_dir,
        endpoints={part: target for part in PARTS},
        api_key=ADMIN,
        nats_url=None,
        settings={
            "urza": {"trusted_keys_dir": str(keys_dir)},
            "tezzeret": {"trusted_keys_dir": str(keys_dir), "benchmark_iters": 2},
            "tolaria": {"supervisor": {"worker_module": WORKER, "poll_interval_s": 0.05},
                        "run_token_key_file": str(run_token_key),
                        "worker_args": ["--epoch-seconds", "0.05"]},
        },
    )
    auth = AuthConfig(keys={ADMIN: frozenset({"*"}), READER: frozenset({"urza:read"})},
                      run_tokens=RunTokenVerifier.from_file(run_token_pub))
    loop = asyncio.new_event_loop()
    box: dict[str, Any] = {}
    started = threading.Event()

    async def main() -> None:
        from esper.runtime.cli import _create

        try:
            specs = [_create(part, ctx) for part in PARTS]
            host = Host(specs, config=HostConfig(port=port, grace_s=2.0, notice_s=0.0, tracing=False), auth=auth)
            box["host"] = host
            await host.start()
        except BaseException as e:  # noqa: BLE001 - reported to the test thread below
            box["error"] = e
            started.set()
            return
        started.set()
        await host.wait_stopped()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="esper-fuzz-host", daemon=True)
    thread.start()
    if not started.wait(120):
        raise RuntimeError("the platform did not start within 120 s")
    if "error" in box:
        thread.join(10)
        raise RuntimeError(f"the platform did not start: {box['error']!r}") from box["error"]
    p = Platform(target=target, host=box["host"], loop=loop, data_dir=data_dir)
    try:
        _seed(p)
        yield p
    finally:
        asyncio.run_coroutine_threadsafe(p.host.stop("fuzz tests done"), loop).result(60)
        thread.join(60)
        loop.close()
