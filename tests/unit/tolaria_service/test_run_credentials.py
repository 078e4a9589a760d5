"""Run-scoped credentials (issue 10 point 3): a worker gets a token minted by Tolaria for its
run, with the scopes its calls need and an expiry, verified by every service with Tolaria's
public key alone; its environment holds no other key."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from esper.runtime.auth import (
    AuthConfig,
    KeyChecker,
    RunTokenError,
    RunTokenSigner,
    RunTokenVerifier,
    ensure_run_token_keys,
)
from esper.runtime.host import Host, HostConfig
from esper.runtime.spec import PlatformContext
from esper.tolaria.runs import RunStore
from esper.tolaria.supervisor import RunSupervisor, SupervisorConfig, worker_scopes
from generated.esper.tamiyo.v1 import tamiyo_service_pb2 as tamiyo_pb
from generated.esper.tamiyo.v1 import tamiyo_service_pb2_grpc as tamiyo_rpc
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb
from generated.esper.tolaria.v1 import tolaria_service_pb2_grpc as rpc

WORKER = "tests.unit.tolaria_service.scripted_worker"
ADMIN = "admin-key-of-the-platform-0123456789"
WORKER_SCOPES = ("tamiyo:read", "urza:read", "urza:write", "tezzeret:write")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reason(err: grpc.aio.AioRpcError) -> str:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for d in status_pb2.Status.FromString(value).details:
                if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    d.Unpack(info)
                    return info.reason
    return ""


@pytest.fixture
async def platform(tmp_path):
    """Tolaria and Tamiyo on one authenticated host that trusts `signer`'s run tokens."""
    signer = RunTokenSigner.generate()
    port = _free_port()
    target = f"127.0.0.1:{port}"
    key_file = tmp_path / "run-token.pem"
    key_file.write_bytes(signer.private_pem())
    ctx = PlatformContext(data_dir=tmp_path, api_key=ADMIN,
                          endpoints={"tolaria": target, "tamiyo": target, "urza": f"127.0.0.1:{_free_port()}"},
                          settings={"tolaria": {"run_token_key_file": str(key_file),
                                                "supervisor": {"worker_module": WORKER}}})
    from esper.tamiyo.service import create_service as tamiyo
    from esper.tolaria.service import create_service as tolaria

    host = Host([tolaria(ctx), tamiyo(ctx)], config=HostConfig(port=port, tracing=False),
                auth=AuthConfig(keys={ADMIN: frozenset({"*"})}, run_tokens=signer.verifier()))
    await host.start()
    ch = grpc.aio.insecure_channel(target)
    try:
        yield signer, ch
    finally:
        await ch.close()
        await host.stop()


async def test_a_run_token_calls_what_its_run_needs_and_no_write_outside_its_scopes(platform):
    signer, ch = platform
    token = signer.mint("run-0123456789ab", WORKER_SCOPES, 600)
    md = (("x-api-key", token),)
    tamiyo = tamiyo_rpc.TamiyoServiceStub(ch)
    assert (await tamiyo.GetPolicyInfo(tamiyo_pb.GetPolicyInfoRequest(), metadata=md)).policy == "heuristic"
    tolaria = rpc.TolariaServiceStub(ch)
    cfg = pb.RunConfig(task="mnist1d", host="cnn", controller="heuristic", epochs=1, batch_size=8)
    for call, req, need in ((tolaria.StartRun, pb.StartRunRequest(config=cfg), "tolaria:write"),
                            (tolaria.StopRun, pb.StopRunRequest(run_id="run-0123456789ab"), "tolaria:write"),
                            (tolaria.GetRun, pb.GetRunRequest(run_id="run-0123456789ab"), "tolaria:read")):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(req, metadata=md)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, need
        assert _reason(e.value) == "API_KEY_SCOPE_INSUFFICIENT" and f"needs scope '{need}'" in e.value.details()
    # The admin key still works: refusals come from the token's scopes, not the method.
    assert (await tolaria.ListRuns(pb.ListRunsRequest(), metadata=(("x-api-key", ADMIN),))).runs == []


async def test_an_expired_forged_or_tampered_run_token_is_unauthenticated(platform):
    signer, ch = platform
    tamiyo = tamiyo_rpc.TamiyoServiceStub(ch)
    expired = signer.mint("run-0123456789ab", ["tamiyo:read"], 60, now=time.time() - 120)
    forged = RunTokenSigner.generate().mint("run-0123456789ab", ["tamiyo:read"], 600)
    good = signer.mint("run-0123456789ab", ["tamiyo:read"], 600)
    body, _, sig = good.rpartition(".")
    tampered = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + sig
    for token, why in ((expired, "expired"), (forged, "does not trust"), (tampered, "")):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await tamiyo.GetPolicyInfo(tamiyo_pb.GetPolicyInfoRequest(), metadata=(("x-api-key", token),))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _reason(e.value) == "API_KEY_INVALID" and why in e.value.details()
        assert token not in e.value.details()


def test_run_tokens_verify_with_the_public_key_alone_and_expire(tmp_path: Path) -> None:
    private, public = ensure_run_token_keys(tmp_path / "keys")
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    signer = RunTokenSigner.from_file(private)
    assert ensure_run_token_keys(tmp_path / "keys") == (private, public)  # made once, reused
    assert RunTokenSigner.from_file(private).key_id == signer.key_id
    other = RunTokenSigner.generate()
    (tmp_path / "both.pub").write_bytes(public.read_bytes() + other.public_pem())  # a rotation
    verifier = RunTokenVerifier.from_file(tmp_path / "both.pub")
    now = 1_800_000_000.0
    token = signer.mint("run-aa", ["urza:read", "tamiyo:read"], 3600, now=now)
    grant = verifier.verify(token, now=now + 3599)
    assert (grant.run_id, grant.scopes, grant.expires_at) == ("run-aa", frozenset({"urza:read", "tamiyo:read"}),
                                                              int(now) + 3600)
    assert verifier.verify(other.mint("run-bb", ["urza:read"], 60, now=now), now=now).run_id == "run-bb"
    with pytest.raises(RunTokenError, match="expired"):
        verifier.verify(token, now=now + 3600)
    checker = KeyChecker(AuthConfig(keys={ADMIN: frozenset({"*"})}, run_tokens=verifier))
    assert checker.match(signer.mint("run-cc", ["urza:read"], 60)) == ("run:run-cc", frozenset({"urza:read"}))
    stale = signer.mint("run-cc", ["urza:read"], 3600, now=time.time() - 7200)
    assert checker.match(stale) is None and "expired" in checker.why_not(stale)
    with pytest.raises(Exception, match="not '\\*'"):
        signer.mint("run-dd", ["*"], 60)  # a run never gets everything
    env = {"ESPER_API_KEYS": f"{ADMIN}=*", "ESPER_RUN_TOKEN_PUBLIC_KEY_FILE": str(public)}
    assert AuthConfig.from_env(env).run_tokens is not None


@pytest.mark.parametrize("launcher", ["spawn", "fork"])
async def test_the_worker_environment_holds_its_run_token_and_no_other_key(tmp_path, monkeypatch, launcher):
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"{ADMIN}=*\n")
    monkeypatch.setenv("ESPER_API_KEYS", f"{ADMIN}=*")
    monkeypatch.setenv("ESPER_API_KEYS_FILE", str(keys_file))
    monkeypatch.setenv("ESPER_API_KEY", ADMIN)
    monkeypatch.setenv("ESPER_RUN_TOKEN_KEY_FILE", str(tmp_path / "run-token.pem"))
    monkeypatch.setenv("ESPER_SIGNING_KEY", "tezzeret-signing-key-material")
    monkeypatch.setenv("PGPASSWORD", "postgres-password-1234")
    monkeypatch.setenv("ESPER_URZA_DATABASE_URL", "postgresql://esper:secret@db/urza")
    signer = RunTokenSigner.generate()
    endpoints = {"tamiyo": "127.0.0.1:1", "urza": "127.0.0.1:1", "tezzeret": "127.0.0.1:1"}
    sup = RunSupervisor(RunStore(tmp_path / "tolaria"), endpoints=endpoints, nats_url=None, api_key=ADMIN,
                        validate=lambda cfg: None, signer=signer,
                        config=SupervisorConfig(worker_module=WORKER, poll_interval_s=0.02, launcher=launcher,
                                                credential_ttl_s=3600),
                        worker_args=["--env-dump", "--epoch-seconds", "0.3"])
    sup.start()
    if sup.forks is not None:
        assert sup.forks.wait_ready(60)
    cfg = pb.RunConfig(task="mnist1d", host="cnn", controller="heuristic", epochs=3, batch_size=8)
    rec = await sup.start_run(cfg, request_id=None, traceparent=None)
    dump = sup.store.run_dir(rec.run_id) / "env.json"
    for _ in range(300):
        if dump.exists() and dump.stat().st_size:
            break
        await asyncio.sleep(0.05)
    env = json.loads(dump.read_text())
    secret_values = [ADMIN, "tezzeret-signing-key-material", "postgres-password-1234", "secret@db"]
    for name, value in env.items():
        assert not any(s in value for s in secret_values), name
    for name in ("ESPER_API_KEYS", "ESPER_API_KEYS_FILE", "ESPER_RUN_TOKEN_KEY_FILE", "ESPER_SIGNING_KEY",
                 "PGPASSWORD", "ESPER_URZA_DATABASE_URL"):
        assert name not in env, name
    grant = signer.verifier().verify(env["ESPER_API_KEY"])
    assert grant.run_id == rec.run_id and grant.scopes == frozenset(WORKER_SCOPES)
    assert 3300 <= grant.expires_at - time.time() <= 3600  # an hour, minus a loaded machine's delay
    # Not even the process's initial environment block (what a fork inherits) holds a key.
    environ = Path(f"/proc/{sup.worker_pid(rec.run_id)}/environ").read_bytes()
    assert ADMIN.encode() not in environ and b"ESPER_API_KEYS" not in environ
    events = [e async for e in sup.watch(rec.run_id, 0)]
    assert events[-1].run_state.state == "succeeded"
    await sup.close()


def test_a_run_without_a_controller_calls_nobody_and_gets_no_token() -> None:
    assert worker_scopes("none", {"tamiyo": "x", "urza": "y"}) == ()
    assert worker_scopes("heuristic", {"tamiyo": "x", "urza": "y"}) == ("tamiyo:read", "urza:read", "urza:write")


def test_tolaria_with_auth_but_no_run_token_key_refuses_to_start(tmp_path, monkeypatch) -> None:
    from esper.errors import ConfigError
    from esper.tolaria.service import create_service

    monkeypatch.delenv("ESPER_RUN_TOKEN_KEY_FILE", raising=False)
    with pytest.raises(ConfigError, match="ESPER_RUN_TOKEN_KEY_FILE"):
        create_service(PlatformContext(data_dir=tmp_path, api_key=ADMIN))
