"""Urza's S3-compatible blob store against a real S3 HTTP server on loopback.

The server is moto's standalone S3 server (`python -m moto.server`), a separate process
that speaks the S3 REST API; Urza talks to it through boto3 exactly as it would to AWS
S3 or MinIO (signed requests, checksums, path-style addressing).
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

from esper.blueprints.artifact import SigningKey
from esper.errors import (
    ConfigError,
    DataLossError,
    NotFoundError,
    UnavailableError,
    UntrustedKeyError,
)
from esper.runtime.spec import PlatformContext
from esper.urza.client import UrzaClient
from esper.urza.config import UrzaConfig
from esper.urza.library import TrustedKeySource, UrzaLibrary
from esper.urza.s3blobs import S3BlobStore
from esper.urza.service import create_service
from esper.urza.store.sqlite import SqliteStore
from tests.unit.urza.kernels_helper import make_artifact
from tests.unit.urza.urza_server import API_KEY, hosted

pytestmark = pytest.mark.integration

BUCKET = "esper-kernels"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server in its own process, stoppable to play an outage."""

    def __init__(self, log: Path) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self._log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {self._log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("moto server did not listen within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Any credentials sign requests for moto; none may leak in from the machine.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "esper-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "esper-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def s3(tmp_path: Path, _aws_env: None) -> Iterator[S3Server]:
    server = S3Server(tmp_path / "moto.log")
    server.start()
    raw = _raw(server)
    raw.create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


def _raw(server: S3Server):  # type: ignore[no-untyped-def]
    return boto3.session.Session().client("s3", endpoint_url=server.endpoint,
                                          region_name="us-east-1")


def _store(server: S3Server, prefix: str = "urza", **kw: float | Path) -> S3BlobStore:
    return S3BlobStore(f"s3://{BUCKET}/{prefix}", endpoint_url=server.endpoint, **kw)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


def test_blobs_round_trip_content_addressed_under_the_prefix(s3: S3Server) -> None:
    store = _store(s3)
    data = b"kernel bytes " * 1000
    sha = store.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.get(sha) == data and store.exists(sha)
    assert store.put(data) == sha  # idempotent
    keys = [o["Key"] for o in _raw(s3).list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert keys == [f"urza/sha256/{sha[:2]}/{sha}"]
    missing = "0" * 64
    assert not store.exists(missing)
    with pytest.raises(NotFoundError, match=missing):
        store.get(missing)
    store.close()


def test_a_corrupt_object_is_quarantined_never_served_and_repaired_by_a_reupload(
        s3: S3Server) -> None:
    store = _store(s3)
    data = b"the real artifact " * 100
    sha = store.put(data)
    key = store.key_for(sha)
    _raw(s3).put_object(Bucket=BUCKET, Key=key, Body=data[:-1] + b"X")  # bit rot / tampering
    with pytest.raises(DataLossError, match="corrupt") as err:
        store.get(sha)
    assert err.value.reason == "BLOB_CORRUPT"
    keys = [o["Key"] for o in _raw(s3).list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert key not in keys
    assert [k for k in keys if k.startswith(f"urza/quarantine/{sha}.")]
    with pytest.raises(NotFoundError):
        store.get(sha)  # gone from its name: never served
    store.put(data)
    assert store.get(sha) == data


def test_a_missing_bucket_is_a_config_error_naming_it(s3: S3Server) -> None:
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        S3BlobStore("s3://no-such-bucket/x", endpoint_url=s3.endpoint)


def test_blob_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"must be s3://<bucket>"):
        UrzaConfig.from_dict({"blob_url": "https://example.com/bucket"})
    with pytest.raises(ConfigError, match="both set"):
        UrzaConfig.from_dict({"blob_url": "s3://b", "blob_dir": "/data/blobs"})
    with pytest.raises(ConfigError, match="blob_url is empty"):
        UrzaConfig.from_dict({"s3_endpoint_url": "http://minio:9000"})
    with pytest.raises(ConfigError, match="blob_bucket"):
        UrzaConfig.from_dict({"blob_bucket": "b"})


def test_an_unreachable_store_is_unavailable_and_loses_nothing(
        s3: S3Server, tmp_path: Path, key: SigningKey) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    (keys_dir / "signer.pem").write_bytes(key.public_pem())
    blobs = _store(s3, connect_timeout_s=1.0, read_timeout_s=2.0, max_attempts=2)
    lib = UrzaLibrary(SqliteStore(tmp_path / "urza.db"), blobs, TrustedKeySource(keys_dir))
    first_id, first, _ = make_artifact(key, channels=16)
    second_id, second, _ = make_artifact(key, channels=32)
    assert lib.put_kernel(first) == (first_id, True)
    assert lib.read_kernel(first_id).data == first

    s3.stop()
    with pytest.raises(UnavailableError, match="unreachable") as err:
        lib.put_kernel(second)
    assert err.value.reason == "BLOB_STORE_UNAVAILABLE"
    # No metadata row points at bytes that were never stored.
    with pytest.raises(NotFoundError):
        lib.kernel_record(second_id)
    assert [r.kernel_id for r in lib.query_kernels()[0]] == [first_id]
    # A read during the outage is UNAVAILABLE (retry later), not DATA_LOSS.
    with pytest.raises(UnavailableError):
        lib.read_kernel(first_id)
    assert lib.kernel_record(first_id).artifact_size == len(first)
    lib.close()


def test_urza_serves_kernels_from_the_bucket_over_grpc(
        s3: S3Server, tmp_path: Path, key: SigningKey) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    (keys_dir / "signer.pem").write_bytes(key.public_pem())
    ctx = PlatformContext(data_dir=tmp_path / "data", settings={"urza": {
        "trusted_keys_dir": str(keys_dir), "blob_url": f"s3://{BUCKET}/library",
        "s3_endpoint_url": s3.endpoint}})
    kernel_id, data, _ = make_artifact(key, channels=256)
    with hosted(create_service(ctx)) as target, UrzaClient(target, api_key=API_KEY) as client:
        assert client.put_kernel(data, timeout_s=20) == (kernel_id, True)
        assert client.get_kernel(kernel_id, timeout_s=20, chunk_size=4096) == data
    sha = hashlib.sha256(data).hexdigest()
    stored = _raw(s3).get_object(Bucket=BUCKET, Key=f"library/sha256/{sha[:2]}/{sha}")
    assert stored["Body"].read() == data
    # Nothing went to the local blob directory.
    assert not (tmp_path / "data" / "urza" / "blobs").exists()


def test_orphan_sweep_and_streamed_uploads_on_the_bucket(
        s3: S3Server, tmp_path: Path, key: SigningKey) -> None:
    """Uploads reach the bucket from their temp file; refused ones leave nothing there; the
    sweep removes objects no kernel refers to once they are past their grace."""
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    (keys_dir / "signer.pem").write_bytes(key.public_pem())
    blobs = _store(s3, staging_dir=tmp_path / "uploads")  # type: ignore[arg-type]
    lib = UrzaLibrary(SqliteStore(tmp_path / "urza.db"), blobs, TrustedKeySource(keys_dir))
    kid, data, _ = make_artifact(key, channels=16)
    assert lib.put_kernel(data) == (kid, True)
    _, stranger, _ = make_artifact(SigningKey.generate(), channels=16)
    with pytest.raises(UntrustedKeyError):
        lib.put_kernel(stranger)
    assert list((tmp_path / "uploads").iterdir()) == []

    def keys() -> list[str]:
        return sorted(o["Key"] for o in _raw(s3).list_objects_v2(Bucket=BUCKET).get(
            "Contents", []))

    sha = hashlib.sha256(data).hexdigest()
    assert keys() == [f"urza/sha256/{sha[:2]}/{sha}"]
    orphan = blobs.put(b"an interrupted upload's blob")
    assert lib.sweep_orphans() == 0  # within the default grace
    assert lib.sweep_orphans(older_than_s=0) == 1
    assert keys() == [f"urza/sha256/{sha[:2]}/{sha}"] and not blobs.exists(orphan)
    assert lib.read_kernel(kid).data == data
    lib.delete_kernel(kid)
    assert lib.sweep_orphans(older_than_s=0) == 1 and keys() == []
    lib.close()
