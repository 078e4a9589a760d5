"""The storage contract for Urza's metadata, shared by the SQLite and PostgreSQL backends.

Blobs (artifact bytes) are not here: they live in `esper.urza.blobs`, addressed by the
`artifact_sha256` a kernel row records.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Generic, Literal, TypeVar

from esper.errors import InvalidArgumentError

T = TypeVar("T")

KernelOrder = Literal["score", "mean_contribution", "fossilized_rate", "outcomes", "created"]
KERNEL_ORDERS: tuple[str, ...] = ("score", "mean_contribution", "fossilized_rate", "outcomes",
                                  "created")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_PAGE_OFFSET = 2**31 - 1
"""Largest row offset a page token may carry (far beyond any library Urza holds)."""
MAX_TOKEN_CHARS = 256
"""Page tokens this service issues are ~60 characters; anything longer is refused unread."""

INT64_MAX = 2**63 - 1
"""Largest value the metadata stores' BIGINT columns hold."""
INT32_MAX = 2**31 - 1
"""Largest value PostgreSQL's INTEGER columns hold (epochs are uint32 on the wire)."""
TIMESTAMP_MAX_S = 253402300799
"""9999-12-31T23:59:59Z, the last instant a google.protobuf.Timestamp can carry."""

SCORE_CLIP = 1.0
"""Every aggregate of field reports clips each report's contribution and accuracy_delta to
[-SCORE_CLIP, SCORE_CLIP] first (winsorising), so no single report, however extreme, moves
a kernel's mean or score by more than a bounded amount. Contributions are loss differences:
a seed that changes a loss by more than 1.0 is far outside what real runs report. Changing
it needs a migration (the stores keep running sums of clipped values)."""
SCORE_PRIOR_OUTCOMES = 1
"""Pseudo-outcomes of contribution 0 (neutral) in the ranking score: a kernel needs more
than one good report to outrank a kernel with several, and the first report of an untested
kernel moves its score by at most SCORE_CLIP / (1 + SCORE_PRIOR_OUTCOMES)."""


def clip(value: float) -> float:
    """A report's value as every aggregate sees it (see `SCORE_CLIP`)."""
    return max(-SCORE_CLIP, min(SCORE_CLIP, value))


def score_bound(outcomes: int) -> float:
    """Most that one more report can move the score of a kernel with `outcomes` reports.

    score = S / (n + k) with |S| <= n * c; one report x in [-c, c] makes it
    (S + x) / (n + 1 + k), a change of (x - score) / (n + 1 + k), at most
    (c + |score|) / (n + 1 + k) < 2c / (n + 1 + k).
    """
    return 2 * SCORE_CLIP / (outcomes + 1 + SCORE_PRIOR_OUTCOMES)

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
    retired_at: float | None = None
    """When an operator retired it (its kernels are no longer offered); None: in use."""
    retired_reason: str = ""


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
    key_id: str = ""
    """Id of the key that signed the manifest (QueryKernels offers only trusted signers')."""


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
        # Every value is checked against what the columns hold and what the aggregates
        # can use, so a bad report is INVALID_ARGUMENT naming its field, never a database
        # error (NaN breaks NOT NULL on SQLite, 2**63 overflows BIGINT, ...).
        if self.fate not in FATES:
            raise InvalidArgumentError(
                f"report.fate={self.fate!r}: must be one of {FATES} (SeedFate, not UNSPECIFIED)",
                field="report.fate",
            )
        for name in ("contribution", "accuracy_delta"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v):
                raise InvalidArgumentError(
                    f"report.{name}={v!r}: must be a finite number", field=f"report.{name}")
        for name, top in (("parameters", INT64_MAX), ("germinated_epoch", INT32_MAX),
                          ("ended_epoch", INT32_MAX)):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v <= top:
                raise InvalidArgumentError(
                    f"report.{name}={v!r}: must be an integer in [0, {top}]",
                    field=f"report.{name}")
        if not math.isfinite(self.recorded_at) or not 0 <= self.recorded_at <= TIMESTAMP_MAX_S:
            raise InvalidArgumentError(
                f"report.recorded_at={self.recorded_at!r} s: must lie between 1970-01-01 and "
                "9999-12-31 (or be unset: the time Urza receives it)", field="report.recorded_at")
        for name, lo, hi in (("request_id", 1, 128), ("kernel_id", 1, 128), ("run_id", 1, 128),
                             ("slot_id", 1, 256), ("task", 0, 128)):
            v = getattr(self, name)
            if not lo <= len(v) <= hi:
                raise InvalidArgumentError(
                    f"report.{name} is {len(v)} characters: must be {lo}..{hi}",
                    field=f"report.{name}" if name != "request_id" else "request_id")


@dataclass(frozen=True, kw_only=True)
class KernelStats:
    """Field reports of one kernel, aggregated as they arrive.

    `sum_*` are plain sums of what was reported; `clipped_*` are sums of the values
    clipped to [-SCORE_CLIP, SCORE_CLIP] (see `clip`), which every mean and the score use.
    """

    outcomes: int = 0
    fossilized: int = 0
    pruned: int = 0
    rolled_back: int = 0
    sum_contribution: float = 0.0
    sum_accuracy_delta: float = 0.0
    clipped_contribution: float = 0.0
    clipped_accuracy_delta: float = 0.0

    @property
    def mean_contribution(self) -> float:
        """Winsorised mean: each report's contribution clipped to [-SCORE_CLIP, SCORE_CLIP]."""
        return self.clipped_contribution / self.outcomes if self.outcomes else 0.0

    @property
    def mean_accuracy_delta(self) -> float:
        """Winsorised mean, as `mean_contribution`."""
        return self.clipped_accuracy_delta / self.outcomes if self.outcomes else 0.0

    @property
    def score(self) -> float:
        """What QueryKernels ranks by: the clipped contributions' sum over
        outcomes + SCORE_PRIOR_OUTCOMES (shrunk towards 0, neutral). One more report moves it
        by at most `score_bound(outcomes)`."""
        return self.clipped_contribution / (self.outcomes + SCORE_PRIOR_OUTCOMES)

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
    offset: int = 0
    """Row offset of the first item (with `token_at`, a caller that returns only a prefix
    of `items` can still hand out a token for the rest)."""


@dataclass(frozen=True, kw_only=True)
class BlueprintQuery:
    family: str = ""
    tags: tuple[str, ...] = ()
    """Only blueprints carrying every one of these tags."""
    layout: int = 0
    """Only blueprints compilable for this ActivationLayout (0: any)."""
    include_retired: bool = False
    """Also list retired blueprints."""
    page_size: int = 0
    page_token: str = ""

    def __post_init__(self) -> None:
        _check_filter_strings(family=self.family, tags=self.tags)


@dataclass(frozen=True, kw_only=True)
class KernelQuery:
    blueprint_id: str = ""
    site_key: str = ""
    tags: tuple[str, ...] = ()
    """Only kernels carrying every one of these tags."""
    max_parameters: int = 0
    """0: no bound."""
    include_retired: bool = False
    """Also offer kernels of retired blueprints."""
    key_ids: tuple[str, ...] | None = None
    """Only kernels signed by one of these key ids (Urza passes its trusted signers); None:
    any signer. Server state, not part of the caller's filter: a page token stays valid
    when the trusted set changes between pages."""
    order_by: KernelOrder = "score"
    """Best first. Kernels without field reports score 0 (neutral): they rank below
    kernels that helped and above kernels that hurt. Ties: more outcomes first, then id."""
    page_size: int = 0
    page_token: str = ""

    def __post_init__(self) -> None:
        if self.order_by not in KERNEL_ORDERS:
            raise InvalidArgumentError(
                f"order_by={self.order_by!r}: must be one of {KERNEL_ORDERS}", field="order_by"
            )
        if not isinstance(self.max_parameters, int) or not 0 <= self.max_parameters <= INT64_MAX:
            raise InvalidArgumentError(
                f"max_parameters={self.max_parameters}: must be in [0, {INT64_MAX}] (0: no bound)",
                field="max_parameters",
            )
        _check_filter_strings(blueprint_id=self.blueprint_id, site_key=self.site_key,
                              tags=self.tags)


_FILTER_MAX_CHARS = {"family": 64, "blueprint_id": 64, "site_key": 256}


def _check_filter_strings(*, tags: Sequence[str], **strings: str) -> None:
    for name, value in strings.items():
        top = _FILTER_MAX_CHARS[name]
        if len(value) > top:
            raise InvalidArgumentError(
                f"{name} is {len(value)} characters; at most {top}", field=name)
    if len(tags) > 32:
        raise InvalidArgumentError(f"tags lists {len(tags)} tags; at most 32", field="tags")


_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")


def _bad_token(why: str) -> InvalidArgumentError:
    # The message says what to do and never echoes decoder internals or the token itself.
    return InvalidArgumentError(
        f"page_token is not a token this service issued ({why}); pass the next_page_token "
        "of the previous reply back unchanged, with the same filter", field="page_token")


def page_bounds(query: BlueprintQuery | KernelQuery) -> tuple[int, int]:
    """(offset, limit) of the page a query asks for; the token must match the filter.

    Tokens are parsed strictly: base64url of {"o": <int offset>, "f": <16 hex>} and nothing
    else, the offset an integer in [0, MAX_PAGE_OFFSET], the fingerprint that of the filter.
    """
    size = query.page_size or DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise InvalidArgumentError(
            f"page_size={query.page_size}: must be in [0, {MAX_PAGE_SIZE}] (0: {DEFAULT_PAGE_SIZE})",
            field="page_size",
        )
    token = query.page_token
    if not token:
        return 0, size
    if len(token) > MAX_TOKEN_CHARS or not _TOKEN_CHARS.match(token):
        raise _bad_token("malformed")
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii"))
        payload = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, binascii.Error, RecursionError):
        raise _bad_token("undecodable") from None
    if not isinstance(payload, dict) or set(payload) != {"o", "f"}:
        raise _bad_token("unexpected content")
    offset, fingerprint = payload["o"], payload["f"]
    if (type(offset) is not int or not 0 <= offset <= MAX_PAGE_OFFSET
            or not isinstance(fingerprint, str) or not _FINGERPRINT.match(fingerprint)):
        raise _bad_token("unexpected content")
    if fingerprint != _fingerprint(query):
        raise InvalidArgumentError(
            "page_token belongs to a different query; repeat the filter of the request that "
            "returned it", field="page_token")
    return offset, size


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def token_at(query: BlueprintQuery | KernelQuery, offset: int) -> str:
    """The page token that resumes `query` at row `offset`."""
    payload = {"o": offset, "f": _fingerprint(query)}
    return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()


def next_token(query: BlueprintQuery | KernelQuery, offset: int, limit: int, got: int) -> str:
    """Token for the page after [offset, offset+limit), or "" when this was the last one.

    The store fetches `limit + 1` rows to know whether another page exists.
    """
    if got <= limit:
        return ""
    return token_at(query, offset + limit)


def _fingerprint(query: BlueprintQuery | KernelQuery) -> str:
    # Tokens are only valid for the filter they were issued for: reusing one with a
    # different filter would silently skip or repeat rows.
    spec = asdict(query)
    spec.pop("page_token")
    spec.pop("page_size")
    spec.pop("key_ids", None)
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
    def retire_blueprint(self, blueprint_id: str, *, retired: bool, reason: str = "",
                         at: float | None = None) -> bool:
        """Retire (or, `retired=False`, restore) a blueprint; False when it already was.

        Raises `NotFoundError` when no blueprint has that id.
        """

    @abstractmethod
    def delete_blueprint(self, blueprint_id: str) -> tuple[bool, int, int]:
        """Delete a blueprint, every kernel compiled from it and their field reports, in
        one transaction; returns (deleted, kernels deleted, field reports deleted)."""

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
    def delete_kernel(self, kernel_id: str) -> tuple[bool, int]:
        """Delete a kernel and its field reports; returns (deleted, field reports deleted)."""

    @abstractmethod
    def artifact_shas(self) -> set[str]:
        """The artifact_sha256 of every stored kernel (the blobs that must be kept)."""

    @abstractmethod
    def kernels_without_key_id(self, limit: int = 1000) -> list[tuple[str, bytes]]:
        """(kernel_id, manifest bytes) of kernels stored before signer key ids were kept."""

    @abstractmethod
    def set_key_ids(self, key_ids: dict[str, str]) -> None:
        """Record the signer key id of each kernel id (the backfill of the above)."""

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
    def delete_field_reports(self, *, kernel_id: str = "", run_id: str = "") -> int:
        """Delete the field reports matching both filters (at least one must be set) and
        recompute the affected kernels' stats from what is left; returns how many."""

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
