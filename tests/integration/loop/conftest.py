"""The closed loop on real processes: nats-server, Urza, Tamiyo and Tolaria on loopback.

Each service gets its own runtime `Host` (one asyncio loop, like `esper up`), so a test
can stop one of them mid-run; Tolaria's workers are real subprocesses. Urza holds
kernels that Tezzeret's compiler built and signed for the run's sites.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest

from esper.blueprints.artifact import SigningKey
from esper.oona.natsd import NatsServer
from esper.runtime.auth import AuthConfig
from esper.runtime.host import Host
from esper.runtime.spec import PlatformContext
from esper.tezzeret.compiler import compile_catalog
from esper.tolaria.config import RunConfig
from esper.tolaria.kernels import site_signatures
from esper.urza.client import UrzaClient
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb
from generated.esper.tolaria.v1 import tolaria_service_pb2_grpc as rpc

# Germinate early and often enough that a ~12-epoch run shows a whole seed lifecycle.
FAST_HEURISTIC = {"warmup_epochs": 1, "plateau_window": 1, "plateau_threshold": 1.0,
                  "fossilize_epochs": 1, "holding_patience_epochs": 3}


def tiny_config(**overrides) -> RunConfig:
    base = {"task": "spirals", "host": "mlp", "controller": "heuristic", "epochs": 12, "batch_size": 32,
                "checkpoint_every": 1, "decide_timeout_s": 1.0, "seed": 1,
                "budget": {"max_seeds": 2, "max_added_parameters": 0},
                "optimizer": {"name": "adamw", "learning_rate": 0.01, "schedule": "constant"}}
    base.update(overrides)
    return RunConfig.from_dict(base)


class LoopPlatform:
    """Every part on its own loopback port; stop/start one with `stop_part`/`start_part`."""

    def __init__(self, root: Path, *, tamiyo: dict | None = None, with_nats: bool = True,
                 worker_args: list[str] | None = None) -> None:
        self.root = root
        self.keys_dir = root / "keys" / "trusted"
        self.signing_key = SigningKey.generate()
        self.nats = NatsServer(root / "nats") if with_nats else None
        self.hosts: dict[str, Host] = {}
        self.ctx = PlatformContext(
            data_dir=root / "data",
            settings={
                "urza": {"trusted_keys_dir": str(self.keys_dir)},
                "tamiyo": {"heuristic": FAST_HEURISTIC, **(tamiyo or {})},
                "tolaria": {"worker_args": ["--trusted-keys", str(self.keys_dir), *(worker_args or [])],
                            "supervisor": {"poll_interval_s": 0.05}},
            },
        )
        self.channel: grpc.aio.Channel | None = None
        self.tolaria: rpc.TolariaServiceStub | None = None

    async def start(self, config: RunConfig) -> LoopPlatform:
        self.keys_dir.mkdir(parents=True)
        (self.keys_dir / "tezzeret.pub").write_text(self.signing_key.public_raw.hex())
        if self.nats is not None:
            self.nats.start()
            self.ctx.nats_url = self.nats.url
        await self.start_part("urza")
        await asyncio.to_thread(self.publish_kernels, config)
        await self.start_part("tamiyo")
        await self.start_part("tolaria")
        self.channel = grpc.aio.insecure_channel(self.ctx.endpoints["tolaria"])
        self.tolaria = rpc.TolariaServiceStub(self.channel)
        return self

    def publish_kernels(self, config: RunConfig) -> int:
        """Tezzeret's job at first start: compile and sign the catalog for the run's sites."""
        sites = list({s.SerializeToString(): s for s in site_signatures(config).values()}.values())
        with UrzaClient(self.ctx.endpoints["urza"]) as urza:
            kernels = compile_catalog(sites, self.signing_key, benchmark_iters=2,
                                      publish=lambda ck: urza.put_kernel(ck.artifact_bytes, 10.0))
        return len(kernels)

    async def start_part(self, part: str) -> None:
        from importlib import import_module

        spec = import_module(f"esper.{part}.service").create_service(self.ctx)
        # The same port again after a restart, so clients holding the address reconnect.
        port = int(self.ctx.endpoints[part].rsplit(":", 1)[1]) if part in self.ctx.endpoints else 0
        from esper.runtime.host import HostConfig

        host = Host([spec], config=HostConfig(port=port, grace_s=1.0, notice_s=0.0),
                    auth=AuthConfig(disabled=True))
        bound = await host.start()
        self.ctx.endpoints[part] = f"127.0.0.1:{bound}"
        self.hosts[part] = host

    async def stop_part(self, part: str) -> None:
        await self.hosts.pop(part).stop(f"test stops {part}")

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        for part in ("tolaria", "tamiyo", "urza"):
            if part in self.hosts:
                await self.stop_part(part)
        if self.nats is not None:
            self.nats.stop()

    # ---- helpers ----------------------------------------------------------------------
    async def start_run(self, config: RunConfig) -> str:
        assert self.tolaria is not None
        resp = await self.tolaria.StartRun(pb.StartRunRequest(config=config.to_proto()))
        return resp.run.run_id

    async def watch(self, run_id: str, *, timeout: float = 120.0, on_event=None) -> list:
        """Every event of the run until it ends; `on_event(env)` may act mid-run."""
        assert self.tolaria is not None
        out = []

        async def follow() -> None:
            async for r in self.tolaria.WatchRun(pb.WatchRunRequest(run_id=run_id)):
                out.append(r.event)
                if on_event is not None:
                    await on_event(r.event)

        await asyncio.wait_for(follow(), timeout)
        return out

    async def get_run(self, run_id: str) -> pb.Run:
        assert self.tolaria is not None
        return (await self.tolaria.GetRun(pb.GetRunRequest(run_id=run_id))).run

    def run_dir(self, run_id: str) -> Path:
        return self.ctx.data_dir / "tolaria" / "runs" / run_id

    def worker_log(self, run_id: str) -> str:
        p = self.run_dir(run_id) / "worker.log"
        return p.read_text(errors="replace")[-6000:] if p.exists() else "(no worker log)"


@pytest.fixture
async def platform_factory(tmp_path):
    made: list[LoopPlatform] = []

    async def make(config: RunConfig, **kw) -> LoopPlatform:
        p = LoopPlatform(tmp_path, **kw)
        made.append(p)
        return await p.start(config)

    yield make
    for p in made:
        await p.close()


def kinds(events) -> list[str]:
    return [e.WhichOneof("payload") for e in events]


os.environ.setdefault("OTEL_TRACES_EXPORTER", "none")
