"""Durable, explicitly-acknowledged, idempotent JetStream consumers of Esper events.

JetStream delivers at least once: a message whose ack is lost, or whose handler crashed
after doing its work, comes again. `Consumer` therefore keeps a seen-set of event ids
(`MemorySeenStore` for tests and tools, `SqliteSeenStore` to survive restarts) and
acknowledges an already-seen event without calling the handler again. A handler that
raises gets its message NAKed with a delay, so the server redelivers it later (up to
`max_deliver` times); bytes that are not an `EventEnvelope` are terminated (never
redelivered) and counted as poison.

Order of work per message: handler → remember event id → ack (synchronously confirmed by
the server when `ack_sync`), so a crash between the handler and the ack re-runs the
handler only if the seen-set was not persisted; handlers that must apply exactly once
should use `SqliteSeenStore`.

Each handler call runs inside an OpenTelemetry CONSUMER span whose parent is the
trace context the publisher put in the message headers.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError
from opentelemetry import trace

from esper import localdb
from esper.config import from_dict
from esper.errors import (
    ConfigError,
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
)
from esper.oona.connection import NatsCredentials, connect_options, display_servers
from esper.oona.envelope import decode, extract_context
from esper.oona.subjects import StreamSpec, configured_streams, ensure_streams
from generated.esper.oona.v1.events_pb2 import EventEnvelope

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("esper.oona")

Handler = Callable[[EventEnvelope], Awaitable[None] | None]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class SeenStore(Protocol):
    """Event ids a consumer has already applied."""

    def contains(self, event_id: str) -> bool: ...
    def add(self, event_id: str) -> None: ...
    def close(self) -> None: ...


class MemorySeenStore:
    """In-memory seen-set bounded to the `max_entries` most recent ids (oldest forgotten first)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ConfigError(f"seen-set max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._ids: OrderedDict[str, None] = OrderedDict()

    def contains(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        self._ids.move_to_end(event_id)
        while len(self._ids) > self.max_entries:
            self._ids.popitem(last=False)

    def __len__(self) -> int:
        return len(self._ids)

    def close(self) -> None:
        self._ids.clear()


class SqliteSeenStore:
    """Seen-set in a SQLite file, so idempotence survives a consumer restart.

    Keeps the `max_entries` most recently added ids; older ones are pruned in bulk. Ids
    older than the stream's retention can never be redelivered, so forgetting them is safe.
    """

    def __init__(self, path: Path | str, max_entries: int = 1_000_000) -> None:
        if max_entries < 1:
            raise ConfigError(f"seen-set max_entries must be >= 1, got {max_entries}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._db = localdb.connect(self.path, synchronous="NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS seen (event_id TEXT PRIMARY KEY, n INTEGER NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS seen_n ON seen(n)")
        row = self._db.execute("SELECT COALESCE(MAX(n), 0) FROM seen").fetchone()
        self._n = int(row[0])

    def contains(self, event_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM seen WHERE event_id = ?", (event_id,)).fetchone()
        return row is not None

    def add(self, event_id: str) -> None:
        with self._lock:
            self._n += 1
            self._db.execute(
                "INSERT OR REPLACE INTO seen (event_id, n) VALUES (?, ?)", (event_id, self._n)
            )
            # Prune in chunks of 10% so the delete is amortised over many inserts.
            if self._n % max(1, self.max_entries // 10) == 0:
                self._db.execute("DELETE FROM seen WHERE n <= ?", (self._n - self.max_entries,))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM seen").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


_DELIVER = {"all": api.DeliverPolicy.ALL, "new": api.DeliverPolicy.NEW}


@dataclass(kw_only=True, frozen=True)
class ConsumerConfig:
    """One durable pull consumer."""

    durable: str
    """Durable consumer name; the server remembers its position under this name."""
    subject_filter: str
    """Subject (wildcards allowed) this consumer receives, e.g. esper.events.v1.<run>.>."""
    stream: str | None = None
    """Stream to consume; None looks it up from the subject filter."""
    deliver: str = "all"
    """Where a new durable starts: "all" (from the first stored message) or "new"."""
    ack_wait_s: float = 30.0
    """Unacknowledged messages are redelivered after this long."""
    max_deliver: int = 20
    """Deliveries per message before the server gives up on it (-1: unlimited)."""
    nak_delay_s: float = 1.0
    """Redelivery delay after the handler raised."""
    batch: int = 64
    """Messages fetched per pull request."""
    fetch_timeout_s: float = 1.0
    """How long one pull request waits for messages."""
    ack_sync: bool = True
    """Wait for the server to confirm each ack (a restart then never re-delivers acked work)."""
    connect_timeout_s: float = 5.0
    """How long start() tries to reach NATS before raising UnavailableError."""
    ensure_streams: bool = True
    """Create the missing Esper streams before binding (so a consumer may start first);
    existing streams are never changed by a consumer."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.durable):
            raise ValueError(
                f"consumer durable {self.durable!r} must be 1-64 characters of [A-Za-z0-9_-]"
            )
        if not self.subject_filter or " " in self.subject_filter:
            raise ValueError(
                f"consumer subject_filter {self.subject_filter!r} must be a NATS subject"
            )
        if self.deliver not in _DELIVER:
            raise ValueError(f"consumer deliver must be 'all' or 'new', got {self.deliver!r}")
        if self.max_deliver == 0 or self.max_deliver < -1:
            raise ValueError(f"consumer max_deliver must be -1 or >= 1, got {self.max_deliver}")
        for name in ("ack_wait_s", "fetch_timeout_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"consumer {name} must be > 0, got {getattr(self, name)}")
        if self.nak_delay_s < 0:
            raise ValueError(f"consumer nak_delay_s must be >= 0, got {self.nak_delay_s}")
        if self.batch < 1:
            raise ValueError(f"consumer batch must be >= 1, got {self.batch}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ConsumerConfig:
        return from_dict(cls, data, what="consumer settings")


@dataclass
class ConsumerStats:
    delivered: int = 0
    """Messages received (redeliveries included)."""
    handled: int = 0
    """Events the handler applied successfully (once per event id)."""
    skipped_duplicates: int = 0
    """Deliveries of an already-applied event id: acked without calling the handler."""
    handler_failures: int = 0
    """Handler raised; the message was NAKed for redelivery."""
    poison: int = 0
    """Messages that were not an EventEnvelope; terminated."""


class Consumer:
    """A durable pull consumer: `async with Consumer(url, durable=..., subject_filter=...) as c`."""

    def __init__(
        self,
        url: str | list[str],
        *,
        config: ConsumerConfig | None = None,
        seen: SeenStore | None = None,
        streams: tuple[StreamSpec, ...] | None = None,
        credentials: NatsCredentials | None = None,
        **settings: Any,
    ) -> None:
        """`url`: one NATS URL, several comma-separated, or a list; `credentials`: the NATS
        user (None: from ESPER_NATS_USER / ESPER_NATS_PASSWORD_FILE, or anonymous)."""
        if config is not None and settings:
            raise ConfigError(f"pass consumer settings {sorted(settings)} inside config=, not both")
        self.config = config if config is not None else ConsumerConfig.from_dict(settings)
        self._connect_options = connect_options(url, credentials if credentials is not None
                                                else NatsCredentials.from_env())
        self.url = display_servers(self._connect_options["servers"])
        self.seen: SeenStore = seen if seen is not None else MemorySeenStore()
        self.stats = ConsumerStats()
        self._streams = streams if streams is not None else configured_streams()
        self._nc: NatsClient | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._errors = 0

    async def _error_cb(self, exc: Exception) -> None:
        # One line instead of nats-py's traceback per refused reconnect.
        self._errors += 1
        if self._errors <= 3 or self._errors % 100 == 0:
            log.warning(
                "oona consumer %s: NATS error #%d: %s: %s",
                self.config.durable,
                self._errors,
                type(exc).__name__,
                exc,
            )

    async def start(self) -> Consumer:
        """Connect, make sure the stream and the durable consumer exist, and bind to it.

        Raises:
            UnavailableError: NATS could not be reached within connect_timeout_s.
            FailedPreconditionError: the durable exists with a different subject filter.
        """
        cfg = self.config
        try:
            self._nc = await asyncio.wait_for(
                nats.connect(
                    **self._connect_options,
                    name=f"esper-oona-consumer-{cfg.durable}",
                    connect_timeout=cfg.connect_timeout_s,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=self._error_cb,
                ),
                cfg.connect_timeout_s,
            )
        except TimeoutError as exc:
            raise UnavailableError(
                f"NATS at {self.url} not reachable within {cfg.connect_timeout_s}s "
                f"(consumer {cfg.durable})"
            ) from exc
        js = self._nc.jetstream()
        if cfg.ensure_streams:
            await ensure_streams(js, self._streams, update=False)
        stream = cfg.stream or await js.find_stream_name_by_subject(cfg.subject_filter)
        try:
            info = await js.consumer_info(stream, cfg.durable)
            if info.config.filter_subject != cfg.subject_filter:
                raise FailedPreconditionError(
                    f"durable consumer {cfg.durable!r} on {stream} already filters "
                    f"{info.config.filter_subject!r}, not {cfg.subject_filter!r}; "
                    "use another durable name"
                )
        except NotFoundError:
            await js.add_consumer(
                stream,
                config=api.ConsumerConfig(
                    name=cfg.durable,
                    durable_name=cfg.durable,
                    filter_subject=cfg.subject_filter,
                    deliver_policy=_DELIVER[cfg.deliver],
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=cfg.ack_wait_s,
                    max_deliver=cfg.max_deliver,
                ),
            )
        self._sub = await js.pull_subscribe_bind(durable=cfg.durable, stream=stream)
        return self

    async def close(self) -> None:
        if self._nc is not None:
            nc, self._nc, self._sub = self._nc, None, None
            await nc.close()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _ack(self, msg: Msg) -> None:
        if self.config.ack_sync:
            await msg.ack_sync(timeout=self.config.ack_wait_s)
        else:
            await msg.ack()

    async def _process(self, msg: Msg, handler: Handler) -> None:
        self.stats.delivered += 1
        try:
            env = decode(msg.data)
        except InvalidArgumentError as exc:
            log.error(
                "oona consumer %s: terminating poison message on %s: %s",
                self.config.durable,
                msg.subject,
                exc,
            )
            self.stats.poison += 1
            await msg.term()
            return
        if self.seen.contains(env.event_id):
            self.stats.skipped_duplicates += 1
            await self._ack(msg)
            return
        ctx = extract_context(msg.headers)
        with _tracer.start_as_current_span(
            f"oona consume {msg.subject}",
            context=ctx,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "messaging.message.id": env.event_id,
            },
        ):
            try:
                result = handler(env)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # noqa: BLE001 - any handler failure means: redeliver
                self.stats.handler_failures += 1
                log.warning(
                    "oona consumer %s: handler failed on event %s (delivery %d), "
                    "redelivering in %.1fs: %s",
                    self.config.durable,
                    env.event_id,
                    msg.metadata.num_delivered,
                    self.config.nak_delay_s,
                    exc,
                )
                await msg.nak(delay=self.config.nak_delay_s)
                return
        self.seen.add(env.event_id)
        await self._ack(msg)
        self.stats.handled += 1

    async def consume(
        self,
        handler: Handler,
        *,
        stop: asyncio.Event | None = None,
        idle_timeout_s: float | None = None,
        max_events: int | None = None,
    ) -> ConsumerStats:
        """Fetch and handle messages until `stop` is set, no message came for `idle_timeout_s`,
        or `max_events` events were handled. Survives NATS outages (retries the fetch)."""
        if self._sub is None:
            raise FailedPreconditionError(
                "consumer not started; use `async with Consumer(...)` or await start()"
            )
        last = time.monotonic()
        while not (stop is not None and stop.is_set()):
            if max_events is not None and self.stats.handled >= max_events:
                break
            if idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
                break
            want = self.config.batch
            if max_events is not None:
                want = max(1, min(want, max_events - self.stats.handled))
            try:
                msgs = await self._sub.fetch(want, timeout=self.config.fetch_timeout_s)
            except (TimeoutError, nats.errors.TimeoutError):  # no message within the wait
                continue
            except (
                nats.errors.ConnectionClosedError,
                nats.errors.ConnectionReconnectingError,
                nats.errors.NoRespondersError,
                APIError,
            ) as exc:
                log.warning(
                    "oona consumer %s: fetch failed (%s); retrying", self.config.durable, exc
                )
                await asyncio.sleep(0.5)
                continue
            last = time.monotonic()
            for msg in msgs:
                await self._process(msg, handler)
        return self.stats


async def adrain(
    url: str,
    subject_filter: str,
    durable: str,
    timeout: float,
    *,
    stream: str | None = None,
    seen: SeenStore | None = None,
    credentials: NatsCredentials | None = None,
) -> list[EventEnvelope]:
    """Consume everything available (until no message came for `timeout` s) and return it."""
    out: list[EventEnvelope] = []
    consumer = Consumer(
        url,
        seen=seen,
        credentials=credentials,
        durable=durable,
        subject_filter=subject_filter,
        stream=stream,
        fetch_timeout_s=min(timeout, 1.0),
    )
    async with consumer:
        await consumer.consume(out.append, idle_timeout_s=timeout)
    return out


def drain(
    url: str,
    subject_filter: str,
    durable: str,
    timeout: float,
    *,
    stream: str | None = None,
    seen: SeenStore | None = None,
    credentials: NatsCredentials | None = None,
) -> list[EventEnvelope]:
    """Synchronous `adrain` for tests and tools; works inside or outside a running event loop."""
    coro = adrain(url, subject_filter, durable, timeout, stream=stream, seen=seen,
                  credentials=credentials)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from async code: run on a private loop in a thread rather than nest loops.
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            box["error"] = exc

    t = threading.Thread(target=run, name="oona-drain")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
