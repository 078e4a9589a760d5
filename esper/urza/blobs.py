"""Content-addressed blob directory for kernel artifacts.

Layout: `<root>/<h[0:2]>/<h[2:4]>/<h>` where `h` is the lower-case hex SHA-256 of the
bytes. A blob is written to a temp file in its final directory, fsynced, renamed into
place, and the directory fsynced, so after a crash a name either holds the complete
bytes or does not exist. Temp files (`.tmp-*`) are never served and are swept at
open. Every read re-hashes the bytes: a blob corrupted on disk is reported
(`DataLossError`, reason BLOB_CORRUPT) and moved aside, never served.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Protocol

from esper.errors import DataLossError, InvalidArgumentError, NotFoundError

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
TMP_PREFIX = ".tmp-"


class Blobs(Protocol):
    """What Urza's library needs from a blob store: this module's `BlobStore` (a local
    directory) or `esper.urza.s3blobs.S3BlobStore` (an S3-compatible bucket)."""

    location: str
    """Where the blobs are, for messages (a path or an s3:// URL)."""

    def put(self, data: bytes) -> str: ...
    def get(self, sha256: str) -> bytes: ...
    def exists(self, sha256: str) -> bool: ...
    def close(self) -> None: ...


def check_sha(sha256: str) -> str:
    if not _HEX64.match(sha256):
        raise InvalidArgumentError(
            f"sha256={sha256!r}: must be 64 lower-case hex characters", field="artifact_sha256"
        )
    return sha256


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobWriter:
    """Streams one blob into place; `commit()` checks size and hash before publishing it."""

    def __init__(self, store: BlobStore, expected_sha256: str, expected_size: int) -> None:
        self._store = store
        self.expected_sha256 = check_sha(expected_sha256)
        self.expected_size = expected_size
        self._final = store.path_for(expected_sha256)
        self._final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=self._final.parent)
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(tmp)
        self._hash = hashlib.sha256()
        self.size = 0
        self._done = False

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.expected_size:
            self.abort()
            raise InvalidArgumentError(
                f"artifact is larger than its header's total_size={self.expected_size} "
                f"(at least {self.size + len(data)} bytes sent)",
                field="header.total_size",
            )
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def commit(self) -> bool:
        """Publish the blob; returns False when identical bytes were already stored."""
        try:
            if self.size != self.expected_size:
                raise InvalidArgumentError(
                    f"artifact is {self.size} bytes but the header's total_size is "
                    f"{self.expected_size}", field="header.total_size")
            got = self._hash.hexdigest()
            if got != self.expected_sha256:
                raise InvalidArgumentError(
                    f"artifact sha256 is {got} but the header's artifact_sha256 is "
                    f"{self.expected_sha256}", field="header.artifact_sha256")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            existed = self._final.exists()
            os.replace(self._tmp, self._final)
            _fsync_dir(self._final.parent)
            self._done = True
            return not existed
        finally:
            if not self._done:
                self.abort()

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class BlobStore:
    """Artifact bytes on a local disk, addressed by their SHA-256."""

    def __init__(self, root: str | Path, *, sweep_temp_older_than_s: float = 0.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.location = str(self.root)
        self.quarantine = self.root / "quarantine"
        self.swept = self.sweep_temp(older_than_s=sweep_temp_older_than_s)

    def path_for(self, sha256: str) -> Path:
        h = check_sha(sha256)
        return self.root / h[:2] / h[2:4] / h

    def writer(self, sha256: str, size: int) -> BlobWriter:
        return BlobWriter(self, sha256, size)

    def put(self, data: bytes) -> str:
        """Store bytes; returns their sha256."""
        sha = hashlib.sha256(data).hexdigest()
        with self.writer(sha, len(data)) as w:
            w.write(data)
            w.commit()
        return sha

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def get(self, sha256: str) -> bytes:
        """The verified bytes of a blob.

        Raises `NotFoundError` if absent, `DataLossError` (reason BLOB_CORRUPT) if the
        bytes on disk no longer hash to their name; the corrupt file is moved to
        `quarantine/` so the next put of the same artifact can repair it.
        """
        path = self.path_for(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"no blob {sha256} in {self.root}") from None
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            self.quarantine.mkdir(exist_ok=True)
            dest = self.quarantine / f"{sha256}.{int(time.time())}"
            os.replace(path, dest)
            log.error("urza blob %s is corrupt on disk (hashes to %s); moved to %s",
                      sha256, got, dest)
            raise DataLossError(
                f"stored artifact blob {sha256} is corrupt on disk (its bytes hash to {got}); "
                f"it was quarantined at {dest}; re-upload the kernel to repair it",
                reason="BLOB_CORRUPT",
            )
        return data

    def close(self) -> None:
        """Nothing to release: every write closes its own file."""

    def sweep_temp(self, *, older_than_s: float = 0.0) -> int:
        """Delete temp files a crashed writer left behind; returns how many.

        `older_than_s` spares temp files of writers still running in another process
        sharing this directory.
        """
        now = time.time()
        n = 0
        for tmp in self.root.glob(f"*/*/{TMP_PREFIX}*"):
            try:
                if now - tmp.stat().st_mtime >= older_than_s:
                    tmp.unlink()
                    n += 1
            except FileNotFoundError:
                continue  # its writer finished (renamed) or aborted meanwhile
        if n:
            log.warning("urza blobs: removed %d half-written temp file(s) under %s", n, self.root)
        return n
