"""Kernel artifact blobs in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, ...).

The distributed deployment's blob store (docs/ARCHITECTURE.md, "Running it"): Urza's metadata goes to PostgreSQL,
its artifact bytes here, so any number of Urza replicas share one library.

Layout: `s3://<bucket>/<prefix>sha256/<h[0:2]>/<h>`, `h` the hex SHA-256 of the bytes.
- An S3 PUT is atomic: readers see the whole object or none, so a crash mid-upload never
  leaves a half-written blob to serve. Each PUT carries the bytes' SHA-256 as a checksum,
  so the store itself refuses bytes damaged on the way.
- Every read re-hashes the bytes. An object whose bytes no longer match its name is moved
  under `<prefix>quarantine/` and reported (`DataLossError`, reason BLOB_CORRUPT), never
  served; the next upload of the same kernel repairs it.
- The store being unreachable is `UnavailableError` (reason BLOB_STORE_UNAVAILABLE):
  PutKernel then stores no metadata row, GetKernel answers UNAVAILABLE, nothing is lost.

Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
a profile, or the pod's web identity). Retries with backoff are botocore's "standard" mode.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from esper.errors import ConfigError, DataLossError, NotFoundError, UnavailableError
from esper.urza.blobs import check_sha

log = logging.getLogger(__name__)


def parse_blob_url(url: str) -> tuple[str, str]:
    """`s3://bucket[/prefix]` → (bucket, prefix ending in "/" or empty)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise ConfigError(
            f"urza.blob_url={url!r}: must be s3://<bucket>[/<prefix>] (an S3-compatible "
            "object store), or empty for the local blob directory")
    prefix = parsed.path.strip("/")
    return parsed.netloc, (prefix + "/") if prefix else ""


class S3BlobStore:
    """Artifact bytes in an S3 bucket, addressed by their SHA-256 (see module doc)."""

    def __init__(self, url: str, *, endpoint_url: str = "", region: str = "",
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 30.0,
                 max_attempts: int = 3, staging_dir: str | Path | None = None) -> None:
        """`staging_dir`: local directory for uploads in progress (swept here: one Urza
        process owns it); None: a fresh temporary directory."""
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:  # the base install leaves the S3 client out
            raise ConfigError(
                f"urza.blob_url={url!r} needs the S3 client: pip install 'esper[s3]'") from exc
        self.bucket, self.prefix = parse_blob_url(url)
        self.location = f"s3://{self.bucket}/{self.prefix}"
        self.endpoint_url = endpoint_url or None
        config = Config(
            connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
            retries={"mode": "standard", "max_attempts": max_attempts},
            # Path-style works with every S3-compatible server; AWS still accepts it.
            s3={"addressing_style": "path"} if endpoint_url else None,
            signature_version="s3v4")
        self._s3 = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=region or None, config=config)
        try:
            self._check_bucket()
        except BaseException:
            self._s3.close()
            raise
        self._own_staging = staging_dir is None
        if staging_dir is None:
            self.staging_dir = Path(tempfile.mkdtemp(prefix="esper-urza-uploads-"))
        else:
            self.staging_dir = Path(staging_dir)
            self.staging_dir.mkdir(parents=True, exist_ok=True)
            for leftover in self.staging_dir.iterdir():  # a crashed upload's partial file
                if leftover.is_file():
                    leftover.unlink(missing_ok=True)

    # -- the blob contract (same as esper.urza.blobs.BlobStore) -------------------------

    def key_for(self, sha256: str) -> str:
        h = check_sha(sha256)
        return f"{self.prefix}sha256/{h[:2]}/{h}"

    def put(self, data: bytes) -> str:
        """Store bytes; returns their sha256. Re-putting identical bytes repairs a
        quarantined or damaged object and is otherwise a no-op in effect."""
        digest = hashlib.sha256(data)
        sha = digest.hexdigest()
        with self._errors(f"storing blob {sha}"):
            self._s3.put_object(
                Bucket=self.bucket, Key=self.key_for(sha), Body=data,
                ChecksumSHA256=base64.b64encode(digest.digest()).decode("ascii"),
                ContentType="application/octet-stream")
        return sha

    def put_file(self, path: Path, sha256: str) -> None:
        """Store a local file (already hashed to `sha256`) streaming from disk; the file is
        deleted once stored (or on failure)."""
        checksum = base64.b64encode(bytes.fromhex(check_sha(sha256))).decode("ascii")
        try:
            with open(path, "rb") as body, self._errors(f"storing blob {sha256}"):
                self._s3.put_object(Bucket=self.bucket, Key=self.key_for(sha256), Body=body,
                                    ChecksumSHA256=checksum,
                                    ContentType="application/octet-stream")
        finally:
            Path(path).unlink(missing_ok=True)

    def list_blobs(self) -> Iterator[tuple[str, float]]:
        with self._errors("listing blobs"):
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}sha256/")
            for page in pages:
                for obj in page.get("Contents", ()):
                    name = obj["Key"].rsplit("/", 1)[-1]
                    if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
                        yield name, obj["LastModified"].timestamp()

    def delete(self, sha256: str, *, not_after: float | None = None) -> bool:
        key = self.key_for(sha256)
        with self._errors(f"deleting blob {sha256}"):
            try:
                head = self._s3.head_object(Bucket=self.bucket, Key=key)
            except self._s3.exceptions.ClientError as exc:
                if _status(exc) == 404:
                    return False
                raise
            if not_after is not None and head["LastModified"].timestamp() > not_after:
                return False  # rewritten since it was listed: an upload is using it
            self._s3.delete_object(Bucket=self.bucket, Key=key)
        return True

    def exists(self, sha256: str) -> bool:
        with self._errors(f"looking up blob {sha256}"):
            try:
                self._s3.head_object(Bucket=self.bucket, Key=self.key_for(sha256))
            except self._s3.exceptions.ClientError as exc:
                if _status(exc) == 404:
                    return False
                raise
        return True

    def get(self, sha256: str) -> bytes:
        """The verified bytes of a blob: `NotFoundError` if absent, `DataLossError`
        (BLOB_CORRUPT) if they no longer hash to their name (the object is quarantined)."""
        key = self.key_for(sha256)
        with self._errors(f"reading blob {sha256}"):
            try:
                resp = self._s3.get_object(Bucket=self.bucket, Key=key)
            except self._s3.exceptions.NoSuchKey:
                raise NotFoundError(f"no blob {sha256} in the blob store") from None
            data = resp["Body"].read()
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            dest = f"{self.prefix}quarantine/{sha256}.{int(time.time())}"
            with self._errors(f"quarantining corrupt blob {sha256}"):
                self._s3.copy_object(Bucket=self.bucket, Key=dest,
                                     CopySource={"Bucket": self.bucket, "Key": key})
                self._s3.delete_object(Bucket=self.bucket, Key=key)
            log.error("urza blob %s in %s is corrupt (hashes to %s); moved to %s",
                      sha256, self.location, got, dest)
            raise DataLossError(
                f"stored artifact blob {sha256} is corrupt (its bytes hash to {got}); it was "
                "quarantined (the server log says where); re-upload the kernel to repair it",
                reason="BLOB_CORRUPT")
        return data

    def close(self) -> None:
        self._s3.close()
        if self._own_staging:
            shutil.rmtree(self.staging_dir, ignore_errors=True)

    # -- internals ------------------------------------------------------------------------

    def _check_bucket(self) -> None:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        with self._errors(f"opening bucket {self.bucket!r}{where}"):
            try:
                self._s3.head_bucket(Bucket=self.bucket)
            except self._s3.exceptions.ClientError as exc:
                status = _status(exc)
                if status == 404:
                    raise ConfigError(
                        f"urza.blob_url={self.location!r}: bucket {self.bucket!r} does not "
                        f"exist{where}; create it first") from None
                if status == 403:
                    raise ConfigError(
                        f"urza.blob_url={self.location!r}: access to bucket {self.bucket!r} "
                        f"was denied{where}; check the credentials (AWS_ACCESS_KEY_ID, ...) "
                        "and the bucket policy") from None
                raise

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """botocore's failures as Esper's typed errors, naming the store and the action."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            err: dict[str, Any] = exc.response.get("Error", {})
            raise UnavailableError(
                f"{what} in {self.location} failed: {err.get('Code', '?')}: "
                f"{err.get('Message', exc)}", reason="BLOB_STORE_ERROR") from exc
        except BotoCoreError as exc:  # connection refused, timeouts, DNS, ...
            raise UnavailableError(
                f"{what}: the blob store {self.location} is unreachable ({exc})",
                reason="BLOB_STORE_UNAVAILABLE") from exc


def _status(exc: Any) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
