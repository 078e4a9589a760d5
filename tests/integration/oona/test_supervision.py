"""A supervised nats-server comes back after SIGKILL on the same port, with the same store
and users, and `describe` (what `esper status` prints) shows the outage while it lasts."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from esper.oona.consumer import drain
from esper.oona.envelope import make_envelope
from esper.oona.natsd import NatsServerConfig, describe, find_binary, read_info, start_embedded
from esper.oona.publisher import Publisher
from generated.esper.oona.v1 import events_pb2 as ev

pytestmark = pytest.mark.integration


def _wait_for(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def gate(i: int) -> ev.EventEnvelope:
    return make_envelope(ev.GateEvent(gate=str(i)), run_id="sup", source="t", sequence=i)


def test_sigkilled_server_is_restarted_with_its_port_store_and_users(tmp_path: Path) -> None:
    server = start_embedded(tmp_path / "nats")
    try:
        port, first_pid = server.port, server.pid
        tolaria = server.credentials.credentials("tolaria")
        with Publisher(server.url, credentials=tolaria, reconnect_wait_s=0.1) as pub:
            for i in range(5):
                pub.publish(gate(i))
            assert pub.flush(10)
            os.kill(first_pid, signal.SIGKILL)
            assert _wait_for(lambda: server.restarts == 1 and server.running, 20)
            assert server.pid != first_pid and server.port == port and not _alive(first_pid)
            for i in range(5, 10):
                pub.publish(gate(i))
            assert pub.flush(20)  # the same password still logs in
        assert describe(server.url, server.data_dir).startswith("SERVING (restarted 1x")
        # The store survived: the events from before the kill are still there.
        got = drain(server.url, "esper.events.v1.sup.>", "sup", timeout=1.0,
                    credentials=server.credentials.credentials("reader"))
        assert [e.sequence for e in got] == list(range(10))
    finally:
        server.stop()
    assert describe(f"nats://127.0.0.1:{port}", server.data_dir).startswith("UNREACHABLE")


def test_an_outage_shows_until_the_restart_succeeds(tmp_path: Path) -> None:
    # A stand-in binary that fails while a flag file exists: the supervisor's restarts fail
    # (as when the port is taken or the disk is full) until the flag goes away.
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    block = tmp_path / "block"
    wrapper = wrapper_dir / "nats-server"
    wrapper.write_text(f"#!/bin/sh\n[ -e {block} ] && exit 3\nexec {find_binary()} \"$@\"\n")
    wrapper.chmod(0o755)
    server = start_embedded(tmp_path / "nats", config=NatsServerConfig(
        restart_backoff_s=0.1, restart_backoff_max_s=0.3))
    server.binary = wrapper
    try:
        assert describe(server.url, server.data_dir) == "SERVING"
        block.touch()
        os.kill(server.pid, signal.SIGKILL)
        assert _wait_for(lambda: "restart failed" in describe(server.url, server.data_dir), 20)
        status = describe(server.url, server.data_dir)
        assert status.startswith("RESTARTING (exited with signal 9; restart failed"), status
        assert read_info("127.0.0.1", server.port) is None
        block.unlink()
        assert _wait_for(lambda: describe(server.url, server.data_dir).startswith("SERVING"), 20)
        assert server.restarts == 1
    finally:
        server.stop()


def test_stop_ends_supervision(tmp_path: Path) -> None:
    server = start_embedded(tmp_path / "nats")
    pid, port = server.pid, server.port
    server.stop()
    time.sleep(1.0)  # longer than the first restart backoff: a restart would have happened
    assert not _alive(pid) and not server.running and server.restarts == 0
    assert read_info("127.0.0.1", port) is None
    assert '"state": "stopped"' in (server.data_dir / "supervisor.json").read_text()
