"""Urza's settings (`ctx.settings["urza"]`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from esper.config import from_dict
from esper.urza.s3blobs import parse_blob_url

MAX_CHUNK = (4 << 20) - (1 << 10)
"""Largest GetKernel/PutKernel chunk the contract allows: 4 MiB - 1 KiB, so a chunk and its
message framing fit gRPC's default 4 MiB message cap."""
MIN_CHUNK = 64 << 10
"""Smallest GetKernel chunk Urza sends (but the last): smaller requests are raised to it.
Each message costs the server the same whatever its size; 1-byte chunks let one client
keep the event loop busy with tens of thousands of messages."""


@dataclass(kw_only=True, frozen=True)
class UrzaConfig:
    """Where Urza keeps its data and which kernel signers it trusts."""

    database_url: str = ""
    """PostgreSQL URL (postgresql://user@host:port/db) for metadata; empty: SQLite at
    `<data_dir>/urza/urza.db`."""
    blob_dir: str = ""
    """Directory of artifact blobs; empty: `<data_dir>/urza/blobs`."""
    blob_url: str = ""
    """`s3://<bucket>[/<prefix>]`: keep artifact blobs in an S3-compatible object store
    instead of a directory (needs `esper[s3]`; credentials from the standard AWS chain).
    Empty: the local blob directory."""
    s3_endpoint_url: str = ""
    """Endpoint of a non-AWS S3-compatible server (MinIO, Ceph RGW, ...); empty: AWS."""
    s3_region: str = ""
    """Region of the bucket; empty: boto3's default (AWS_DEFAULT_REGION, ...)."""
    trusted_keys_dir: str = ""
    """Directory of trusted Ed25519 public keys (*.pub, *.pem); empty: the
    ESPER_TRUSTED_KEYS_DIR environment variable. Kept in step with the directory: a key
    added is trusted, a key removed is revoked (uploads signed by it are refused, its
    kernels are neither served nor offered) within `trusted_keys_reload_s`, at once on
    SIGHUP, and after a restart."""
    trusted_keys_reload_s: float = 1.0
    """Longest time between two looks at `trusted_keys_dir` (a directory listing; the keys
    are re-read only when it changed). 0: look on every request."""
    chunk_size: int = 256 << 10
    """GetKernel chunk size when the request asks for none (bytes, 64 KiB .. 4 MiB - 1 KiB)."""
    max_artifact_bytes: int = 256 << 20
    """Largest artifact PutKernel accepts (the contract's bound on total_size): a header
    over it is refused before a byte is stored, and no stream may send more than its
    header's total_size."""
    max_concurrent_uploads: int = 8
    """PutKernel streams received at once (each holds a temp file of up to
    max_artifact_bytes on disk); more are RESOURCE_EXHAUSTED."""
    orphan_sweep_interval_s: float = 3600.0
    """How often blobs no kernel refers to (a deleted kernel's, or an upload interrupted
    between its blob and its row) are removed; the first sweep runs at start. 0: only at
    start."""
    orphan_grace_s: float = 900.0
    """Blobs younger than this are never swept: another Urza replica may be between
    writing a blob and recording its kernel."""

    def __post_init__(self) -> None:
        if self.database_url and not self.database_url.startswith(("postgresql://",
                                                                   "postgres://")):
            raise ValueError(
                f"urza.database_url={self.database_url!r}: must be a postgresql:// URL, or "
                "empty for the embedded SQLite database"
            )
        if self.blob_url and self.blob_dir:
            raise ValueError(
                f"urza.blob_dir={self.blob_dir!r} and urza.blob_url={self.blob_url!r} are both "
                "set; blobs live in one place: keep one of them")
        if self.blob_url:
            parse_blob_url(self.blob_url)  # raises ConfigError naming the setting
        elif self.s3_endpoint_url or self.s3_region:
            raise ValueError(
                "urza.s3_endpoint_url / urza.s3_region are set but urza.blob_url is empty; "
                "set blob_url=s3://<bucket>[/<prefix>] to use an S3-compatible store")
        if not MIN_CHUNK <= self.chunk_size <= MAX_CHUNK:
            raise ValueError(
                f"urza.chunk_size={self.chunk_size}: must be in [{MIN_CHUNK}, {MAX_CHUNK}]")
        if not 1 <= self.max_artifact_bytes <= 256 << 20:
            raise ValueError(
                f"urza.max_artifact_bytes={self.max_artifact_bytes}: must be in [1, {256 << 20}]"
            )
        if not 1 <= self.max_concurrent_uploads <= 1024:
            raise ValueError(f"urza.max_concurrent_uploads={self.max_concurrent_uploads}: "
                             "must be in [1, 1024]")
        for name in ("trusted_keys_reload_s", "orphan_sweep_interval_s", "orphan_grace_s"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not 0 <= v <= 7 * 86400:
                raise ValueError(f"urza.{name}={v!r}: must be a number of seconds in "
                                 f"[0, {7 * 86400}]")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> UrzaConfig:
        return from_dict(cls, data, what="urza settings")
