"""NATS authentication on a real nats-server: anonymous clients can do nothing, each role
only what it needs, and Oona's own clients log in from the environment."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from esper.cli import main
from esper.oona.auth import CredentialsDir
from esper.oona.connection import NatsCredentials, connect_options
from esper.oona.consumer import drain
from esper.oona.envelope import encode, make_envelope, subject_for
from esper.oona.natsd import NatsServer, start_embedded
from esper.oona.publisher import Publisher
from generated.esper.oona.v1 import events_pb2 as ev

pytestmark = pytest.mark.integration


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[NatsServer]:
    server = start_embedded(tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()


def forged(run_id: str = "victim") -> ev.EventEnvelope:
    return make_envelope(ev.RunStateChanged(state="failed", detail="forged"), run_id=run_id,
                         source="attacker", sequence=99)


async def _count(url: str, admin: NatsCredentials) -> int:
    nc = await nats.connect(**connect_options(url, admin))
    try:
        return (await nc.jetstream().stream_info("ESPER_EVENTS")).state.messages
    finally:
        await nc.close()


def _raw_publish(host: str, port: int, subject: str, payload: bytes) -> bytes:
    """What an anonymous client gets for CONNECT + PUB on a plain socket."""
    with socket.create_connection((host, port), timeout=3) as s:
        s.settimeout(3)
        s.recv(4096)  # INFO
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\n'
                  + f"PUB {subject} {len(payload)}\r\n".encode() + payload + b"\r\nPING\r\n")
        out = b""
        try:
            while b"-ERR" not in out and b"PONG" not in out:
                chunk = s.recv(4096)
                if not chunk:
                    break
                out += chunk
        except TimeoutError:
            pass
        return out


def test_anonymous_client_is_refused_and_stores_nothing(bus: NatsServer) -> None:
    admin = bus.credentials.credentials("admin")
    before = asyncio.run(_count(bus.url, admin))
    env = forged()
    reply = _raw_publish("127.0.0.1", bus.port, subject_for(env), encode(env))
    assert b"Authorization Violation" in reply and b"PONG" not in reply

    async def nats_py_anonymous() -> None:
        await asyncio.wait_for(nats.connect(bus.url, max_reconnect_attempts=0,
                                            allow_reconnect=False, connect_timeout=2), 5)

    # nats-py either reports the authorization error or keeps retrying until the timeout.
    with pytest.raises((nats.errors.Error, TimeoutError)):
        asyncio.run(nats_py_anonymous())
    assert asyncio.run(_count(bus.url, admin)) == before


def test_roles_publish_only_their_subjects(bus: NatsServer) -> None:
    creds = bus.credentials
    errors: list[str] = []

    async def attempt() -> dict[str, bool]:
        async def ecb(e: Exception) -> None:
            errors.append(str(e))

        out: dict[str, bool] = {}
        for role in ("tolaria", "reader"):
            nc = await nats.connect(**connect_options(bus.url, creds.credentials(role)), error_cb=ecb)
            js = nc.jetstream(timeout=0.5)
            for what, call in (
                ("run_event", lambda js=js: js.publish("esper.events.v1.r.run_state", b"x")),
                ("kernel", lambda js=js: js.publish("esper.kernels.v1.published", b"x")),
                ("delete", lambda js=js: js.delete_stream("ESPER_EVENTS")),
                ("create", lambda js=js: js.add_stream(name="OTHER", subjects=["other.>"])),
            ):
                try:
                    await call()
                    out[f"{role}:{what}"] = True
                except (nats.errors.Error, TimeoutError):
                    out[f"{role}:{what}"] = False
            await nc.close()
        return out

    allowed = asyncio.run(attempt())
    assert allowed == {
        "tolaria:run_event": True, "tolaria:kernel": False, "tolaria:delete": False,
        "tolaria:create": False, "reader:run_event": False, "reader:kernel": False,
        "reader:delete": False, "reader:create": False,
    }
    assert any("permissions violation" in e.lower() for e in errors)


def test_oona_clients_log_in_from_the_environment(bus: NatsServer, monkeypatch, capsys,
                                                  tmp_path: Path) -> None:
    creds: CredentialsDir = bus.credentials
    for k, v in creds.client_env("tolaria").items():
        monkeypatch.setenv(k, v)
    envs = [make_envelope(ev.RunStateChanged(state="running", detail=f"d{i}"), run_id="authrun",
                          source="tolaria", sequence=i) for i in range(3)]
    with Publisher(bus.url) as pub:  # ensure_streams "create": finds them, changes nothing
        for e in envs:
            pub.publish(e)
        assert pub.flush(10)
        assert pub.stats().published == 3 and pub.stats().rejected == 0
    # The reader role consumes through a durable consumer; tolaria may not.
    got = drain(bus.url, "esper.events.v1.authrun.>", "auth-reader", timeout=1.0,
                credentials=creds.credentials("reader"))
    assert [e.event_id for e in got] == [e.event_id for e in envs]
    # `esper events` finds the reader's credentials through esper up's endpoints.json.
    (tmp_path / "endpoints.json").write_text(json.dumps(
        {"nats_url": bus.url, "nats_credentials_dir": str(creds.directory)}))
    assert main(["events", "--run", "authrun", "--data-dir", str(tmp_path), "--idle-timeout",
                 "0.5"]) == 0
    assert capsys.readouterr().out.count("run_state") == 3


def test_a_publisher_without_credentials_reports_it_and_keeps_the_events(bus: NatsServer,
                                                                         monkeypatch) -> None:
    monkeypatch.delenv("ESPER_NATS_USER", raising=False)
    monkeypatch.delenv("ESPER_NATS_PASSWORD_FILE", raising=False)
    degraded: list[tuple[str, str]] = []
    pub = Publisher(bus.url, reconnect_wait_s=0.05, on_degraded=lambda k, d: degraded.append((k, d)))
    try:
        pub.publish(forged("anon"))
        deadline = time.monotonic() + 10
        while not degraded and time.monotonic() < deadline:
            time.sleep(0.05)
        assert degraded and degraded[0][0] == "unavailable", degraded
        assert pub.stats().queued == 1 and pub.stats().published == 0
    finally:
        pub.close(timeout=0.1)


def test_a_publisher_that_may_not_create_the_streams_stalls_until_they_exist(tmp_path: Path) -> None:
    # deploy/k8s before its esper-streams Job ran: Tolaria may not create streams, so its
    # events wait (reported as a stall) and go out once an admin has created them.
    from esper.oona.natsd import _ensure_streams

    creds = CredentialsDir(tmp_path / "creds")
    server = NatsServer(tmp_path / "nats", users=creds.ensure()).start()
    try:
        degraded: list[str] = []
        with Publisher(server.url, credentials=creds.credentials("tolaria"), stall_after_s=0.5,
                       ack_timeout_s=0.5, on_degraded=lambda k, d: degraded.append(k)) as pub:
            pub.publish(forged("early"))
            deadline = time.monotonic() + 15
            while "stalled" not in degraded and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "stalled" in degraded and pub.stats().published == 0, degraded
            asyncio.run(_ensure_streams(server.url, creds.credentials("admin"), 1))
            assert pub.flush(20)
            deadline = time.monotonic() + 5
            while degraded[-1] != "recovered" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert degraded[-1] == "recovered" and pub.stats().published == 1
    finally:
        server.stop()
