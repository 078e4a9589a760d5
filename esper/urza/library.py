"""Urza's core: the library of blueprints and signed kernel artifacts, with field reports.

Plain Python (no gRPC): `service.py` adapts it. An artifact is verified (signature
against trusted keys, hashes, safetensors bounds, tensor names/shapes/dtypes against
the IR) before a single byte of it is written; its blob goes in first and its metadata
second, so a kernel that is listed always has its bytes (a crash in between leaves
only an unlisted, content-addressed blob that the next upload reuses).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from esper.blueprints import blueprint_id, site_key, site_signature, validate_ir
from esper.blueprints.artifact import TrustedKeys, verify_artifact
from esper.errors import (
    BlueprintError,
    DataLossError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    UntrustedKeyError,
)
from esper.urza.blobs import Blobs
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
from esper.urza.store.base import KernelOrder, check_tags
from generated.esper.common.v1 import blueprint_pb2, kernel_pb2, seed_pb2
from generated.esper.urza.v1 import urza_service_pb2 as pb

log = logging.getLogger(__name__)

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


class TrustedKeySource:
    """Trusted signer keys, re-read from their directory when an unknown key id shows up."""

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = Path(directory) if directory else None
        self._lock = threading.Lock()
        self._keys = TrustedKeys.from_dir(self.directory) if self.directory else TrustedKeys()

    @classmethod
    def from_config(cls, config: UrzaConfig) -> TrustedKeySource:
        return cls(config.trusted_keys_dir or os.environ.get("ESPER_TRUSTED_KEYS_DIR") or None)

    @property
    def keys(self) -> TrustedKeys:
        return self._keys

    def reload(self) -> TrustedKeys:
        if self.directory is not None:
            with self._lock:
                self._keys = TrustedKeys.from_dir(self.directory)
        return self._keys


class UrzaLibrary:
    """Blueprints, kernels and field reports over a `MetadataStore` and a blob store
    (`esper.urza.blobs.Blobs`: a local directory or an S3-compatible bucket)."""

    def __init__(self, store: MetadataStore, blobs: Blobs, trusted: TrustedKeySource,
                 config: UrzaConfig | None = None) -> None:
        self.store = store
        self.blobs = blobs
        self.trusted = trusted
        self.config = config or UrzaConfig()

    def close(self) -> None:
        self.store.close()
        self.blobs.close()

    # -- blueprints -------------------------------------------------------------------

    def put_blueprint(self, bp: blueprint_pb2.Blueprint) -> tuple[str, bool]:
        """Validate and store a blueprint; returns (blueprint_id, created)."""
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
        return blueprint_pb2.Blueprint.FromString(self.store.get_blueprint(bp_id).data)

    def list_blueprints(self, *, family: str = "", tags: Iterable[str] = (), layout: int = 0,
                        page_size: int = 0, page_token: str = ""
                        ) -> tuple[list[blueprint_pb2.Blueprint], str]:
        page = self.store.list_blueprints(BlueprintQuery(
            family=family, tags=check_tags(list(tags), "tags"), layout=int(layout),
            page_size=page_size, page_token=page_token))
        return ([blueprint_pb2.Blueprint.FromString(r.data) for r in page.items],
                page.next_page_token)

    # -- kernels ------------------------------------------------------------------------

    def put_kernel(self, data: bytes, *, expected_sha256: str | None = None,
                   expected_size: int | None = None) -> tuple[str, bool]:
        """Verify and store a kernel artifact; returns (kernel_id, created).

        Raises:
            InvalidArgumentError: size or sha256 differ from what the uploader declared.
            ArtifactError: the artifact fails verification (INVALID_ARGUMENT over gRPC).
            UntrustedKeyError: its signer is not trusted (FAILED_PRECONDITION).
        """
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
        try:
            verified = verify_artifact(data, self.trusted.keys,
                                       max_size=self.config.max_artifact_bytes)
        except UntrustedKeyError:
            # A signer may have published its key after this process loaded the directory.
            verified = verify_artifact(data, self.trusted.reload(),
                                       max_size=self.config.max_artifact_bytes)
        manifest = verified.manifest
        self.blobs.put(data)
        created = self.store.put_kernel(KernelRow(
            kernel_id=verified.kernel_id, blueprint_id=manifest.blueprint_id,
            site_key=site_key(manifest.site), parameters=int(manifest.profile.parameters),
            artifact_sha256=sha, artifact_size=len(data),
            manifest=kernel_pb2.KernelArtifact.FromString(data).manifest,
            tags=check_tags(manifest.tags, "manifest.tags")))
        if created:
            log.info("urza: stored kernel %s (%s for %s, %d bytes)", verified.kernel_id,
                     manifest.blueprint_id, site_key(manifest.site), len(data))
        return verified.kernel_id, created

    def kernel_record(self, kernel_id: str) -> kernel_pb2.KernelRecord:
        return self._records([self.store.get_kernel(kernel_id)])[0]

    def read_kernel(self, kernel_id: str, offset: int = 0) -> KernelBytes:
        """A kernel's record and its verified artifact bytes.

        Raises NotFoundError (unknown id), OutOfRangeError (offset past the end),
        DataLossError (the blob is missing or corrupt on disk).
        """
        record = self.kernel_record(kernel_id)
        if offset > record.artifact_size:
            raise OutOfRangeError(
                f"offset={offset} is past the end of kernel {kernel_id} "
                f"({record.artifact_size} bytes)", field="offset")
        try:
            data = self.blobs.get(record.artifact_sha256)
        except NotFoundError as exc:
            log.error("urza: kernel %s is listed but its blob %s is missing", kernel_id,
                      record.artifact_sha256)
            raise DataLossError(
                f"kernel {kernel_id} is listed but its artifact blob is missing from "
                f"{self.blobs.location}; re-upload it") from exc
        return KernelBytes(record=record, data=data)

    def query_kernels(self, *, blueprint_id: str = "", site: seed_pb2.SiteSignature | None = None,
                      tags: Iterable[str] = (), max_parameters: int = 0, page_size: int = 0,
                      page_token: str = "", order_by: KernelOrder = "mean_contribution"
                      ) -> tuple[list[kernel_pb2.KernelRecord], str]:
        key = ""
        if site is not None:
            try:
                key = site_key(site)
            except ValueError as exc:
                raise InvalidArgumentError(f"site={site}: {exc}", field="site") from exc
        page = self.store.query_kernels(KernelQuery(
            blueprint_id=blueprint_id, site_key=key, tags=check_tags(list(tags), "tags"),
            max_parameters=max_parameters, order_by=order_by, page_size=page_size,
            page_token=page_token))
        return self._records(page.items), page.next_page_token

    def _records(self, entries: list[KernelEntry]) -> list[kernel_pb2.KernelRecord]:
        blueprints: dict[str, blueprint_pb2.Blueprint | None] = {}
        out = []
        for e in entries:
            bp_id = e.row.blueprint_id
            if bp_id not in blueprints:
                try:
                    blueprints[bp_id] = self.get_blueprint(bp_id)
                except NotFoundError:
                    blueprints[bp_id] = None  # kernels may be published before their blueprint
            s = e.stats
            rec = kernel_pb2.KernelRecord(
                kernel_id=e.row.kernel_id,
                manifest=kernel_pb2.KernelManifest.FromString(e.row.manifest),
                artifact_size=e.row.artifact_size, artifact_sha256=e.row.artifact_sha256,
                stats=kernel_pb2.KernelStats(
                    outcomes=s.outcomes, fossilized=s.fossilized, pruned=s.pruned,
                    mean_contribution=s.mean_contribution,
                    mean_accuracy_delta=s.mean_accuracy_delta))
            if blueprints[bp_id] is not None:
                rec.blueprint.CopyFrom(blueprints[bp_id])
            out.append(rec)
        return out

    # -- field reports ---------------------------------------------------------------------

    def record_outcome(self, report: pb.FieldReport, request_id: str = "") -> bool:
        """Store a field report; False when `request_id` was already recorded."""
        recorded_at = (report.recorded_at.ToNanoseconds() / 1e9
                       if report.HasField("recorded_at") else None)
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
