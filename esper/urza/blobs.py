"""Content-addressed blob directory for kernel artifacts.

Layout: `<root>/<h[0:2]>/<h[2:4]>/<h>` where `h` is the lower-case hex SHA-256 of the
bytes. A blob is written to a temp file in its final directory, fsynced, renamed into
place, and the directory fsynced, so after a crash a name either holds the complete
bytes or does not exist. PutKernel uploads stream into `<root>/.staging/` and are renamed
into place once verified (`put_file`). Temp files (`.tmp-*`) are never served and are
swept at open. Every read re-hashes the bytes: a blob corrupted on disk is reported
(`DataLossError`, reason BLOB_CORRUPT) and moved aside, never served. Error messages name
no server paths (a caller has no use for them); the log has them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from esper.errors import DataLossError, InvalidArgumentError, NotFoundError
from esper.fsutil import fsync_dir

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
TMP_PREFIX = ".tmp-"


class Blobs(Protocol):
    """What Urza's library needs from a blob store: this module's `BlobStore` (a local
    directory) or `esper.urza.s3blobs.S3BlobStore` (an S3-compatible bucket)."""

    location: str
    """Where the blobs are, for the server log (a path or an s3:// URL)."""
    staging_dir: Path
    """Local directory where uploads are streamed before `put_file` (swept at open)."""

    def put(self, data: bytes) -> str: ...
    def put_file(self, path: Path, sha256: str) -> None:
        """Store the (fsynced, already hashed) file at `path` as blob `sha256`; the file is
        consumed (moved or deleted)."""
    def get(self, sha256: str) -> bytes: ...
    def exists(self, sha256: str) -> bool: ...
    def list_blobs(self) -> Iterator[tuple[str, float]]:
        """(sha256, modification time) of every stored blob (not quarantined ones)."""
    def delete(self, sha256: str, *, not_after: float | None = None) -> bool:
        """Remove a blob; False if absent (or, with `not_after`, modified after it)."""
    def close(self) -> None: ...


def check_sha(sha256: str) -> str:
    if not _HEX64.match(sha256):
        raise InvalidArgumentError(
            f"sha256={sha256!r}: must be 64 lower-case hex characters", field="artifact_sha256"
        )
    return sha256


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
            fsync_dir(self._final.parent)
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
        # Under the root, so a verified upload is renamed into place, never copied.
        self.staging_dir = self.root / ".staging"
        self.staging_dir.mkdir(exist_ok=True)
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

    def put_file(self, path: Path, sha256: str) -> None:
        final = self.path_for(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, final)
        fsync_dir(final.parent)

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def list_blobs(self) -> Iterator[tuple[str, float]]:
        for p in self.root.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*"):
            if _HEX64.match(p.name):
                try:
                    yield p.name, p.stat().st_mtime
                except FileNotFoundError:
                    continue  # deleted meanwhile

    def delete(self, sha256: str, *, not_after: float | None = None) -> bool:
        path = self.path_for(sha256)
        try:
            if not_after is not None and path.stat().st_mtime > not_after:
                return False  # rewritten since it was listed: an upload is using it
            path.unlink()
        except FileNotFoundError:
            return False
        return True

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
            raise NotFoundError(f"no blob {sha256} in the blob store") from None
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            self.quarantine.mkdir(exist_ok=True)
            dest = self.quarantine / f"{sha256}.{int(time.time())}"
            os.replace(path, dest)
            log.error("urza blob %s is corrupt on disk (hashes to %s); moved to %s",
                      sha256, got, dest)
            raise DataLossError(
                f"stored artifact blob {sha256} is corrupt (its bytes hash to {got}); it was "
                "quarantined (the server log says where); re-upload the kernel to repair it",
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
        leftovers = [*self.root.glob(f"*/*/{TMP_PREFIX}*"), *self.staging_dir.glob("*")]
        for tmp in leftovers:
            try:
                if now - tmp.stat().st_mtime >= older_than_s:
                    tmp.unlink()
                    n += 1
            except FileNotFoundError:
                continue  # its writer finished (renamed) or aborted meanwhile
        if n:
            log.warning("urza blobs: removed %d half-written temp file(s) under %s", n, self.root)
        return n
