"""Issue 11, Urza's half, over real gRPC (runtime host, auth, protovalidate, error mapping):
typed values are INVALID_ARGUMENT naming the field, replies fit the default 4 MiB limit
whatever is stored, uploads leave nothing behind, revoked signers take effect, operators
can retire and delete, and no reply carries a server path."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from esper.blueprints.artifact import SigningKey
from esper.errors import UntrustedKeyError
from esper.runtime.errors import as_esper_error
from esper.runtime.spec import PlatformContext
from esper.urza.client import UrzaClient
from esper.urza.service import open_library
from esper.urza.store import BlueprintRow, KernelRow
from generated.esper.common.v1 import blueprint_pb2, kernel_pb2
from generated.esper.urza.v1 import urza_service_pb2 as pb
from generated.esper.urza.v1 import urza_service_pb2_grpc as rpc
from tests.unit.urza.kernels_helper import blueprint, make_artifact
from tests.unit.urza.urza_server import API_KEY, urza

DEFAULT_CAP = 4 << 20  # gRPC's default max receive message length
READ_KEY = "urza-read-only-key"
KEYS = {API_KEY: frozenset({"*"}), READ_KEY: frozenset({"urza:read"})}
KID = "sha256:" + "a" * 64


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


def _keys_dir(root: Path, *keys: SigningKey) -> Path:
    d = root / "keys"
    d.mkdir(exist_ok=True)
    for i, k in enumerate(keys):
        (d / f"signer{i}.pem").write_bytes(k.public_pem())
    return d


def _call(target: str, method: str, request: Message, *, key: str = API_KEY) -> Any:
    """One call on a channel with gRPC's default limits (what a plain client has)."""
    with grpc.insecure_channel(target) as ch:
        fn = getattr(rpc.UrzaServiceStub(ch), method)
        result = fn(request, timeout=20, metadata=[("x-api-key", key)])
        return list(result) if method == "GetKernel" else result


def _refused(target: str, method: str, request: Message, **kw: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        _call(target, method, request, **kw)
    return err.value


def _put_raw(target: str, messages: Iterator[pb.PutKernelRequest] | list[pb.PutKernelRequest]
             ) -> pb.PutKernelResponse:
    with grpc.insecure_channel(target) as ch:
        return rpc.UrzaServiceStub(ch).PutKernel(iter(messages), timeout=30,
                                                 metadata=[("x-api-key", API_KEY)])


def _upload(data: bytes, *, sha: str | None = None, size: int | None = None,
            chunk: int = 1 << 20) -> list[pb.PutKernelRequest]:
    header = pb.KernelUploadHeader(total_size=len(data) if size is None else size,
                                   artifact_sha256=sha or hashlib.sha256(data).hexdigest())
    return [pb.PutKernelRequest(header=header),
            *(pb.PutKernelRequest(chunk=data[o:o + chunk]) for o in range(0, len(data), chunk))]


def _token(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> float:
    """Seconds until `check()` held (fails after `timeout_s`)."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout_s, "condition not reached in time"
        time.sleep(0.05)
    return time.monotonic() - t0


# -- 1. typed values are INVALID_ARGUMENT, never INTERNAL -----------------------------


@pytest.fixture(scope="module")
def shared_target(tmp_path_factory: pytest.TempPathFactory, key: SigningKey) -> Iterator[str]:
    root = tmp_path_factory.mktemp("urza-shared")
    with urza(root / "data", _keys_dir(root, key)) as t:
        yield t


def _report(**kw: Any) -> pb.RecordOutcomeRequest:
    req = pb.RecordOutcomeRequest(report=pb.FieldReport(
        kernel_id=KID, run_id="run-1", slot_id="fc1", fate=pb.SEED_FATE_PRUNED))
    ts = kw.pop("recorded_at", None)
    for k, v in kw.items():
        setattr(req.report, k, v)
    if ts is not None:
        req.report.recorded_at.seconds, req.report.recorded_at.nanos = ts
    return req


_FP = "0" * 16
TYPED_CASES: list[tuple[str, str, Message]] = [
    ("max_parameters", "QueryKernels", pb.QueryKernelsRequest(max_parameters=2**63)),
    ("max_parameters", "QueryKernels", pb.QueryKernelsRequest(max_parameters=2**64 - 1)),
    ("report.contribution", "RecordOutcome", _report(contribution=float("nan"))),
    ("report.contribution", "RecordOutcome", _report(contribution=float("inf"))),
    ("report.contribution", "RecordOutcome", _report(contribution=float("-inf"))),
    ("report.accuracy_delta", "RecordOutcome", _report(accuracy_delta=float("nan"))),
    ("report.parameters", "RecordOutcome", _report(parameters=2**63)),
    ("report.germinated_epoch", "RecordOutcome", _report(germinated_epoch=2**32 - 1)),
    ("report.ended_epoch", "RecordOutcome", _report(ended_epoch=2**31)),
    ("report.recorded_at", "RecordOutcome", _report(recorded_at=(-1, 0))),
    ("report.recorded_at", "RecordOutcome", _report(recorded_at=(2**62, 0))),
    ("report.recorded_at", "RecordOutcome", _report(recorded_at=(0, -1))),
    ("report.recorded_at", "RecordOutcome", _report(recorded_at=(10, 2 * 10**9))),
    ("report.slot_id", "RecordOutcome", _report(slot_id="s" * 257)),
    ("tags", "QueryKernels", pb.QueryKernelsRequest(tags=[f"t{i}" for i in range(33)])),
    ("family", "ListBlueprints", pb.ListBlueprintsRequest(family="f" * 65)),
]
for _method, _req in (("QueryKernels", pb.QueryKernelsRequest),
                      ("ListBlueprints", pb.ListBlueprintsRequest)):
    for _tok in (_token({"after": 1e999}).replace("Infinity", "1e999"),
                 base64.urlsafe_b64encode(b'{"after":1e999}').decode(),
                 _token({"o": 2**63, "f": _FP}), _token({"o": -1, "f": _FP}),
                 base64.urlsafe_b64encode(b'{"o":1e999,"f":"0000000000000000"}').decode(),
                 _token({"o": True, "f": _FP}), _token({"o": 5, "f": _FP, "x": 1}),
                 _token({"o": 5, "f": "zz"}), _token([1, 2]),
                 "not hex: fromhex() would choke", "zz", "%%%", "A" * 300, "__8="):
        TYPED_CASES.append(("page_token", _method, _req(page_token=_tok)))


@pytest.mark.parametrize(("field", "method", "request_msg"), TYPED_CASES,
                         ids=[f"{m}-{f}-{i}" for i, (f, m, _) in enumerate(TYPED_CASES)])
def test_typed_values_are_invalid_arguments_naming_the_field(
        shared_target: str, field: str, method: str, request_msg: Message) -> None:
    err = _refused(shared_target, method, request_msg)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    fields = [f for f, _ in as_esper_error(err).field_violations]  # type: ignore[attr-defined]
    assert field in fields, (fields, err.details())
    for leak in ("fromhex", "Expecting", "Traceback", "OverflowError", "IntegrityError"):
        assert leak not in err.details()


def test_the_library_checks_what_the_proto_rules_check(tmp_path: Path, key: SigningKey) -> None:
    """Where protovalidate is not in front (in-process callers), the core refuses the same
    values, naming the same fields."""
    from esper.errors import InvalidArgumentError

    lib = open_library(PlatformContext(data_dir=tmp_path, settings={"urza": {
        "trusted_keys_dir": str(_keys_dir(tmp_path, key))}}))
    try:
        for field, method, req in TYPED_CASES:
            call = {"RecordOutcome": lambda r: lib.record_outcome(r.report),
                    "QueryKernels": lambda r: lib.query_kernels(
                        tags=r.tags, max_parameters=r.max_parameters, page_token=r.page_token),
                    "ListBlueprints": lambda r: lib.list_blueprints(
                        family=r.family, page_token=r.page_token)}[method]
            with pytest.raises(InvalidArgumentError) as err:
                call(req)
            assert err.value.field == field, (field, str(err.value))
    finally:
        lib.close()


# -- 2. bounded replies, whatever is stored -------------------------------------------


@pytest.fixture
def stuffed(tmp_path: Path, key: SigningKey) -> Iterator[tuple[str, list[str], list[str]]]:
    """Urza over a database holding what once broke every reply: a blueprint stored before
    parent_ids had a bound (8 x 450 KB) with three kernels compiled from it, and kernels
    whose records are 1 MB each. Yields (target, fat-blueprint kernel ids, big ids)."""
    keys = _keys_dir(tmp_path, key)
    ctx = PlatformContext(data_dir=tmp_path / "data",
                          settings={"urza": {"trusted_keys_dir": str(keys)}})
    lib = open_library(ctx)
    bp = blueprint("lowrank_adapter")
    fat = blueprint_pb2.Blueprint()
    fat.CopyFrom(bp)
    fat.blueprint_id = lib.put_blueprint(bp)[0]
    fat.parent_ids.extend(["p" * 450_000 + str(i) for i in range(8)])
    lib.store.delete_blueprint(fat.blueprint_id)  # and store it again as an old Urza did
    lib.store.put_blueprint(BlueprintRow(
        blueprint_id=fat.blueprint_id, name=fat.name, family=fat.family, layouts=(1,), tags=(),
        data=fat.SerializeToString()))
    fat_ids = []
    for c in (16, 32, 64):
        kid, data, _ = make_artifact(key, channels=c)
        lib.put_kernel(data)
        fat_ids.append(kid)
    big_ids = []
    for i in range(5):
        manifest = kernel_pb2.KernelManifest(blueprint_id="bp-00000000000000bb", key_id=key.key_id)
        manifest.validation.notes.append(f"{i}" * (1 << 20))
        kid = f"sha256:{i:064x}"
        lib.store.put_kernel(KernelRow(
            kernel_id=kid, blueprint_id="bp-00000000000000bb", site_key="NC/8", parameters=1,
            artifact_sha256=f"{i:064x}", artifact_size=1, manifest=manifest.SerializeToString(),
            key_id=key.key_id))
        big_ids.append(kid)
    assert len(fat.SerializeToString()) * 3 > 10 << 20  # the issue's 10.8 MB reply
    lib.close()
    with urza(tmp_path / "data", keys) as target:
        yield target, fat_ids, big_ids


def test_every_reply_fits_the_default_limit_whatever_is_stored(
        stuffed: tuple[str, list[str], list[str]]) -> None:
    target, fat_ids, big_ids = stuffed
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        resp = _call(target, "QueryKernels", pb.QueryKernelsRequest(page_size=1000,
                                                                    page_token=token))
        assert resp.ByteSize() < DEFAULT_CAP
        seen += [r.kernel_id for r in resp.kernels]
        pages += 1
        for r in resp.kernels:
            assert list(r.blueprint.parent_ids) == []  # the old, unbounded ids are trimmed
        token = resp.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(fat_ids + big_ids) and len(seen) == len(set(seen))
    assert pages >= 2  # five 1 MB records do not fit one reply: the page ended early

    listed = _call(target, "ListBlueprints", pb.ListBlueprintsRequest())
    assert [len(b.parent_ids) for b in listed.blueprints] == [0]
    bp_id = listed.blueprints[0].blueprint_id
    got = _call(target, "GetBlueprint", pb.GetBlueprintRequest(blueprint_id=bp_id))
    assert got.blueprint.name == "lowrank_adapter" and not got.blueprint.parent_ids
    msgs = _call(target, "GetKernel", pb.GetKernelRequest(kernel_id=fat_ids[0]))
    assert msgs[0].info.blueprint.blueprint_id == bp_id
    # Operators can remove the cause: no more lasting denial of service.
    deleted = _call(target, "DeleteBlueprint", pb.DeleteBlueprintRequest(blueprint_id=bp_id))
    assert (deleted.deleted, deleted.kernels_deleted) == (True, 3)


def test_parent_ids_must_be_blueprint_ids(shared_target: str) -> None:
    bp = blueprint("bottleneck_mlp")
    bp.parent_ids.append("x" * 100)
    err = _refused(shared_target, "PutBlueprint", pb.PutBlueprintRequest(blueprint=bp))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "blueprint.parent_ids[0]" in [f for f, _ in as_esper_error(err).field_violations]  # type: ignore[attr-defined]


def test_pages_stop_at_the_byte_budget_and_resume_exactly(
        tmp_path: Path, key: SigningKey, monkeypatch: pytest.MonkeyPatch) -> None:
    from esper.urza import library

    lib = open_library(PlatformContext(data_dir=tmp_path, settings={"urza": {
        "trusted_keys_dir": str(_keys_dir(tmp_path, key))}}))
    try:
        lib.put_blueprint(blueprint("lowrank_adapter"))
        ids = {make_artifact(key, channels=c)[0] for c in range(8, 40, 4)}
        for c in range(8, 40, 4):
            lib.put_kernel(make_artifact(key, channels=c)[1])
        one = lib.query_kernels(page_size=1)[0][0].ByteSize()
        monkeypatch.setattr(library, "REPLY_BUDGET_BYTES", 3 * one + 40)
        seen: list[str] = []
        token = ""
        while True:
            recs, token = lib.query_kernels(page_size=100, page_token=token)
            assert 1 <= len(recs) <= 3
            seen += [r.kernel_id for r in recs]
            if not token:
                break
        assert sorted(seen) == sorted(ids)
    finally:
        lib.close()


# -- 4. uploads stream, refuse early and leave nothing behind ---------------------------


@pytest.fixture
def upload_target(tmp_path: Path, key: SigningKey) -> Iterator[tuple[str, Path]]:
    with urza(tmp_path / "data", _keys_dir(tmp_path, key), max_artifact_bytes=2 << 20) as t:
        yield t, tmp_path / "data" / "urza" / "blobs"


def test_refused_uploads_leave_no_blob_and_no_temp_file(
        upload_target: tuple[str, Path], key: SigningKey) -> None:
    target, blobs = upload_target
    _, data, _ = make_artifact(key, channels=64)
    _, stranger, _ = make_artifact(SigningKey.generate(), channels=64)
    garbage = os.urandom(300_000)
    cases = {
        "untrusted signer": (_upload(stranger), grpc.StatusCode.FAILED_PRECONDITION),
        "not an artifact": (_upload(garbage), grpc.StatusCode.INVALID_ARGUMENT),
        "over the cap": (_upload(b"x" * 10, size=(2 << 20) + 1), grpc.StatusCode.INVALID_ARGUMENT),
        "longer than its header": (_upload(data, size=len(data) - 1),
                                   grpc.StatusCode.INVALID_ARGUMENT),
        "hash mismatch": (_upload(data, sha="ab" * 32), grpc.StatusCode.INVALID_ARGUMENT),
        "padded (a fifth part)": (_upload(data + b"\x2a\x03pad"),
                                  grpc.StatusCode.INVALID_ARGUMENT),
        "a part twice": (_upload(data + data[:200]), grpc.StatusCode.INVALID_ARGUMENT),
    }
    for name, (messages, code) in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            _put_raw(target, messages)
        assert err.value.code() == code, (name, err.value.details())
        assert _files(blobs) == [], name


def test_a_cancelled_upload_leaves_no_temp_file(upload_target: tuple[str, Path],
                                                key: SigningKey) -> None:
    target, blobs = upload_target
    _, data, _ = make_artifact(key, name="bottleneck_mlp", channels=256)
    sent = threading.Event()

    def messages() -> Iterator[pb.PutKernelRequest]:
        msgs = _upload(data, chunk=64 << 10)
        yield from msgs[:3]
        sent.set()
        time.sleep(30)  # never finishes: the client gives up

    with grpc.insecure_channel(target) as ch:
        future = rpc.UrzaServiceStub(ch).PutKernel.future(
            messages(), timeout=30, metadata=[("x-api-key", API_KEY)])
        sent.wait(10)
        _eventually(lambda: len(_files(blobs)) == 1)  # the temp file of the upload
        future.cancel()
    _eventually(lambda: _files(blobs) == [])


def test_a_stored_kernel_is_not_written_again(upload_target: tuple[str, Path],
                                              key: SigningKey) -> None:
    target, blobs = upload_target
    kid, data, _ = make_artifact(key, channels=64)
    assert _put_raw(target, _upload(data)).created
    stored = _files(blobs)
    mtime = stored[0].stat().st_mtime_ns
    # The same kernel in other bytes (parts in another order: same manifest, same id).
    art = kernel_pb2.KernelArtifact.FromString(data)
    reordered = b"".join(kernel_pb2.KernelArtifact(**{f: getattr(art, f)}).SerializeToString()
                         for f in ("weights", "ir", "signature", "manifest"))
    assert reordered != data
    for again in (data, reordered):
        resp = _put_raw(target, _upload(again))
        assert (resp.kernel_id, resp.created) == (kid, False)
    assert _files(blobs) == stored and stored[0].stat().st_mtime_ns == mtime


def test_too_many_uploads_at_once_are_resource_exhausted(tmp_path: Path,
                                                         key: SigningKey) -> None:
    from esper.errors import ResourceExhaustedError

    lib = open_library(PlatformContext(data_dir=tmp_path, settings={"urza": {
        "trusted_keys_dir": str(_keys_dir(tmp_path, key)), "max_concurrent_uploads": 2}}))
    try:
        a, b = lib.begin_upload("a" * 64, 10), lib.begin_upload("b" * 64, 10)
        with pytest.raises(ResourceExhaustedError, match="max_concurrent_uploads"):
            lib.begin_upload("c" * 64, 10)
        a.abort()
        lib.begin_upload("c" * 64, 10).abort()
        b.abort()
        assert _files(lib.blobs.staging_dir) == []  # type: ignore[attr-defined]
    finally:
        lib.close()


def test_orphan_blobs_are_swept_at_start_after_their_grace(tmp_path: Path,
                                                           key: SigningKey) -> None:
    keys = _keys_dir(tmp_path, key)
    ctx = PlatformContext(data_dir=tmp_path / "data",
                          settings={"urza": {"trusted_keys_dir": str(keys)}})
    lib = open_library(ctx)
    kid, data, _ = make_artifact(key)
    lib.put_kernel(data)
    kept = lib.blobs.path_for(hashlib.sha256(data).hexdigest())  # type: ignore[attr-defined]
    old_orphan = lib.blobs.path_for(lib.blobs.put(b"left by a crash"))  # type: ignore[attr-defined]
    young_orphan = lib.blobs.path_for(lib.blobs.put(b"an upload in flight"))  # type: ignore[attr-defined]
    hour_ago = time.time() - 3600
    for p in (kept, old_orphan):
        os.utime(p, (hour_ago, hour_ago))
    lib.close()
    with urza(tmp_path / "data", keys, orphan_grace_s=600) as target:
        _eventually(lambda: not old_orphan.exists())
        assert kept.exists() and young_orphan.exists()
        with UrzaClient(target, api_key=API_KEY) as client:
            assert client.get_kernel(kid, timeout_s=10) == data
            # A deleted kernel's blob goes with a later sweep, not under a running download.
            assert client.delete_kernel(kid, timeout_s=5)
            assert not client.delete_kernel(kid, timeout_s=5)
    lib = open_library(ctx)
    assert lib.sweep_orphans() == 1  # the deleted kernel's (old) blob; the young one stays
    assert not kept.exists() and young_orphan.exists()
    lib.close()


# -- 5. revoking a signer takes effect --------------------------------------------------


def test_removing_a_trusted_key_revokes_it_without_restart(tmp_path: Path) -> None:
    revoked, kept = SigningKey.generate(), SigningKey.generate()
    keys = _keys_dir(tmp_path, revoked, kept)
    gone_id, gone, _ = make_artifact(revoked, channels=16)
    kept_id, kept_data, _ = make_artifact(kept, channels=16)
    _, later, _ = make_artifact(revoked, channels=32)
    with urza(tmp_path / "data", keys, trusted_keys_reload_s=0.2) as target, \
            UrzaClient(target, api_key=API_KEY) as client:
        client.put_kernel(gone, timeout_s=10)
        client.put_kernel(kept_data, timeout_s=10)
        assert {r.kernel_id for r in client.query_kernels(5)[0]} == {gone_id, kept_id}
        (keys / "signer0.pem").unlink()

        def refused() -> bool:
            try:
                client.get_kernel(gone_id, timeout_s=5)
            except UntrustedKeyError:
                return True
            return False

        took = _eventually(refused, timeout_s=5.0)
        err = _refused(target, "GetKernel", pb.GetKernelRequest(kernel_id=gone_id))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no longer trusts" in err.details() and revoked.key_id in err.details()
        assert [r.kernel_id for r in client.query_kernels(5)[0]] == [kept_id]
        with pytest.raises(UntrustedKeyError):
            client.put_kernel(later, timeout_s=10)
        assert client.get_kernel(kept_id, timeout_s=5) == kept_data
        print(f"\nrevocation took effect after {took:.2f} s")
    # ... and after a restart.
    with urza(tmp_path / "data", keys) as target, UrzaClient(target, api_key=API_KEY) as client:
        with pytest.raises(UntrustedKeyError):
            client.get_kernel(gone_id, timeout_s=5)
        assert [r.kernel_id for r in client.query_kernels(5)[0]] == [kept_id]
        # Trusting the key again brings its kernels back.
        (keys / "signer0.pem").write_bytes(revoked.public_pem())
        _eventually(lambda: len(client.query_kernels(5)[0]) == 2)
        assert client.get_kernel(gone_id, timeout_s=5) == gone


# -- 2. retire and delete ---------------------------------------------------------------


def test_retire_then_delete_a_blueprint(tmp_path: Path, key: SigningKey) -> None:
    with urza(tmp_path / "data", _keys_dir(tmp_path, key), keys=KEYS) as target, \
            UrzaClient(target, api_key=API_KEY) as client:
        bp_id, _ = client.put_blueprint(blueprint("lowrank_adapter"), 10)
        other_id, _ = client.put_blueprint(blueprint("bottleneck_mlp"), 10)
        kid, data, _ = make_artifact(key, channels=16)
        mlp_id, mlp, _ = make_artifact(key, name="bottleneck_mlp", channels=16)
        client.put_kernel(data, timeout_s=10)
        client.put_kernel(mlp, timeout_s=10)
        client.record_outcome(pb.FieldReport(kernel_id=kid, run_id="r", slot_id="s",
                                             contribution=0.1, fate=pb.SEED_FATE_FOSSILIZED), 5)
        # Retiring needs the write scope.
        err = _refused(target, "RetireBlueprint",
                       pb.RetireBlueprintRequest(blueprint_id=bp_id), key=READ_KEY)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED

        assert client.retire_blueprint(bp_id, 5, reason="regressed on cifar")
        assert not client.retire_blueprint(bp_id, 5)  # idempotent
        assert [r.kernel_id for r in client.query_kernels(5)[0]] == [mlp_id]
        assert {r.kernel_id for r in client.query_kernels(5, include_retired=True)[0]} == {
            kid, mlp_id}
        assert client.get_kernel(kid, timeout_s=5) == data  # runs holding it keep it
        assert [b.blueprint_id for b in client.list_blueprints(5)[0]] == [other_id]
        listed = _call(target, "ListBlueprints", pb.ListBlueprintsRequest(include_retired=True))
        assert list(listed.retired_blueprint_ids) == [bp_id]
        status = client.blueprint_status(bp_id, 5)
        assert status.retired and status.retired_reason == "regressed on cifar"
        assert abs(status.retired_at.ToSeconds() - time.time()) < 60
        assert client.retire_blueprint(bp_id, 5, restore=True)
        assert len(client.query_kernels(5)[0]) == 2
        assert client.retire_blueprint(bp_id, 5)

        err = _refused(target, "DeleteBlueprint", pb.DeleteBlueprintRequest(blueprint_id=bp_id),
                       key=READ_KEY)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert client.delete_blueprint(bp_id, 5) == (True, 1)
        assert client.delete_blueprint(bp_id, 5) == (False, 0)
        assert [r.kernel_id for r in client.query_kernels(5, include_retired=True)[0]] == [mlp_id]
        err = _refused(target, "GetKernel", pb.GetKernelRequest(kernel_id=kid))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        err = _refused(target, "RetireBlueprint", pb.RetireBlueprintRequest(blueprint_id=bp_id))
        assert err.code() == grpc.StatusCode.NOT_FOUND


def test_delete_field_reports_of_a_run(tmp_path: Path, key: SigningKey) -> None:
    with urza(tmp_path / "data", _keys_dir(tmp_path, key)) as target, \
            UrzaClient(target, api_key=API_KEY) as client:
        kid, data, _ = make_artifact(key, channels=16)
        client.put_kernel(data, timeout_s=10)
        for run, c in (("good", 0.2), ("poison", 1e300), ("poison", 1e300)):
            client.record_outcome(pb.FieldReport(kernel_id=kid, run_id=run, slot_id="s",
                                                 contribution=c, fate=pb.SEED_FATE_FOSSILIZED), 5)
        assert client.query_kernels(5)[0][0].stats.mean_contribution == pytest.approx(2.2 / 3)
        assert client.delete_field_reports(5, run_id="poison") == 2
        stats = client.query_kernels(5)[0][0].stats
        assert (stats.outcomes, stats.mean_contribution) == (1, pytest.approx(0.2))
        assert stats.score == pytest.approx(0.2 / 2)
        err = _refused(target, "DeleteFieldReports", pb.DeleteFieldReportsRequest())
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- 6. no server paths in replies -------------------------------------------------------


def test_data_loss_names_no_server_path(tmp_path: Path, key: SigningKey) -> None:
    with urza(tmp_path / "data", _keys_dir(tmp_path, key)) as target, \
            UrzaClient(target, api_key=API_KEY) as client:
        kid, data, _ = make_artifact(key, channels=16)
        client.put_kernel(data, timeout_s=10)
        sha = hashlib.sha256(data).hexdigest()
        blob = tmp_path / "data" / "urza" / "blobs" / sha[:2] / sha[2:4] / sha
        blob.write_bytes(data[:-1] + b"!")  # corrupt
        corrupt = _refused(target, "GetKernel", pb.GetKernelRequest(kernel_id=kid))
        missing = _refused(target, "GetKernel", pb.GetKernelRequest(kernel_id=kid))  # quarantined
        for err in (corrupt, missing):
            assert err.code() == grpc.StatusCode.DATA_LOSS
            assert str(tmp_path) not in err.details() and "/" not in err.details(), err.details()
        assert "corrupt" in corrupt.details() and "missing" in missing.details()
