"""Test helpers other parts may import: real nats-servers with JetStream on free ports.

from esper.oona.testing import nats_server, NatsCluster

@pytest.fixture
def nats(tmp_path):
    yield from nats_server(tmp_path)

with NatsCluster(tmp_path / "cluster", users=CredentialsDir(tmp_path / "creds").ensure()) as c:
    c.urls            # "nats://127.0.0.1:p0,nats://127.0.0.1:p1,nats://127.0.0.1:p2"
    c.servers[1].kill()
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from esper.oona.natsd import NatsServer, NatsServerConfig


def nats_server(tmp_path: Path, *, config: NatsServerConfig | None = None) -> Iterator[NatsServer]:
    """Start a nats-server under `tmp_path / "nats"`, yield it, and always stop it."""
    server = NatsServer(tmp_path / "nats", config=config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free right now (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class NatsCluster:
    """`size` nats-servers with JetStream forming one cluster on loopback (the 3-node setup
    of deploy/k8s/nats.yaml, with every node's own store and fixed client ports so a
    killed node comes back where its clients look for it)."""

    def __init__(self, root: Path, *, size: int = 3, users: Mapping[str, str] | None = None,
                 name: str = "esper") -> None:
        ports = free_ports(2 * size)
        client, route = ports[:size], ports[size:]
        routes = tuple(f"nats://127.0.0.1:{p}" for p in route)
        self.servers = [
            NatsServer(root / f"n{i}", users=users, config=NatsServerConfig(
                port=client[i], server_name=f"n{i}", cluster_name=name, cluster_port=route[i],
                routes=routes))
            for i in range(size)
        ]

    @property
    def urls(self) -> str:
        """Every member's client URL, comma-separated (the ESPER_NATS_URL form)."""
        return ",".join(f"nats://127.0.0.1:{s.config.port}" for s in self.servers)

    def by_name(self, server_name: str) -> NatsServer:
        return next(s for s in self.servers if s.config.server_name == server_name)

    def start(self) -> Self:
        for s in self.servers:
            s.start()
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
