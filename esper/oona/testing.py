"""Test helpers other parts may import: a real nats-server with JetStream on a free port.

from esper.oona.testing import nats_server

@pytest.fixture
def nats(tmp_path):
    yield from nats_server(tmp_path)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from esper.oona.natsd import NatsServer, NatsServerConfig


def nats_server(tmp_path: Path, *, config: NatsServerConfig | None = None) -> Iterator[NatsServer]:
    """Start a nats-server under `tmp_path / "nats"`, yield it, and always stop it."""
    server = NatsServer(tmp_path / "nats", config=config)
    server.start()
    try:
        yield server
    finally:
        server.stop()
