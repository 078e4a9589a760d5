"""Content-addressed blobs: atomic writes, hash checks on write and read, crash leftovers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from esper.errors import DataLossError, InvalidArgumentError, NotFoundError
from esper.urza.blobs import TMP_PREFIX, BlobStore


def test_put_get_fans_out_by_hash(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    data = os.urandom(5000)
    sha = blobs.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert blobs.path_for(sha) == tmp_path / sha[:2] / sha[2:4] / sha
    assert blobs.get(sha) == data
    assert blobs.put(data) == sha  # idempotent


def test_streamed_write_checks_size_and_hash_and_leaves_nothing_on_failure(
        tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    data = b"x" * 1000
    sha = hashlib.sha256(data).hexdigest()

    w = blobs.writer(sha, 1000)
    w.write(data[:400])
    with pytest.raises(InvalidArgumentError, match="artifact is 400 bytes but") as err:
        w.commit()
    assert err.value.field == "header.total_size"

    w = blobs.writer(sha, 1000)
    with pytest.raises(InvalidArgumentError, match="larger than"):
        w.write(data + b"!")

    w = blobs.writer(sha, 1000)
    w.write(b"y" * 1000)
    with pytest.raises(InvalidArgumentError, match="header's artifact_sha256") as err:
        w.commit()
    assert err.value.field == "header.artifact_sha256"

    assert not blobs.exists(sha)
    assert list(tmp_path.rglob(f"{TMP_PREFIX}*")) == []

    w = blobs.writer(sha, 1000)
    for i in range(0, 1000, 300):
        w.write(data[i:i + 300])
    assert w.commit() is True
    assert blobs.get(sha) == data


def test_half_written_temp_file_is_never_served_and_is_swept(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    data = b"complete artifact" * 100
    sha = hashlib.sha256(data).hexdigest()
    # What a writer killed before its rename leaves: a partial temp file in the final dir.
    final = blobs.path_for(sha)
    final.parent.mkdir(parents=True)
    (final.parent / f"{TMP_PREFIX}abc123").write_bytes(data[:100])
    with pytest.raises(NotFoundError, match=sha):
        blobs.get(sha)
    reopened = BlobStore(tmp_path)
    assert reopened.swept == 1
    assert list(tmp_path.rglob(f"{TMP_PREFIX}*")) == []
    reopened.put(data)
    assert reopened.get(sha) == data


def test_corrupt_blob_is_reported_quarantined_and_repairable(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    data = bytes(range(256)) * 10
    sha = blobs.put(data)
    path = blobs.path_for(sha)
    raw = bytearray(path.read_bytes())
    raw[77] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DataLossError, match="is corrupt") as err:
        blobs.get(sha)
    assert err.value.reason == "BLOB_CORRUPT"
    assert str(tmp_path) not in str(err.value)  # the caller learns no server path
    assert not path.exists()
    assert len(list(blobs.quarantine.iterdir())) == 1
    with pytest.raises(NotFoundError):
        blobs.get(sha)
    blobs.put(data)
    assert blobs.get(sha) == data


def test_bad_hash_names_are_rejected(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"sha256='\.\./etc'"):
        blobs.get("../etc")
