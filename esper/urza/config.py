"""Urza's settings (`ctx.settings["urza"]`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from esper.config import reject_unknown_keys
from esper.errors import ConfigError
from esper.urza.s3blobs import parse_blob_url

MAX_CHUNK = 4 << 20
"""Largest GetKernel/PutKernel chunk the contract allows (4 MiB)."""


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
    ESPER_TRUSTED_KEYS_DIR environment variable. Re-read when an upload names a key id
    not loaded yet, so a signer that creates its key after Urza started is picked up."""
    chunk_size: int = 256 << 10
    """GetKernel chunk size when the request asks for none (bytes, 1..4 MiB)."""
    max_artifact_bytes: int = 256 << 20
    """Largest artifact PutKernel accepts (the contract's bound on total_size)."""

    def __post_init__(self) -> None:
        if self.database_url and not self.database_url.startswith(("postgresql://",
                                                                   "postgres://")):
            raise ConfigError(
                f"urza.database_url={self.database_url!r}: must be a postgresql:// URL, or "
                "empty for the embedded SQLite database"
            )
        if self.blob_url and self.blob_dir:
            raise ConfigError(
                f"urza.blob_dir={self.blob_dir!r} and urza.blob_url={self.blob_url!r} are both "
                "set; blobs live in one place: keep one of them")
        if self.blob_url:
            parse_blob_url(self.blob_url)  # raises ConfigError naming the setting
        elif self.s3_endpoint_url or self.s3_region:
            raise ConfigError(
                "urza.s3_endpoint_url / urza.s3_region are set but urza.blob_url is empty; "
                "set blob_url=s3://<bucket>[/<prefix>] to use an S3-compatible store")
        if not 1 <= self.chunk_size <= MAX_CHUNK:
            raise ConfigError(f"urza.chunk_size={self.chunk_size}: must be in [1, {MAX_CHUNK}]")
        if not 1 <= self.max_artifact_bytes <= 256 << 20:
            raise ConfigError(
                f"urza.max_artifact_bytes={self.max_artifact_bytes}: must be in [1, {256 << 20}]"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UrzaConfig:
        reject_unknown_keys(cls, data, "urza settings")
        return cls(**data)
