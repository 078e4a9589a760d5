"""Urza's core: the library of blueprints and signed kernel artifacts, with field reports.

Plain Python (no gRPC): `service.py` adapts it.

Uploads (`begin_upload` → `KernelUpload`) stream into a temp file, never all into memory.
Before a blob is stored the upload is checked in order of cost: size and SHA-256 against
its header, the artifact's four-part framing (read from the file), the signer against the
trusted keys and the signature over the manifest, then whether Urza already holds that
kernel (then nothing is written), and only then everything else (IR, safetensors bounds,
tensor names/shapes/dtypes). The blob goes in first and the metadata row second, so a
kernel that is listed always has its bytes; a crash in between leaves an unreferenced blob
that the next upload reuses or the orphan sweep (`sweep_orphans`) removes.

Replies are bounded: a list page stops before `REPLY_BUDGET_BYTES`, and a blueprint stored
before today's limits existed is served trimmed to them (`servable_blueprint`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature
from google.protobuf.message import DecodeError

from esper.blueprints import blueprint_id, site_key, site_signature, validate_ir
from esper.blueprints.artifact import (
    ArtifactFormatError,
    ArtifactSignatureError,
    TrustedKeys,
    kernel_id_of,
    verify_artifact,
)
from esper.errors import (
    BlueprintError,
    ConfigError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    ResourceExhaustedError,
    UntrustedKeyError,
)
from esper.urza.blobs import TMP_PREFIX, Blobs, check_sha
from esper.urza.config import UrzaConfig
from esper.urza.store import (
    BlueprintQuery,
    BlueprintRow,
    FieldReportRow,
    KernelEntry,
    KernelQuery,
    KernelRow,
    MetadataStore,
)
from esper.urza.store.base import TIMESTAMP_MAX_S, KernelOrder, check_tags, token_at
from generated.esper.common.v1 import blueprint_pb2, kernel_pb2, seed_pb2
from generated.esper.urza.v1 import urza_service_pb2 as pb

log = logging.getLogger(__name__)

REPLY_BUDGET_BYTES = 3 << 20
"""Most bytes of items in one list reply: 1 MiB under gRPC's default 4 MiB receive limit."""
MAX_BLUEPRINT_BYTES = 256 << 10
"""Largest serialized blueprint PutBlueprint stores (the builtin ones are ~2 KB)."""
MAX_PARENT_IDS = 8
MAX_LAYOUTS = 8
MAX_DESCRIPTION = 1024
_BLUEPRINT_ID = re.compile(r"^bp-[0-9a-f]{16}$")
MAX_MANIFEST_BYTES = 1 << 20
"""Largest manifest part an upload may carry (Tezzeret's are ~1 KB)."""
MAX_SIGNATURE_BYTES = 1024
_ITEM_FRAMING = 8
"""Bytes a repeated message field adds per item on the wire (tag + length), at most."""

# A blueprint declares the layouts it can be compiled for; PutBlueprint checks its IR on
# one ordinary site of each, so a blueprint that cannot build anywhere is refused at the
# door rather than at Tezzeret's first compile.
_PROBE_SITES = {
    seed_pb2.ACTIVATION_LAYOUT_NC: ("NC", 64, ()),
    seed_pb2.ACTIVATION_LAYOUT_NCL: ("NCL", 64, (32,)),
    seed_pb2.ACTIVATION_LAYOUT_NCHW: ("NCHW", 64, (8, 8)),
    seed_pb2.ACTIVATION_LAYOUT_NLD: ("NLD", 64, (16,)),
}


@dataclass(frozen=True)
class KernelBytes:
    record: kernel_pb2.KernelRecord
    data: bytes
    """The whole artifact, its sha256 checked against the record on read."""


@dataclass(frozen=True)
class BlueprintPage:
    blueprints: list[blueprint_pb2.Blueprint]
    next_page_token: str
    retired_ids: list[str]
    """Ids of the retired ones among `blueprints` (only listed with include_retired)."""


class TrustedKeySource:
    """Trusted signer keys from a directory (*.pub, *.pem), kept in step with it.

    At most every `reload_s` seconds a use of `keys`/`key_ids` looks at the directory's
    listing (names, sizes, mtimes; no file is read) and re-reads the keys when it changed.
    `reload()` re-reads at once (SIGHUP). A key whose file was removed is revoked: uploads
    signed by it are refused, its kernels are neither served nor offered. At start a bad
    key file or a missing directory is a ConfigError; later they are logged and skipped
    (a key that cannot be read is not trusted).
    """

    def __init__(self, directory: str | Path | None, *, reload_s: float = 1.0) -> None:
        self.directory = Path(directory) if directory else None
        self.reload_s = reload_s
        self._lock = threading.Lock()
        self._listing: tuple[tuple[str, int, int, int], ...] | None = None
        self._checked = time.monotonic()
        if self.directory is not None:
            self._listing = self._list()
            keys = TrustedKeys.from_dir(self.directory)  # strict at start: fail loudly
        else:
            keys = TrustedKeys()
        self._keys = keys
        self._ids = frozenset(keys.key_ids)

    @classmethod
    def from_config(cls, config: UrzaConfig) -> TrustedKeySource:
        return cls(config.trusted_keys_dir or os.environ.get("ESPER_TRUSTED_KEYS_DIR") or None,
                   reload_s=config.trusted_keys_reload_s)

    @property
    def keys(self) -> TrustedKeys:
        self._maybe_refresh()
        return self._keys

    @property
    def key_ids(self) -> frozenset[str]:
        self._maybe_refresh()
        return self._ids

    def refresh(self) -> bool:
        """Re-read the keys if the directory's listing changed; True when it had."""
        if self.directory is None:
            return False
        with self._lock:
            self._checked = time.monotonic()
            listing = self._list()
            if listing == self._listing:
                return False
            self._load(listing)
            return True

    def reload(self) -> TrustedKeys:
        """Re-read every key file now (what SIGHUP does)."""
        if self.directory is not None:
            with self._lock:
                self._checked = time.monotonic()
                self._load(self._list())
        return self._keys

    def _maybe_refresh(self) -> None:
        if self.directory is None or time.monotonic() - self._checked < self.reload_s:
            return
        if self._lock.locked():
            return  # another thread is looking right now; its answer is as fresh
        self.refresh()

    def _list(self) -> tuple[tuple[str, int, int, int], ...] | None:
        assert self.directory is not None
        try:
            out = []
            for p in self.directory.iterdir():
                if p.suffix in (".pub", ".pem"):
                    try:
                        st = p.stat()
                    except FileNotFoundError:
                        continue
                    out.append((p.name, st.st_size, st.st_mtime_ns, st.st_ino))
            return tuple(sorted(out))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _load(self, listing: tuple[tuple[str, int, int, int], ...] | None) -> None:
        assert self.directory is not None
        keys = TrustedKeys()
        if listing is None:
            log.error("urza: trusted keys directory %s is gone: no signer is trusted until "
                      "it is back", self.directory)
        else:
            for name, *_ in listing:
                p = self.directory / name
                try:
                    if p.is_file():
                        keys.add_file(p)
                except (ConfigError, OSError) as exc:
                    log.error("urza: trusted key file %s is not used: %s", p, exc)
        ids = frozenset(keys.key_ids)
        revoked, added = sorted(self._ids - ids), sorted(ids - self._ids)
        self._keys, self._ids, self._listing = keys, ids, listing
        if revoked or added:
            log.warning("urza: trusted signer keys changed: revoked %s, added %s (now %d)",
                        revoked, added, len(ids))


class KernelUpload:
    """One PutKernel stream: `write` chunks, then `finish` (or `abort`).

    Bytes go to a temp file in the blob store's staging directory, hashed as they arrive;
    nothing is kept in memory but the chunk in hand. Whatever ends the upload (refusal,
    duplicate, client gone, error), the temp file is removed unless it became the blob.
    """

    def __init__(self, lib: UrzaLibrary, expected_sha256: str, expected_size: int) -> None:
        cap = lib.config.max_artifact_bytes
        if not 0 < expected_size <= cap:
            raise InvalidArgumentError(
                f"header.total_size={expected_size}: Urza accepts artifacts of 1 to {cap} "
                "bytes", field="header.total_size")
        try:
            check_sha(expected_sha256)
        except InvalidArgumentError:
            raise InvalidArgumentError(
                f"header.artifact_sha256={expected_sha256[:80]!r}: must be 64 lower-case hex "
                "characters", field="header.artifact_sha256") from None
        self._lib = lib
        self.expected_sha256 = expected_sha256
        self.expected_size = expected_size
        lib._enter_upload()
        try:
            fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}upload-", dir=lib.blobs.staging_dir)
        except BaseException:
            lib._leave_upload()
            raise
        self.path = Path(tmp)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0
        self._open = True

    def write(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self.expected_size:
            self.abort()
            raise InvalidArgumentError(
                f"chunks exceed header.total_size={self.expected_size} (at least "
                f"{self.size + len(chunk)} bytes sent)", field="header.total_size")
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def finish(self) -> tuple[str, bool]:
        """Verify and store the upload; returns (kernel_id, created).

        Raises:
            InvalidArgumentError: size or sha256 differ from the header.
            ArtifactError: the artifact fails verification (INVALID_ARGUMENT over gRPC).
            UntrustedKeyError: its signer is not trusted (FAILED_PRECONDITION).
        """
        try:
            return self._finish()
        finally:
            self.abort()

    def _finish(self) -> tuple[str, bool]:
        lib = self._lib
        if self.size != self.expected_size:
            raise InvalidArgumentError(
                f"received {self.size} artifact bytes but the header's total_size is "
                f"{self.expected_size}", field="header.total_size")
        sha = self._hash.hexdigest()
        if sha != self.expected_sha256:
            raise InvalidArgumentError(
                f"received artifact hashes to {sha} but the header's artifact_sha256 is "
                f"{self.expected_sha256}", field="header.artifact_sha256")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

        # Cheap checks first, from the file: framing, signer, signature.
        with open(self.path, "rb") as f:
            parts = _artifact_parts(f, self.size)
            manifest_bytes = _read_part(f, parts, "manifest", MAX_MANIFEST_BYTES)
            signature = _read_part(f, parts, "signature", MAX_SIGNATURE_BYTES)
        manifest = kernel_pb2.KernelManifest()
        try:
            manifest.ParseFromString(manifest_bytes)
        except DecodeError as exc:
            raise ArtifactFormatError(f"manifest is not a KernelManifest message: {exc}") from exc
        kernel_id = kernel_id_of(manifest_bytes)
        lib.trusted.refresh()  # a signer may have published or removed its key just now
        public = lib.trusted.keys.get(manifest.key_id)
        if public is None:
            raise UntrustedKeyError(
                f"kernel {kernel_id} is signed by key id {manifest.key_id[:64]!r}, which Urza "
                f"does not trust (trusted: {sorted(lib.trusted.key_ids)}); add its public key "
                "to Urza's trusted keys directory if you trust it")
        try:
            public.verify(signature, manifest_bytes)
        except InvalidSignature as exc:
            raise ArtifactSignatureError(f"kernel {kernel_id}: signature does not verify under "
                                         f"key {manifest.key_id}") from exc

        # A kernel Urza holds already: nothing is written (a re-upload with other bytes,
        # e.g. padded, must not leave a blob behind). Its blob missing (quarantined) and
        # these bytes the recorded ones: this upload repairs it.
        existing = lib._existing_kernel(kernel_id)
        if existing is not None and (existing.row.artifact_sha256 != sha
                                     or lib.blobs.exists(sha)):
            return kernel_id, False

        # A trusted signer's artifact: now the full check, which reads it whole.
        verified = verify_artifact(self.path.read_bytes(), lib.trusted.keys,
                                   max_size=lib.config.max_artifact_bytes)
        m = verified.manifest
        row = KernelRow(
            kernel_id=verified.kernel_id, blueprint_id=m.blueprint_id, site_key=site_key(m.site),
            parameters=int(m.profile.parameters), artifact_sha256=sha, artifact_size=self.size,
            manifest=manifest_bytes, tags=check_tags(m.tags, "manifest.tags"), key_id=m.key_id)
        del verified
        with lib._commit_lock:  # the orphan sweep never sees this blob without its row
            lib.blobs.put_file(self.path, sha)
            created = lib.store.put_kernel(row)
        if created:
            log.info("urza: stored kernel %s (%s for %s, %d bytes)", kernel_id,
                     m.blueprint_id, row.site_key, self.size)
        return kernel_id, created

    def abort(self) -> None:
        """Drop the upload (idempotent; also after `finish`)."""
        if not self._open:
            return
        self._open = False
        try:
            self._file.close()
            self.path.unlink(missing_ok=True)  # gone already when it became the blob
        finally:
            self._lib._leave_upload()


def _varint(f: BinaryIO, end: int) -> int:
    value = shift = 0
    for _ in range(10):
        if f.tell() >= end:
            break
        b = f.read(1)[0]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value
        shift += 7
    raise ArtifactFormatError("artifact bytes are not a KernelArtifact message (truncated or "
                              "overlong varint)")


_PARTS = {1: "manifest", 2: "signature", 3: "ir", 4: "weights"}


def _artifact_parts(f: BinaryIO, size: int) -> dict[str, tuple[int, int]]:
    """(offset, length) of each part of a serialized KernelArtifact, read from a file.

    Strict: exactly the four length-delimited parts, each once and non-empty. Reads a few
    bytes per part, whatever the artifact's size.
    """
    parts: dict[str, tuple[int, int]] = {}
    f.seek(0)
    while f.tell() < size:
        at = f.tell()
        tag = _varint(f, size)
        name = _PARTS.get(tag >> 3)
        if name is None or tag & 7 != 2:
            raise ArtifactFormatError(
                f"artifact bytes are not a KernelArtifact message (field {tag >> 3}, wire "
                f"type {tag & 7} at byte {at}); an artifact has exactly four parts: "
                "manifest, signature, ir, weights")
        n = _varint(f, size)
        start = f.tell()
        if start + n > size:
            raise ArtifactFormatError(f"artifact part {name} ({n} bytes at byte {start}) runs "
                                      f"past the end of the {size}-byte artifact")
        if name in parts:
            raise ArtifactFormatError(f"artifact carries part {name} twice")
        parts[name] = (start, n)
        f.seek(start + n)
    missing = [p for p in _PARTS.values() if not parts.get(p, (0, 0))[1]]
    if missing:
        raise ArtifactFormatError(f"artifact is missing parts {missing}")
    return parts


def _read_part(f: BinaryIO, parts: dict[str, tuple[int, int]], name: str, bound: int) -> bytes:
    start, n = parts[name]
    if n > bound:
        raise ArtifactFormatError(f"artifact part {name} is {n} bytes; the bound is {bound}")
    f.seek(start)
    return f.read(n)


def servable_blueprint(bp: blueprint_pb2.Blueprint) -> blueprint_pb2.Blueprint:
    """`bp` within today's limits (a blueprint stored before they existed, trimmed).

    Parent ids that are not blueprint ids are dropped (and at most MAX_PARENT_IDS kept),
    layouts deduplicated, the description cut: what a blueprint stored through today's
    PutBlueprint can carry anyway.
    """
    parents = [p for p in bp.parent_ids if _BLUEPRINT_ID.match(p)][:MAX_PARENT_IDS]
    layouts = list(dict.fromkeys(bp.layouts))[:MAX_LAYOUTS]
    if (parents == list(bp.parent_ids) and layouts == list(bp.layouts)
            and len(bp.description) <= MAX_DESCRIPTION):
        return bp
    out = blueprint_pb2.Blueprint()
    out.CopyFrom(bp)
    out.ClearField("parent_ids")
    out.parent_ids.extend(parents)
    out.ClearField("layouts")
    out.layouts.extend(layouts)
    out.description = bp.description[:MAX_DESCRIPTION]
    return out


class UrzaLibrary:
    """Blueprints, kernels and field reports over a `MetadataStore` and a blob store
    (`esper.urza.blobs.Blobs`: a local directory or an S3-compatible bucket)."""

    def __init__(self, store: MetadataStore, blobs: Blobs, trusted: TrustedKeySource,
                 config: UrzaConfig | None = None) -> None:
        self.store = store
        self.blobs = blobs
        self.trusted = trusted
        self.config = config or UrzaConfig()
        self._uploads = 0
        self._uploads_lock = threading.Lock()
        # Held by an upload from storing its blob to recording its row, and by the orphan
        # sweep while it deletes: the sweep never removes a blob whose row is on its way.
        self._commit_lock = threading.Lock()
        self._warned: set[str] = set()
        self._backfill_key_ids()

    def close(self) -> None:
        with self._commit_lock:  # a sweep in a worker thread finishes first
            self.store.close()
            self.blobs.close()

    # -- blueprints -------------------------------------------------------------------

    def put_blueprint(self, bp: blueprint_pb2.Blueprint) -> tuple[str, bool]:
        """Validate and store a blueprint; returns (blueprint_id, created)."""
        _check_blueprint_limits(bp)
        if not bp.layouts:
            raise BlueprintError("blueprint.layouts is empty: declare at least one layout",
                                 field="blueprint.layouts")
        for layout in dict.fromkeys(bp.layouts):
            if layout not in _PROBE_SITES:
                raise BlueprintError(
                    f"blueprint.layouts contains {layout}; allowed: "
                    f"{[seed_pb2.ActivationLayout.Name(v) for v in _PROBE_SITES]}",
                    field="blueprint.layouts")
            name, channels, spatial = _PROBE_SITES[layout]
            try:
                validate_ir(bp.ir, site_signature(name, channels, spatial))
            except BlueprintError as exc:
                raise BlueprintError(
                    f"blueprint {bp.name!r} declares layout {name} but its IR does not "
                    f"validate on a {name} site of {channels} channels: {exc}",
                    field=f"blueprint.ir{'.' + exc.field if exc.field else ''}",
                ) from exc
        stored = blueprint_pb2.Blueprint()
        stored.CopyFrom(bp)
        stored.blueprint_id = blueprint_id(bp)
        tags = check_tags(stored.tags, "blueprint.tags")
        created = self.store.put_blueprint(BlueprintRow(
            blueprint_id=stored.blueprint_id, name=stored.name, family=stored.family,
            layouts=tuple(int(v) for v in stored.layouts), tags=tags,
            data=stored.SerializeToString(deterministic=True)))
        return stored.blueprint_id, created

    def get_blueprint(self, bp_id: str) -> blueprint_pb2.Blueprint:
        return self.blueprint_row(bp_id)[0]

    def blueprint_row(self, bp_id: str) -> tuple[blueprint_pb2.Blueprint, BlueprintRow]:
        """A blueprint as served, with its stored row (retired or not).

        Raises NotFoundError (unknown id), FailedPreconditionError (stored before today's
        limits and too large to serve even trimmed: delete it).
        """
        row = self.store.get_blueprint(bp_id)
        bp = self._servable(row)
        if bp is None:
            raise FailedPreconditionError(
                f"blueprint {bp_id} is stored with more than a reply can carry; delete it "
                "(DeleteBlueprint) and store it again")
        return bp, row

    def list_blueprints(self, *, family: str = "", tags: Iterable[str] = (), layout: int = 0,
                        page_size: int = 0, page_token: str = "", include_retired: bool = False
                        ) -> tuple[list[blueprint_pb2.Blueprint], str]:
        page = self.list_blueprint_page(family=family, tags=tags, layout=layout,
                                        page_size=page_size, page_token=page_token,
                                        include_retired=include_retired)
        return page.blueprints, page.next_page_token

    def list_blueprint_page(self, *, family: str = "", tags: Iterable[str] = (),
                            layout: int = 0, page_size: int = 0, page_token: str = "",
                            include_retired: bool = False) -> BlueprintPage:
        """One page of blueprints by id, under REPLY_BUDGET_BYTES."""
        query = BlueprintQuery(family=family, tags=check_tags(list(tags), "tags"),
                               layout=int(layout), include_retired=include_retired,
                               page_size=page_size, page_token=page_token)
        page = self.store.list_blueprints(query)
        out: list[blueprint_pb2.Blueprint] = []
        retired: list[str] = []
        used = 0
        token = page.next_page_token
        for i, row in enumerate(page.items):
            bp = self._servable(row)
            if bp is None:
                continue  # logged by _servable; the token moves past it
            size = bp.ByteSize() + _ITEM_FRAMING
            if out and used + size > REPLY_BUDGET_BYTES:
                token = token_at(query, page.offset + i)
                break
            out.append(bp)
            used += size
            if row.retired_at is not None:
                retired.append(row.blueprint_id)
        return BlueprintPage(blueprints=out, next_page_token=token, retired_ids=retired)

    def retire_blueprint(self, bp_id: str, *, reason: str = "", restore: bool = False
                         ) -> tuple[bool, bool]:
        """Retire (or restore) a blueprint; returns (changed, retired now)."""
        if len(reason) > 256:
            raise InvalidArgumentError(f"reason is {len(reason)} characters; at most 256",
                                       field="reason")
        changed = self.store.retire_blueprint(bp_id, retired=not restore, reason=reason)
        if changed:
            log.warning("urza: blueprint %s %s%s", bp_id, "restored" if restore else "retired",
                        f" ({reason})" if reason else "")
        return changed, not restore

    def delete_blueprint(self, bp_id: str) -> tuple[bool, int, int]:
        """Delete a blueprint, its kernels and their field reports; their blobs go with the
        next orphan sweep. Returns (deleted, kernels deleted, field reports deleted)."""
        deleted, kernels, reports = self.store.delete_blueprint(bp_id)
        if deleted or kernels:
            log.warning("urza: deleted blueprint %s with %d kernel(s) and %d field report(s)",
                        bp_id, kernels, reports)
        return deleted, kernels, reports

    def _servable(self, row: BlueprintRow) -> blueprint_pb2.Blueprint | None:
        bp = servable_blueprint(blueprint_pb2.Blueprint.FromString(row.data))
        if bp.ByteSize() + _ITEM_FRAMING > REPLY_BUDGET_BYTES:
            self._warn_once(row.blueprint_id, "urza: blueprint %s is %d bytes even trimmed, "
                            "more than a reply may carry; it is not served (delete it)",
                            row.blueprint_id, bp.ByteSize())
            return None
        if len(row.data) > MAX_BLUEPRINT_BYTES or bp.ByteSize() < len(row.data):
            self._warn_once(row.blueprint_id, "urza: blueprint %s is stored as %d bytes, beyond "
                            "today's limits; it is served trimmed to %d bytes",
                            row.blueprint_id, len(row.data), bp.ByteSize())
        return bp

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # -- kernels ------------------------------------------------------------------------

    def begin_upload(self, expected_sha256: str, expected_size: int) -> KernelUpload:
        """Start receiving an artifact of `expected_size` bytes hashing to `expected_sha256`.

        Raises:
            InvalidArgumentError: the size is 0 or over `max_artifact_bytes`, or the hash
                is malformed (fields `header.total_size` / `header.artifact_sha256`).
            ResourceExhaustedError: `max_concurrent_uploads` uploads are in progress.
        """
        return KernelUpload(self, expected_sha256, expected_size)

    def put_kernel(self, data: bytes, *, expected_sha256: str | None = None,
                   expected_size: int | None = None) -> tuple[str, bool]:
        """Verify and store a whole artifact held in memory (in-process callers and
        tests); returns (kernel_id, created). Errors as `KernelUpload.finish`."""
        if len(data) > self.config.max_artifact_bytes:
            raise InvalidArgumentError(
                f"artifact is {len(data)} bytes; Urza accepts at most "
                f"{self.config.max_artifact_bytes}", field="header.total_size")
        if expected_size is not None and len(data) != expected_size:
            raise InvalidArgumentError(
                f"received {len(data)} artifact bytes but the header's total_size is "
                f"{expected_size}", field="header.total_size")
        sha = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and sha != expected_sha256:
            raise InvalidArgumentError(
                f"received artifact hashes to {sha} but the header's artifact_sha256 is "
                f"{expected_sha256}", field="header.artifact_sha256")
        upload = self.begin_upload(sha, len(data))
        try:
            upload.write(data)
            return upload.finish()
        finally:
            upload.abort()

    def _enter_upload(self) -> None:
        with self._uploads_lock:
            if self._uploads >= self.config.max_concurrent_uploads:
                raise ResourceExhaustedError(
                    f"{self._uploads} kernel uploads are in progress, the most Urza takes at "
                    f"once (urza.max_concurrent_uploads); retry shortly")
            self._uploads += 1

    def _leave_upload(self) -> None:
        with self._uploads_lock:
            self._uploads -= 1

    def _existing_kernel(self, kernel_id: str) -> KernelEntry | None:
        try:
            return self.store.get_kernel(kernel_id)
        except NotFoundError:
            return None

    def kernel_record(self, kernel_id: str) -> kernel_pb2.KernelRecord:
        rec = self._records([self.store.get_kernel(kernel_id)])[0]
        if rec.ByteSize() > REPLY_BUDGET_BYTES:
            rec.ClearField("blueprint")  # GetBlueprint has it
        return rec

    def read_kernel(self, kernel_id: str, offset: int = 0) -> KernelBytes:
        """A kernel's record and its verified artifact bytes.

        Raises NotFoundError (unknown id), UntrustedKeyError (its signer is no longer
        trusted: FAILED_PRECONDITION), OutOfRangeError (offset past the end), DataLossError
        (the blob is missing or corrupt).
        """
        record = self.kernel_record(kernel_id)
        key_id = record.manifest.key_id
        if key_id not in self.trusted.key_ids:
            raise UntrustedKeyError(
                f"kernel {kernel_id} is signed by key id {key_id!r}, which Urza no longer "
                "trusts (its public key is not in Urza's trusted keys directory), so it is "
                "not served; trust the key again, or use a kernel signed by a trusted key")
        if offset > record.artifact_size:
            raise OutOfRangeError(
                f"offset={offset} is past the end of kernel {kernel_id} "
                f"({record.artifact_size} bytes)", field="offset")
        try:
            data = self.blobs.get(record.artifact_sha256)
        except NotFoundError as exc:
            log.error("urza: kernel %s is listed but its blob %s is missing from %s", kernel_id,
                      record.artifact_sha256, self.blobs.location)
            raise DataLossError(
                f"kernel {kernel_id} is listed but its artifact blob is missing from Urza's "
                "blob store; re-upload it") from exc
        return KernelBytes(record=record, data=data)

    def query_kernels(self, *, blueprint_id: str = "", site: seed_pb2.SiteSignature | None = None,
                      tags: Iterable[str] = (), max_parameters: int = 0, page_size: int = 0,
                      page_token: str = "", order_by: KernelOrder = "score",
                      include_retired: bool = False
                      ) -> tuple[list[kernel_pb2.KernelRecord], str]:
        """Kernels of trusted signers matching every filter, best first, under
        REPLY_BUDGET_BYTES; (records, next page token)."""
        key = ""
        if site is not None:
            try:
                key = site_key(site)
            except ValueError as exc:
                raise InvalidArgumentError(f"site={site}: {exc}", field="site") from exc
        query = KernelQuery(
            blueprint_id=blueprint_id, site_key=key, tags=check_tags(list(tags), "tags"),
            max_parameters=max_parameters, order_by=order_by, page_size=page_size,
            page_token=page_token, include_retired=include_retired,
            key_ids=tuple(sorted(self.trusted.key_ids)))
        page = self.store.query_kernels(query)
        out: list[kernel_pb2.KernelRecord] = []
        used = 0
        token = page.next_page_token
        for i, rec in enumerate(self._records(page.items)):
            size = rec.ByteSize() + _ITEM_FRAMING
            if size > REPLY_BUDGET_BYTES:
                rec.ClearField("blueprint")  # GetBlueprint has it
                size = rec.ByteSize() + _ITEM_FRAMING
                if size > REPLY_BUDGET_BYTES:
                    self._warn_once(rec.kernel_id, "urza: kernel %s's record is %d bytes, more "
                                    "than a reply may carry; it is not offered", rec.kernel_id,
                                    size)
                    continue
            if out and used + size > REPLY_BUDGET_BYTES:
                token = token_at(query, page.offset + i)
                break
            out.append(rec)
            used += size
        return out, token

    def delete_kernel(self, kernel_id: str) -> tuple[bool, int]:
        """Delete a kernel and its field reports (its blob goes with the next orphan
        sweep); returns (deleted, field reports deleted)."""
        deleted, reports = self.store.delete_kernel(kernel_id)
        if deleted:
            log.warning("urza: deleted kernel %s and %d field report(s)", kernel_id, reports)
        return deleted, reports

    def sweep_orphans(self, older_than_s: float | None = None) -> int:
        """Remove blobs no kernel refers to and older than `older_than_s` (default
        `orphan_grace_s`); returns how many were removed."""
        grace = self.config.orphan_grace_s if older_than_s is None else older_than_s
        cutoff = time.time() - grace
        # Blobs first, references second: a row recorded in between counts as a reference.
        candidates = [sha for sha, mtime in self.blobs.list_blobs() if mtime <= cutoff]
        if not candidates:
            return 0
        removed = 0
        with self._commit_lock:
            referenced = self.store.artifact_shas()
            for sha in candidates:
                if sha not in referenced and self.blobs.delete(sha, not_after=cutoff):
                    removed += 1
        if removed:
            log.warning("urza: orphan sweep removed %d unreferenced blob(s) from %s", removed,
                        self.blobs.location)
        return removed

    def _records(self, entries: list[KernelEntry]) -> list[kernel_pb2.KernelRecord]:
        blueprints: dict[str, blueprint_pb2.Blueprint | None] = {}
        out = []
        for e in entries:
            bp_id = e.row.blueprint_id
            if bp_id not in blueprints:
                try:
                    blueprints[bp_id] = self.get_blueprint(bp_id)
                except (NotFoundError, FailedPreconditionError):
                    blueprints[bp_id] = None  # kernels may be published before their blueprint
            s = e.stats
            rec = kernel_pb2.KernelRecord(
                kernel_id=e.row.kernel_id,
                manifest=kernel_pb2.KernelManifest.FromString(e.row.manifest),
                artifact_size=e.row.artifact_size, artifact_sha256=e.row.artifact_sha256,
                stats=kernel_pb2.KernelStats(
                    outcomes=s.outcomes, fossilized=s.fossilized, pruned=s.pruned,
                    rolled_back=s.rolled_back, mean_contribution=s.mean_contribution,
                    mean_accuracy_delta=s.mean_accuracy_delta, score=s.score))
            bp = blueprints[bp_id]
            if bp is not None:
                rec.blueprint.CopyFrom(bp)
            out.append(rec)
        return out

    def _backfill_key_ids(self) -> None:
        """Signer key ids of kernels stored before schema v3 (read from their manifests)."""
        while batch := self.store.kernels_without_key_id():
            ids = {}
            for kid, manifest in batch:
                try:
                    key_id = kernel_pb2.KernelManifest.FromString(manifest).key_id
                except DecodeError:
                    log.error("urza: kernel %s has an unreadable stored manifest", kid)
                    key_id = ""
                # No key id matches no trusted key: such a kernel is never offered.
                ids[kid] = key_id or "-"
            self.store.set_key_ids(ids)
            log.info("urza: recorded the signer key id of %d kernel(s) stored before v3",
                     len(ids))

    # -- field reports ---------------------------------------------------------------------

    def record_outcome(self, report: pb.FieldReport, request_id: str = "") -> bool:
        """Store a field report; False when `request_id` was already recorded.

        Raises InvalidArgumentError naming the field for a non-finite or out-of-range value.
        """
        recorded_at = None
        if report.HasField("recorded_at"):
            ts = report.recorded_at
            if not (0 <= ts.seconds <= TIMESTAMP_MAX_S and 0 <= ts.nanos < 1_000_000_000):
                raise InvalidArgumentError(
                    f"report.recorded_at=(seconds={ts.seconds}, nanos={ts.nanos}): must lie "
                    "between 1970-01-01 and 9999-12-31 with nanos in [0, 1e9)",
                    field="report.recorded_at")
            recorded_at = ts.seconds + ts.nanos / 1e9
        row = FieldReportRow(
            # No idempotency key: every call is a new report.
            request_id=request_id or f"urza-{uuid.uuid4()}",
            kernel_id=report.kernel_id, run_id=report.run_id, slot_id=report.slot_id,
            task=report.task, contribution=report.contribution,
            accuracy_delta=report.accuracy_delta, fate=int(report.fate),
            germinated_epoch=report.germinated_epoch, ended_epoch=report.ended_epoch,
            parameters=report.parameters, rejected_by_gate=report.rejected_by_gate,
            rolled_back=report.rolled_back,
            **({"recorded_at": recorded_at} if recorded_at is not None else {}))
        return self.store.record_outcome(row)

    def delete_field_reports(self, *, kernel_id: str = "", run_id: str = "") -> int:
        """Delete matching field reports (at least one filter) and recompute the affected
        kernels' stats; returns how many were deleted."""
        n = self.store.delete_field_reports(kernel_id=kernel_id, run_id=run_id)
        if n:
            log.warning("urza: deleted %d field report(s) (kernel_id=%r, run_id=%r)", n,
                        kernel_id, run_id)
        return n


def _check_blueprint_limits(bp: blueprint_pb2.Blueprint) -> None:
    """The bounds PutBlueprint keeps, whatever the proto's rules say (or said)."""
    if len(bp.parent_ids) > MAX_PARENT_IDS:
        raise BlueprintError(f"blueprint.parent_ids lists {len(bp.parent_ids)} ids; at most "
                             f"{MAX_PARENT_IDS}", field="blueprint.parent_ids")
    for i, p in enumerate(bp.parent_ids):
        if not _BLUEPRINT_ID.match(p):
            raise BlueprintError(
                f"blueprint.parent_ids[{i}]={p[:40]!r}{'...' if len(p) > 40 else ''} is not a "
                "blueprint id (bp- and 16 hex characters)", field=f"blueprint.parent_ids[{i}]")
    if len(bp.layouts) > MAX_LAYOUTS:
        raise BlueprintError(f"blueprint.layouts lists {len(bp.layouts)} layouts; at most "
                             f"{MAX_LAYOUTS}", field="blueprint.layouts")
    if len(bp.description) > MAX_DESCRIPTION:
        raise BlueprintError(f"blueprint.description is {len(bp.description)} characters; at "
                             f"most {MAX_DESCRIPTION}", field="blueprint.description")
    size = bp.ByteSize()
    if size > MAX_BLUEPRINT_BYTES:
        raise BlueprintError(f"blueprint is {size} bytes serialized; at most "
                             f"{MAX_BLUEPRINT_BYTES}", field="blueprint")
