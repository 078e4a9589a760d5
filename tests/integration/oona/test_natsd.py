from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nats
import pytest

from esper.errors import FailedPreconditionError, UnavailableError
from esper.oona.natsd import NatsServer, NatsServerConfig

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie nobody has reaped yet counts as dead)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "Z" not in state.split()[1]


async def _jetstream_ok(url: str) -> int:
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        ack = await js.publish("t.x", b"1")
        return ack.seq
    finally:
        await nc.close()


def test_starts_with_jetstream_on_a_free_port(natsd: NatsServer) -> None:
    assert natsd.running and natsd.port > 0
    assert natsd.url == f"nats://127.0.0.1:{natsd.port}"
    assert asyncio.run(_jetstream_ok(natsd.url)) == 1
    assert (natsd.store_dir / "jetstream").is_dir()
    assert "sync_interval: always" in natsd.config_path.read_text()


def test_stop_then_start_keeps_port_and_store(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "n")
    with server:
        port = server.port
        pid = server.pid
        assert asyncio.run(_jetstream_ok(server.url)) == 1
    assert not server.running and not _alive(pid)
    with server:
        assert server.port == port
        # Same store: the stream survived and the next message gets sequence 2.
        assert asyncio.run(_jetstream_ok(server.url)) == 2


def test_start_twice_is_an_error(natsd: NatsServer) -> None:
    with pytest.raises(FailedPreconditionError, match="already running"):
        natsd.start()


def test_failed_start_reports_the_log(tmp_path: Path, natsd: NatsServer) -> None:
    clash = NatsServer(tmp_path / "clash", port=natsd.port)
    with pytest.raises(UnavailableError, match="exited with code"):
        clash.start()
    assert not clash.running


def test_sigterm_ignored_falls_back_to_sigkill(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "n", config=NatsServerConfig(stop_timeout_s=0.2))
    server.start()
    pid = server.pid
    os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    t0 = time.monotonic()
    rc = server.stop()
    assert rc == -signal.SIGKILL
    assert time.monotonic() - t0 < 3
    assert not _alive(pid)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_no_orphan_when_the_parent_dies(tmp_path: Path, how: signal.Signals) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from esper.oona.natsd import NatsServer
        s = NatsServer({str(tmp_path / "n")!r}).start()
        print(s.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=Path(__file__).parents[3]
    )
    try:
        nats_pid = int(parent.stdout.readline())
        assert _alive(nats_pid)
        parent.send_signal(how)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(nats_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(nats_pid), f"nats-server {nats_pid} outlived its parent ({how.name})"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
