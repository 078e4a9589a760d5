"""`esper up`'s nats-server: supervised (SIGKILL → restarted on its port), shown by
`esper status` while down, and closed to anonymous clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esper.oona.natsd import find_binary

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


def _status(data_dir: Path) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "esper.cli", "status", "--data-dir", str(data_dir)],
                       check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    nats = [line for line in r.stdout.splitlines() if line.startswith("nats")]
    return r.returncode, nats[0] if nats else r.stdout + r.stderr


def _status_until(data_dir: Path, pred, timeout: float = 60) -> tuple[int, str]:
    """`esper status` until pred(rc, nats line) holds or `timeout` passed; the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        rc, line = _status(data_dir)
        if pred(rc, line) or time.monotonic() > deadline:
            return rc, line
        time.sleep(0.2)


def _until(pred, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_esper_up_restarts_its_nats_server_and_status_shows_the_outage(tmp_path: Path) -> None:
    # nats-server behind a wrapper that fails while `block` exists: the outage lasts as long
    # as the test wants, as when a restart cannot bind its port or the disk is full.
    block = tmp_path / "block"
    wrapper = tmp_path / "bin" / "nats-server"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\n[ -e {block} ] && exit 3\nexec {find_binary()} \"$@\"\n")
    wrapper.chmod(0o755)
    data = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ESPER_"))}
    env.update({"ESPER_API_KEYS": "admin-key-0123456789abcdef=*", "PYTHONPATH": str(ROOT),
                "ESPER_NATS_SERVER": str(wrapper), "OTEL_TRACES_EXPORTER": "none"})
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "esper.cli", "up", "--data-dir", str(data),
                                 "--log-level", "WARNING"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        endpoints = data / "endpoints.json"
        assert _until(lambda: endpoints.exists() or proc.poll() is not None, 120) and \
            proc.poll() is None, log.read_text()[-3000:]
        info = json.loads(endpoints.read_text())
        host, port = info["nats_url"].split("://")[1].rsplit(":", 1)
        creds = Path(info["nats_credentials_dir"])
        assert stat.S_IMODE((creds / "tolaria.password").stat().st_mode) == 0o600

        # Anonymous: refused before it can publish anything.
        with socket.create_connection((host, int(port)), timeout=3) as s:
            s.recv(4096)
            s.sendall(b"CONNECT {}\r\nPUB esper.events.v1.x.run_state 1\r\nx\r\nPING\r\n")
            assert b"Authorization Violation" in s.recv(4096)

        rc, line = _status(data)
        assert rc == 0 and line.split()[-1] == "SERVING", line
        block.touch()
        os.kill(info["nats_pid"], signal.SIGKILL)
        # "RESTARTING (exited ...)" shows at once; "restart failed" once the first attempt
        # has failed against the block (its backoff starts at restart_backoff_s).
        rc, line = _status_until(data, lambda rc, line: "restart failed" in line)
        assert rc == 1 and "RESTARTING" in line and "restart failed" in line, line
        block.unlink()
        rc, line = _status_until(data, lambda rc, line: rc == 0)
        assert rc == 0 and "SERVING (restarted 1x" in line, line
        new_pid = json.loads((data / "nats" / "supervisor.json").read_text())["pid"]
        assert new_pid != info["nats_pid"] and _alive(new_pid)
        assert f":{port}" in line  # same port: clients that hold the URL reconnect
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    state = json.loads((data / "nats" / "supervisor.json").read_text())
    assert state["state"] == "stopped"
    assert _until(lambda: not _alive(new_pid), 5), "nats-server outlived esper up"
