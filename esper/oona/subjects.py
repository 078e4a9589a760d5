"""Subjects and JetStream stream definitions of the Esper bus.

Subjects:
    esper.events.v1.<run_id>.<kind>   lifecycle, gate, decision, epoch_metrics, degradation,
                                      run_state
    esper.telemetry.v1.<run_id>       health snapshots (high volume, short retention)
    esper.kernels.v1.published        kernel published by Tezzeret (outside any run)

Events emitted outside a run (e.g. a service degrading while idle) use the run token
`NO_RUN` ("_"); run ids must start with a letter or digit, so the two never collide.

Streams (file storage; replicas configurable: 1 on the embedded server, 3 in deploy/k8s):
    ESPER_EVENTS     esper.events.v1.>, esper.kernels.v1.>   7 days / 1 GiB, discard old
    ESPER_TELEMETRY  esper.telemetry.v1.>                    24 h / 512 MiB, 100k msgs per run
Both keep a 2-minute duplicate window, so a publish retried with the same `Nats-Msg-Id`
(the envelope's event_id) within two minutes is stored once. The fsync policy is a server
setting, not a stream one: see `esper.oona.natsd` (sync_interval always).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError

from esper.config import from_dict
from esper.errors import InvalidArgumentError

log = logging.getLogger(__name__)

EVENTS_PREFIX = "esper.events.v1"
TELEMETRY_PREFIX = "esper.telemetry.v1"
KERNELS_PUBLISHED = "esper.kernels.v1.published"
NO_RUN = "_"

_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def check_run_id(run_id: str) -> str:
    """Return the subject token for `run_id` (NO_RUN for ""), or raise if it cannot be one."""
    if run_id == "":
        return NO_RUN
    if not _TOKEN.match(run_id):
        raise InvalidArgumentError(
            f"run_id {run_id!r} cannot be a NATS subject token: use 1-128 characters of "
            "[A-Za-z0-9_-] starting with a letter or digit",
            field="run_id",
        )
    return run_id


def event_subject(run_id: str, kind: str) -> str:
    """`esper.events.v1.<run_id>.<kind>`."""
    if not _KIND.match(kind):
        raise InvalidArgumentError(
            f"event kind {kind!r} must be lower_snake_case (e.g. 'lifecycle')", field="kind"
        )
    return f"{EVENTS_PREFIX}.{check_run_id(run_id)}.{kind}"


def telemetry_subject(run_id: str) -> str:
    """`esper.telemetry.v1.<run_id>`."""
    return f"{TELEMETRY_PREFIX}.{check_run_id(run_id)}"


def run_events_filter(run_id: str) -> str:
    """Filter subject matching every event of one run."""
    return f"{EVENTS_PREFIX}.{check_run_id(run_id)}.>"


_DISCARD = {"old": api.DiscardPolicy.OLD, "new": api.DiscardPolicy.NEW}


@dataclass(kw_only=True, frozen=True)
class StreamSpec:
    """One JetStream stream Esper needs; `ensure_streams` makes the server match it."""

    name: str
    """Stream name (upper case by convention, e.g. ESPER_EVENTS)."""
    subjects: tuple[str, ...]
    """Subjects (wildcards allowed) the stream captures."""
    max_age_s: float
    """Messages older than this are removed (retention by time)."""
    max_bytes: int
    """Total size bound of the stream; the oldest messages go first when it is reached."""
    max_msgs_per_subject: int = -1
    """Bound per subject (per run for telemetry); -1 means no per-subject bound."""
    max_msg_bytes: int = 1 << 20
    """Largest single message accepted; larger publishes are rejected by the server."""
    duplicate_window_s: float = 120.0
    """Window in which a repeated Nats-Msg-Id is recognised and not stored again."""
    replicas: int | None = None
    """Copies kept by a NATS cluster: 1, 3 or 5 (a single server holds 1). None: a new stream
    gets 1 and an existing one keeps the count it has, so a process that was not told the
    count never undoes an operator's R3."""
    discard: str = "old"
    """What a full stream drops: "old" (the oldest messages) or "new" (refuse the publish)."""

    def __post_init__(self) -> None:
        if not re.match(r"^[A-Z][A-Z0-9_]{0,63}$", self.name):
            raise ValueError(f"stream name {self.name!r} must match [A-Z][A-Z0-9_]*")
        if not self.subjects:
            raise ValueError(f"stream {self.name}: subjects must not be empty")
        if self.max_age_s <= 0:
            raise ValueError(f"stream {self.name}: max_age_s must be > 0, got {self.max_age_s}")
        if self.max_bytes <= 0:
            raise ValueError(f"stream {self.name}: max_bytes must be > 0, got {self.max_bytes}")
        if self.max_msgs_per_subject == 0 or self.max_msgs_per_subject < -1:
            raise ValueError(
                f"stream {self.name}: max_msgs_per_subject must be -1 (unbounded) or > 0, "
                f"got {self.max_msgs_per_subject}"
            )
        if self.max_msg_bytes <= 0:
            raise ValueError(
                f"stream {self.name}: max_msg_bytes must be > 0, got {self.max_msg_bytes}"
            )
        if not 0 < self.duplicate_window_s <= self.max_age_s:
            raise ValueError(
                f"stream {self.name}: duplicate_window_s must be in "
                f"(0, max_age_s={self.max_age_s}], "
                f"got {self.duplicate_window_s}"
            )
        if self.replicas is not None and self.replicas not in (1, 3, 5):
            raise ValueError(
                f"stream {self.name}: replicas must be 1, 3, 5 or None (keep), got {self.replicas}"
            )
        if self.discard not in _DISCARD:
            raise ValueError(
                f"stream {self.name}: discard must be 'old' or 'new', got {self.discard!r}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> StreamSpec:
        return from_dict(cls, data, what="stream settings")

    def to_nats(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.name,
            subjects=list(self.subjects),
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=self.max_age_s,
            max_bytes=self.max_bytes,
            max_msgs_per_subject=self.max_msgs_per_subject,
            max_msg_size=self.max_msg_bytes,
            duplicate_window=self.duplicate_window_s,
            num_replicas=self.replicas if self.replicas is not None else 1,
            discard=_DISCARD[self.discard],
        )


EVENTS_STREAM = StreamSpec(
    name="ESPER_EVENTS",
    subjects=(f"{EVENTS_PREFIX}.>", "esper.kernels.v1.>"),
    max_age_s=7 * 24 * 3600.0,
    max_bytes=1 << 30,
)
TELEMETRY_STREAM = StreamSpec(
    name="ESPER_TELEMETRY",
    subjects=(f"{TELEMETRY_PREFIX}.>",),
    max_age_s=24 * 3600.0,
    max_bytes=512 << 20,
    max_msgs_per_subject=100_000,
)
DEFAULT_STREAMS: tuple[StreamSpec, ...] = (EVENTS_STREAM, TELEMETRY_STREAM)


def with_replicas(replicas: int | None, specs: Iterable[StreamSpec] = DEFAULT_STREAMS
                  ) -> tuple[StreamSpec, ...]:
    """`specs` with their replica count set (None: keep what the server has)."""
    return tuple(replace(s, replicas=replicas) for s in specs)


def configured_streams(env: Any = None) -> tuple[StreamSpec, ...]:
    """The Esper streams with the replica count of ESPER_NATS_STREAM_REPLICAS (unset: None)."""
    from esper.oona.connection import stream_replicas_from_env

    return with_replicas(stream_replicas_from_env(env))


def _differs(have: api.StreamConfig, want: api.StreamConfig) -> list[str]:
    """Settings of `want` the server's stream does not have (num_replicas included)."""
    keys = (
        "subjects",
        "max_age",
        "max_bytes",
        "max_msgs_per_subject",
        "max_msg_size",
        "duplicate_window",
        "num_replicas",
        "discard",
        "storage",
        "retention",
    )
    out = []
    for k in keys:
        a, b = getattr(have, k), getattr(want, k)
        if k == "subjects":
            a, b = sorted(a or []), sorted(b or [])
        elif isinstance(b, float):
            a = float(a or 0.0)
        if a != b:
            out.append(k)
    return out


async def ensure_streams(
    js: JetStreamContext, specs: Iterable[StreamSpec] = DEFAULT_STREAMS, *, update: bool = True
) -> dict[str, str]:
    """Create each missing stream; with `update`, also make an existing one match its spec.

    Safe to call from many processes. A spec whose `replicas` is None never changes the
    replica count of an existing stream; one that names a count scales the stream to it
    (JetStream moves the data). Without `update` (what publishers and consumers do: they
    must not undo an operator's settings) an existing stream is left as it is and a
    difference is only logged.

    Returns stream name → "created" | "updated" | "unchanged" | "differs" (not updated).
    Raises the nats-py error (timeout, no responders, API error, a permission the user
    lacks) when the server cannot do it; callers decide whether that is fatal (CLI) or a
    degradation (publisher).
    """
    result: dict[str, str] = {}
    for spec in specs:
        want = spec.to_nats()
        try:
            info = await js.stream_info(spec.name)
        except NotFoundError:
            try:
                await js.add_stream(config=want)
                result[spec.name] = "created"
                continue
            except BadRequestError:
                # Another process created it between our lookup and add: fall through to update.
                info = await js.stream_info(spec.name)
        if spec.replicas is None:
            want.num_replicas = info.config.num_replicas
        diff = _differs(info.config, want)
        if not diff:
            result[spec.name] = "unchanged"
        elif update:
            await js.update_stream(config=want)
            result[spec.name] = "updated"
            if "num_replicas" in diff:
                log.warning("oona: stream %s scaled from R%s to R%s", spec.name,
                            info.config.num_replicas, want.num_replicas)
        else:
            result[spec.name] = "differs"
            log.info("oona: stream %s differs from this process's spec in %s; left as it is "
                     "(reconcile with `esper streams`)", spec.name, diff)
    return result


__all__ = [
    "DEFAULT_STREAMS",
    "EVENTS_PREFIX",
    "EVENTS_STREAM",
    "KERNELS_PUBLISHED",
    "NO_RUN",
    "TELEMETRY_PREFIX",
    "TELEMETRY_STREAM",
    "StreamSpec",
    "check_run_id",
    "configured_streams",
    "ensure_streams",
    "event_subject",
    "run_events_filter",
    "telemetry_subject",
    "with_replicas",
]
