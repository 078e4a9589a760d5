"""The storage contract for Urza's metadata, shared by the SQLite and PostgreSQL backends.

Blobs (artifact bytes) are not here: they live in `esper.urza.blobs`, addressed by the
`artifact_sha256` a kernel row records.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Generic, Literal, TypeVar

from esper.errors import InvalidArgumentError

T = TypeVar("T")

KernelOrder = Literal["mean_contribution", "fossilized_rate", "outcomes", "created"]
KERNEL_ORDERS: tuple[str, ...] = ("mean_contribution", "fossilized_rate", "outcomes", "created")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

# SeedFate numbers of esper.urza.v1 (kept as ints so the store does not import protos).
FATE_FOSSILIZED = 1
FATE_PRUNED = 2
FATE_ROLLED_BACK = 3
FATE_RUN_ENDED = 4
FATES = (FATE_FOSSILIZED, FATE_PRUNED, FATE_ROLLED_BACK, FATE_RUN_ENDED)


@dataclass(frozen=True, kw_only=True)
class BlueprintRow:
    blueprint_id: str
    name: str
    family: str
    layouts: tuple[int, ...]
    tags: tuple[str, ...]
    data: bytes
    """Serialized `esper.common.v1.Blueprint`."""
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True, kw_only=True)
class KernelRow:
    kernel_id: str
    blueprint_id: str
    site_key: str
    """Canonical site signature key (`esper.urza.keys.site_key`)."""
    parameters: int
    artifact_sha256: str
    artifact_size: int
    manifest: bytes
    """Serialized `esper.common.v1.KernelManifest` (the signed bytes)."""
    tags: tuple[str, ...] = ()
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True, kw_only=True)
class FieldReportRow:
    request_id: str
    """Idempotency key: a second report with the same id is not recorded again."""
    kernel_id: str
    run_id: str
    slot_id: str
    task: str = ""
    contribution: float = 0.0
    accuracy_delta: float = 0.0
    fate: int
    germinated_epoch: int = 0
    ended_epoch: int = 0
    parameters: int = 0
    rejected_by_gate: bool = False
    rolled_back: bool = False
    recorded_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.fate not in FATES:
            raise InvalidArgumentError(
                f"report.fate={self.fate!r}: must be one of {FATES} (SeedFate, not UNSPECIFIED)",
                field="report.fate",
            )


@dataclass(frozen=True, kw_only=True)
class KernelStats:
    """Field reports of one kernel, aggregated as they arrive."""

    outcomes: int = 0
    fossilized: int = 0
    pruned: int = 0
    rolled_back: int = 0
    sum_contribution: float = 0.0
    sum_accuracy_delta: float = 0.0

    @property
    def mean_contribution(self) -> float:
        return self.sum_contribution / self.outcomes if self.outcomes else 0.0

    @property
    def mean_accuracy_delta(self) -> float:
        return self.sum_accuracy_delta / self.outcomes if self.outcomes else 0.0

    @property
    def fossilized_rate(self) -> float:
        return self.fossilized / self.outcomes if self.outcomes else 0.0


@dataclass(frozen=True, kw_only=True)
class KernelEntry:
    row: KernelRow
    stats: KernelStats


@dataclass(frozen=True, kw_only=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str
    """Empty on the last page."""


@dataclass(frozen=True, kw_only=True)
class BlueprintQuery:
    family: str = ""
    tags: tuple[str, ...] = ()
    """Only blueprints carrying every one of these tags."""
    layout: int = 0
    """Only blueprints compilable for this ActivationLayout (0: any)."""
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True, kw_only=True)
class KernelQuery:
    blueprint_id: str = ""
    site_key: str = ""
    tags: tuple[str, ...] = ()
    """Only kernels carrying every one of these tags."""
    max_parameters: int = 0
    """0: no bound."""
    order_by: KernelOrder = "mean_contribution"
    """Best first. Kernels without field reports score 0 (neutral): they rank below
    kernels that helped and above kernels that hurt. Ties: more outcomes first, then id."""
    page_size: int = 0
    page_token: str = ""

    def __post_init__(self) -> None:
        if self.order_by not in KERNEL_ORDERS:
            raise InvalidArgumentError(
                f"order_by={self.order_by!r}: must be one of {KERNEL_ORDERS}", field="order_by"
            )
        if self.max_parameters < 0:
            raise InvalidArgumentError(
                f"max_parameters={self.max_parameters}: must be >= 0 (0: no bound)",
                field="max_parameters",
            )


def page_bounds(query: BlueprintQuery | KernelQuery) -> tuple[int, int]:
    """(offset, limit) of the page a query asks for; the token must match the filter."""
    size = query.page_size or DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise InvalidArgumentError(
            f"page_size={query.page_size}: must be in [0, {MAX_PAGE_SIZE}] (0: {DEFAULT_PAGE_SIZE})",
            field="page_size",
        )
    if not query.page_token:
        return 0, size
    try:
        payload = json.loads(base64.urlsafe_b64decode(query.page_token.encode()))
        offset, fingerprint = int(payload["o"]), str(payload["f"])
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise InvalidArgumentError(
            f"page_token={query.page_token!r} is not a token this service issued ({exc})",
            field="page_token",
        ) from exc
    if fingerprint != _fingerprint(query) or offset < 0:
        raise InvalidArgumentError(
            f"page_token={query.page_token!r} belongs to a different query; repeat the "
            "filter of the request that returned it",
            field="page_token",
        )
    return offset, size


def next_token(query: BlueprintQuery | KernelQuery, offset: int, limit: int, got: int) -> str:
    """Token for the page after [offset, offset+got), or "" when this was the last one.

    The store fetches `limit + 1` rows to know whether another page exists.
    """
    if got <= limit:
        return ""
    payload = {"o": offset + limit, "f": _fingerprint(query)}
    return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()


def _fingerprint(query: BlueprintQuery | KernelQuery) -> str:
    # Tokens are only valid for the filter they were issued for: reusing one with a
    # different filter would silently skip or repeat rows.
    spec = asdict(query)
    spec.pop("page_token")
    spec.pop("page_size")
    spec["tags"] = sorted(spec["tags"])
    spec["kind"] = type(query).__name__
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class MetadataStore(ABC):
    """Urza's metadata: blueprints, kernels, field reports and their aggregates.

    Every method is safe to call from many threads at once, and several processes may
    open the same database. Writes are idempotent where their key says so.
    """

    backend: str
    """"sqlite" or "postgres"."""

    @abstractmethod
    def schema_version(self) -> int:
        """Highest migration applied to this database."""

    @abstractmethod
    def put_blueprint(self, row: BlueprintRow) -> bool:
        """Store a blueprint; False if one with that id was already stored (kept unchanged)."""

    @abstractmethod
    def get_blueprint(self, blueprint_id: str) -> BlueprintRow:
        """Raises `NotFoundError` when no blueprint has that id."""

    @abstractmethod
    def list_blueprints(self, query: BlueprintQuery) -> Page[BlueprintRow]:
        """Blueprints ordered by id. Raises `InvalidArgumentError` for a bad page token."""

    @abstractmethod
    def put_kernel(self, row: KernelRow) -> bool:
        """Store a kernel; False if one with that id was already stored (kept unchanged)."""

    @abstractmethod
    def get_kernel(self, kernel_id: str) -> KernelEntry:
        """Raises `NotFoundError` when no kernel has that id."""

    @abstractmethod
    def query_kernels(self, query: KernelQuery) -> Page[KernelEntry]:
        """Kernels matching every filter of `query`, best recorded outcomes first."""

    @abstractmethod
    def kernel_ids(self) -> list[str]:
        """Every stored kernel id, sorted."""

    @abstractmethod
    def record_outcome(self, report: FieldReportRow) -> bool:
        """Store a field report and fold it into the kernel's stats, atomically.

        Returns False (and changes nothing) when `report.request_id` was already recorded.
        Raises `NotFoundError` when the kernel is unknown.
        """

    @abstractmethod
    def field_reports(self, kernel_id: str) -> list[FieldReportRow]:
        """Every field report of a kernel, oldest first."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""


def check_tags(tags: Sequence[str], field_name: str) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(tags))
    for t in out:
        if not t or len(t) > 64:
            raise InvalidArgumentError(
                f"{field_name} contains {t!r}: tags must be 1..64 characters", field=field_name
            )
    return out
