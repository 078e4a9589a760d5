"""Non-blocking JetStream publisher for the training process.

`Publisher.publish(envelope)` may be called from any thread, including the training loop,
and never waits on the network: it serialises the envelope, captures the caller's trace
context into headers, appends to a bounded in-memory queue and returns. A background
thread runs its own asyncio loop with nats-py, publishes to JetStream and awaits each ack
(pipelined, up to `max_in_flight` at a time).

When NATS is down the queue fills; once it holds `max_queue` envelopes the **oldest** are
dropped by default (`drop="oldest"`: the newest state of a run is worth more than an old
one), or the new one is refused (`drop="newest"`). Every drop is counted in `stats()`.
nats-py keeps reconnecting (forever, `reconnect_wait_s` apart); when the server is back
the queue is published in order and the outage is reported through `on_degraded`:

    on_degraded("unavailable", detail)   connection lost / first connect failed
    on_degraded("dropping", detail)      the queue overflowed and envelopes are being dropped
    on_degraded("recovered", detail)     connected again (detail says how many were dropped)
    on_degraded("rejected", detail)      the server refused an envelope for good (e.g. too large)
    on_degraded("breaker_open", detail)  publishes kept failing while connected; pausing
    on_degraded("stalled", detail)       connected, but an envelope sent `stall_after_s` ago is
                                         still not acknowledged (its stream has no leader after
                                         a node died, a full disk, a black-holed connection);
                                         "recovered" follows once none waits that long. Judged per
                                         envelope, so a stalled ESPER_EVENTS is seen even while
                                         ESPER_TELEMETRY (led by another node) still acks

Several servers (a list, or ESPER_NATS_URL's comma-separated form) give fail-over: nats-py
reconnects to another member of the cluster in milliseconds. The NATS user comes from
`credentials`, else from ESPER_NATS_USER / ESPER_NATS_PASSWORD_FILE (see
`esper.oona.connection`). Nothing is dropped before the first connection succeeds: what is
published meanwhile waits in the same bounded queue (`max_queue`) and goes out, in order,
once a server answers.

For a run's record, `settle(timeout)` waits for the queue to empty and returns the final
counters: `dropped + rejected` envelopes never reached the bus (`PublisherStats.lost`),
`queued + in_flight` had not yet when the timeout passed (`PublisherStats.undelivered`).

A publish whose ack does not arrive is retried with the same `Nats-Msg-Id`, so a retry of
a message the server did store is recognised as a duplicate and stored once (within the
stream's duplicate window). Ordering: envelopes are written to the connection in publish
order, so they are stored in that order; only a publish that fails while later ones
succeed can land after them, which consumers can detect from `EventEnvelope.sequence`.

Beyond nats-py's reconnect loop a `CircuitBreaker` (esper.runtime.breaker) guards the
publishes themselves: when the server is connected but JetStream keeps failing (no stream,
timeouts), the publisher stops hammering it for `breaker.open_wait_s`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError

from esper.config import from_dict
from esper.errors import ConfigError, FailedPreconditionError, UnavailableError
from esper.oona.connection import NatsCredentials, connect_options, display_servers, parse_servers
from esper.oona.envelope import encode, headers_for, subject_for
from esper.oona.subjects import StreamSpec, configured_streams, ensure_streams
from esper.runtime.breaker import BreakerConfig, BreakerState, CircuitBreaker
from generated.esper.oona.v1.events_pb2 import EventEnvelope

log = logging.getLogger(__name__)

DegradedCallback = Callable[[str, str], None]

_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    NoStreamResponseError,
    asyncio.TimeoutError,
    ConnectionError,
)


@dataclass(kw_only=True, frozen=True)
class PublisherConfig:
    """Bounds and timings of one `Publisher`."""

    max_queue: int = 10_000
    """Envelopes buffered while NATS is slow or down; beyond this, `drop` decides."""
    drop: str = "oldest"
    """On overflow: "oldest" discards the oldest queued envelope, "newest" refuses the new one."""
    max_in_flight: int = 64
    """Publishes awaiting their JetStream ack at once (1 = strictly one after another)."""
    ack_timeout_s: float = 2.0
    """How long one publish waits for its ack before it is retried."""
    connect_timeout_s: float = 2.0
    """TCP + handshake timeout of one connection attempt."""
    reconnect_wait_s: float = 0.5
    """Pause between reconnection attempts while NATS is unreachable."""
    ensure_streams: str = "create"
    """On every (re)connect: "create" the Esper streams that are missing (existing ones are
    left as the operator set them), "update" them to this process's specs too, or "off"."""
    stall_after_s: float = 2.0
    """An envelope sent this long ago and still not acknowledged (while connected) is reported
    as "stalled"; an ack normally takes milliseconds, and `ack_timeout_s` is as long."""
    ping_interval_s: float = 5.0
    """Client PING period; two unanswered PINGs mark a silent connection dead and nats-py
    moves to another server (its default of 120 s would hide a black-holed node for 4 min)."""
    close_timeout_s: float = 5.0
    """How long close() tries to publish what is still queued."""
    name: str = "esper-oona-publisher"
    """Connection name shown by the server's monitoring."""
    breaker: BreakerConfig = field(
        default_factory=lambda: BreakerConfig(
            window_size=20, minimum_calls=5, open_wait_s=1.0, half_open_calls=1
        )
    )
    """Circuit breaker over publish batches while connected."""

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"publisher max_queue must be >= 1, got {self.max_queue}")
        if self.drop not in ("oldest", "newest"):
            raise ValueError(f"publisher drop must be 'oldest' or 'newest', got {self.drop!r}")
        if self.max_in_flight < 1:
            raise ValueError(f"publisher max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.ensure_streams not in ("create", "update", "off"):
            raise ValueError(
                f"publisher ensure_streams must be 'create', 'update' or 'off', got {self.ensure_streams!r}"
            )
        for name in ("ack_timeout_s", "connect_timeout_s", "reconnect_wait_s", "close_timeout_s",
                     "stall_after_s", "ping_interval_s"):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"publisher {name} must be > 0, got {value}")
        if not self.name:
            raise ValueError("publisher name must be non-empty")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PublisherConfig:
        return from_dict(cls, data, what="publisher settings")


@dataclass(frozen=True)
class PublisherStats:
    """A consistent snapshot of a publisher's counters."""

    published: int
    """Envelopes acknowledged by JetStream (duplicates included)."""
    duplicates: int
    """Acks saying the server already had that Nats-Msg-Id (a retry of a stored message)."""
    dropped: int
    """Envelopes lost: queue overflow, or still queued when close() gave up."""
    rejected: int
    """Envelopes the server refused for good (too large, no permission); never retried."""
    queued: int
    """Envelopes waiting in the queue."""
    in_flight: int
    """Envelopes sent and awaiting their ack."""
    connected: bool
    breaker: str
    """State of the publish circuit breaker: CLOSED, OPEN or HALF_OPEN."""
    last_error: str | None
    stalled: bool = False
    """Connected, but an envelope sent stall_after_s ago still waits for its ack."""

    @property
    def lost(self) -> int:
        """Envelopes that will never reach the bus: dropped plus rejected."""
        return self.dropped + self.rejected

    @property
    def undelivered(self) -> int:
        """Envelopes not acknowledged yet (queued or in flight)."""
        return self.queued + self.in_flight


class _Item:
    __slots__ = ("data", "first_sent", "headers", "subject")

    def __init__(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        self.subject = subject
        self.data = data
        self.headers = headers
        self.first_sent: float | None = None  # monotonic time of the first publish attempt


class Publisher:
    """Publishes `EventEnvelope`s to JetStream from a background thread; see the module doc."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        config: PublisherConfig | None = None,
        on_degraded: DegradedCallback | None = None,
        streams: tuple[StreamSpec, ...] | None = None,
        credentials: NatsCredentials | None = None,
        **settings: Any,
    ) -> None:
        """Args:
            url: one NATS URL, several comma-separated, or a list of them.
            streams: the streams to create when missing (None: Esper's two, with
                ESPER_NATS_STREAM_REPLICAS replicas).
            credentials: the NATS user (None: ESPER_NATS_USER/ESPER_NATS_PASSWORD_FILE, or
                anonymous when they are unset).

        Raises:
            ConfigError: an unknown setting, a malformed URL, unreadable credentials.
        """
        if config is not None and settings:
            raise ConfigError(
                f"pass publisher settings {sorted(settings)} inside config=, not both"
            )
        self.config = config if config is not None else PublisherConfig.from_dict(settings)
        try:
            self._servers: tuple[str, ...] | None = parse_servers(url)
            self.url = display_servers(self._servers)
        except ConfigError as e:
            # Kept alive like an unreachable server: the caller's run goes on and hears
            # about it through on_degraded (a bad URL must not stop training).
            self._servers, self._bad_url = None, e
            self.url = str(url)
        self._credentials = credentials if credentials is not None else NatsCredentials.from_env()
        self._on_degraded = on_degraded
        self._streams = streams if streams is not None else configured_streams()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[_Item] = deque()
        self._in_flight = 0
        self._published = 0
        self._duplicates = 0
        self._dropped = 0
        self._rejected = 0
        self._last_error: str | None = None
        self._connected = False
        self._closed = False
        self._dead = False  # the background thread ended on an unexpected error
        self._stopping = False
        self._idle = False
        self._overflowing = False
        self._overflow_reported = False
        self._healthy = True
        self._stalled = False
        self._stall_started = 0.0
        self._connected_since = 0.0
        self._last_ack = 0.0
        self._backlog_since = 0.0
        self._sending: list[_Item] = []
        self._outage_started = 0.0
        self._dropped_at_outage = 0
        self._errors_logged = 0
        self._breaker = CircuitBreaker(
            f"oona-publisher:{url}", self.config.breaker, on_state_change=self._breaker_changed
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._connected_evt: asyncio.Event | None = None
        self._need_streams = self.config.ensure_streams != "off"
        self._nc: NatsClient | None = None
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._thread_main, args=(started,), name=f"oona-publisher[{url}]", daemon=True
        )
        self._thread.start()
        started.wait()

    # -- caller side (any thread) ----------------------------------------------------------
    def publish(self, envelope: EventEnvelope) -> bool:
        """Queue `envelope` for publishing; never blocks on the network.

        Returns False when the envelope itself was not queued (drop="newest" and full).
        Raises:
            FailedPreconditionError: the publisher was closed.
            InvalidArgumentError: the envelope has no payload, no event_id or a bad run_id.
        """
        item = _Item(subject_for(envelope), encode(envelope), headers_for(envelope))
        with self._lock:
            if self._closed:
                raise FailedPreconditionError(
                    f"publisher for {self.url} is closed; event {envelope.event_id} not sent"
                )
            if self._dead:
                self._dropped += 1
                return False
            accepted = True
            if not self._queue and not self._in_flight:
                self._backlog_since = time.monotonic()
            if len(self._queue) >= self.config.max_queue:
                self._dropped += 1
                if not self._overflowing:
                    self._overflowing = True
                if self.config.drop == "oldest":
                    self._queue.popleft()
                    self._queue.append(item)
                else:
                    accepted = False
            else:
                self._queue.append(item)
            wake = self._idle
            self._idle = False
        if wake:
            assert self._loop is not None and self._wake is not None
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:
                # The thread died after we queued: its death path already counted this
                # envelope as dropped and reported the failure through on_degraded.
                log.debug("oona publisher loop closed; envelope %s dropped", envelope.event_id)
        return accepted

    def stats(self) -> PublisherStats:
        with self._lock:
            return PublisherStats(
                published=self._published,
                duplicates=self._duplicates,
                dropped=self._dropped,
                rejected=self._rejected,
                queued=len(self._queue),
                in_flight=self._in_flight,
                connected=self._connected,
                breaker=self._breaker.state.value,
                last_error=self._last_error,
                stalled=self._stalled,
            )

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is acknowledged; False if `timeout` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue and self._in_flight == 0, timeout)

    def settle(self, timeout: float) -> PublisherStats:
        """Wait up to `timeout` for everything queued so far to be acknowledged; then the
        counters, e.g. for the run's final record (`lost`, `undelivered`)."""
        self.flush(timeout)
        return self.stats()

    def close(self, timeout: float | None = None) -> PublisherStats:
        """Publish what is queued (up to `timeout`, default close_timeout_s), then disconnect.

        Envelopes still queued after that are counted as dropped. Idempotent.
        """
        with self._lock:
            already = self._closed
            self._closed = True
        if not already:
            flushed = self.flush(self.config.close_timeout_s if timeout is None else timeout)
            with self._lock:
                self._stopping = True
                left = len(self._queue) + self._in_flight
            if not flushed:
                log.warning(
                    "oona publisher closing with %d envelopes unpublished (NATS at %s unreachable)",
                    left,
                    self.url,
                )
            assert self._loop is not None and self._wake is not None
            if not self._dead:
                self._loop.call_soon_threadsafe(self._wake.set)
        self._thread.join()
        return self.stats()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- background thread -----------------------------------------------------------------
    def _thread_main(self, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._wake = asyncio.Event()
        self._connected_evt = asyncio.Event()
        started.set()
        try:
            loop.run_until_complete(self._run())
        except Exception as exc:
            # A bug here must not surface in the training thread: from now on every publish
            # is counted as a drop, and the caller hears about it once through on_degraded.
            log.exception("oona publisher thread for %s died", self.url)
            with self._lock:
                self._dead = True
                self._last_error = f"publisher thread died: {exc!r}"
                self._dropped += len(self._queue)
                self._queue.clear()
            self._emit("failed", f"publisher thread died: {exc!r}; further events are dropped")
        finally:
            # nats-py may leave its reconnect task cancelling; let it finish before closing.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                # Bounded for the same reason as above: a task that ignores cancellation
                # must not keep the thread (and close()) alive.
                loop.run_until_complete(asyncio.wait(pending, timeout=self.config.close_timeout_s))
            loop.close()

    def _emit(self, kind: str, detail: str) -> None:
        if self._on_degraded is None:
            return
        try:
            self._on_degraded(kind, detail)
        except Exception:
            # The callback belongs to the caller; its failure must not stop publishing.
            log.exception("oona publisher on_degraded(%r) callback raised", kind)

    def _breaker_changed(self, name: str, old: BreakerState, new: BreakerState) -> None:
        if new is BreakerState.OPEN:
            self._emit(
                "breaker_open", f"{name}: publishes kept failing ({self._last_error}); pausing"
            )

    def _mark_down(self, why: str) -> None:
        with self._lock:
            self._connected = False
            self._last_error = why
            was_healthy, self._healthy = self._healthy, False
            if was_healthy:
                self._outage_started = time.monotonic()
                self._dropped_at_outage = self._dropped
        if self._connected_evt is not None:
            self._connected_evt.clear()
        if was_healthy:
            log.warning(
                "oona: NATS at %s unavailable (%s); buffering up to %d envelopes",
                self.url,
                why,
                self.config.max_queue,
            )
            self._emit("unavailable", f"NATS at {self.url} unavailable: {why}")

    def _mark_up(self) -> None:
        with self._lock:
            self._connected = True
            was_healthy, self._healthy = self._healthy, True
            lost = self._dropped - self._dropped_at_outage
            outage = time.monotonic() - self._outage_started
            self._errors_logged = 0
            # An envelope sent before the outage is not "stalled" the moment we are back.
            self._connected_since = time.monotonic()
        assert self._connected_evt is not None
        self._connected_evt.set()
        self._need_streams = self.config.ensure_streams != "off"
        if not was_healthy:
            log.info(
                "oona: NATS at %s reachable again after %.1fs; %d envelopes dropped meanwhile",
                self.url,
                outage,
                lost,
            )
            self._emit(
                "recovered", f"NATS at {self.url} reachable after {outage:.1f}s; {lost} dropped"
            )

    async def _error_cb(self, exc: Exception) -> None:
        # One line per error instead of nats-py's default traceback per refused connect;
        # a long outage logs its first errors and then only every 100th.
        with self._lock:
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._errors_logged += 1
            n = self._errors_logged
        if n <= 3 or n % 100 == 0:
            log.warning("oona: NATS %s error #%d: %s: %s", self.url, n, type(exc).__name__, exc)
        if self._nc is None or not self._nc.is_connected:
            self._mark_down(f"{type(exc).__name__}: {exc}")

    async def _disconnected_cb(self) -> None:
        if self._stopping:  # our own close(), not an outage
            with self._lock:
                self._connected = False
            return
        self._mark_down("disconnected")

    async def _reconnected_cb(self) -> None:
        self._mark_up()

    async def _connect(self) -> NatsClient:
        if self._servers is None:
            raise self._bad_url
        return await nats.connect(
            **connect_options(self._servers, self._credentials),
            name=self.config.name,
            ping_interval=self.config.ping_interval_s,
            max_outstanding_pings=2,
            connect_timeout=self.config.connect_timeout_s,
            reconnect_time_wait=self.config.reconnect_wait_s,
            max_reconnect_attempts=-1,  # also makes the first connect retry until it succeeds
            allow_reconnect=True,
            error_cb=self._error_cb,
            disconnected_cb=self._disconnected_cb,
            reconnected_cb=self._reconnected_cb,
        )

    async def _run(self) -> None:
        assert self._wake is not None and self._connected_evt is not None
        connect_task = asyncio.ensure_future(self._connect())
        nc: NatsClient | None = None
        js: JetStreamContext | None = None
        try:
            while True:
                self._report_overflow()
                self._check_stall()
                if self._stopping:
                    break
                if nc is None:
                    done, _ = await asyncio.wait({connect_task}, timeout=0.25)
                    if not done:
                        continue
                    try:
                        nc = self._nc = connect_task.result()
                    except (nats.errors.Error, OSError, ValueError, ConfigError) as exc:
                        # Refused connections are retried inside nats-py; this is what it gives
                        # up on (bad URL, auth). Keep trying: the operator may fix the server.
                        log.error(
                            "oona: cannot connect to %s: %s: %s", self.url, type(exc).__name__, exc
                        )
                        self._mark_down(f"connect failed: {type(exc).__name__}: {exc}")
                        await asyncio.sleep(self.config.reconnect_wait_s * 4)
                        connect_task = asyncio.ensure_future(self._connect())
                        continue
                    js = nc.jetstream(timeout=self.config.ack_timeout_s)
                    self._mark_up()
                    continue
                if not nc.is_connected:
                    await self._wait(self._connected_evt, 0.25)
                    continue
                assert js is not None
                if self._need_streams:
                    try:
                        await ensure_streams(
                            js, self._streams, update=self.config.ensure_streams == "update"
                        )
                        self._need_streams = False
                    except (*_TRANSIENT, APIError) as exc:
                        with self._lock:
                            self._last_error = f"ensure streams: {type(exc).__name__}: {exc}"
                        log.warning("oona: could not ensure streams on %s: %s", self.url, exc)
                        await asyncio.sleep(self.config.reconnect_wait_s)
                        continue
                batch = self._take_batch()
                if not batch:
                    await self._wait(self._wake, 0.25)
                    continue
                try:
                    self._breaker.acquire()
                except UnavailableError:
                    self._requeue(batch)
                    await asyncio.sleep(min(self.config.breaker.open_wait_s, 0.25))
                    continue
                await self._publish_batch(js, batch)
        finally:
            if nc is None:
                # Never connected: nothing to close. nats-py's connect loop can swallow a
                # cancellation that lands in its retry sleep and go on retrying, so the wait
                # is bounded: close() must return even against a dead server.
                connect_task.cancel()
                done, _ = await asyncio.wait({connect_task}, timeout=self.config.close_timeout_s)
                if done and not connect_task.cancelled():
                    connect_task.exception()  # retrieved: not logged as never retrieved
            else:
                # asyncio.wait, not wait_for: wait_for waits for the cancelled close to
                # finish, which a close stuck in nats-py's reconnect loop never does.
                closing = asyncio.ensure_future(nc.close())
                done, _ = await asyncio.wait({closing}, timeout=self.config.close_timeout_s)
                if not done:
                    closing.cancel()
                    log.warning("oona publisher: closing the NATS connection took over %.1fs; "
                                "abandoned", self.config.close_timeout_s)
                elif not closing.cancelled() and closing.exception() is not None:
                    log.warning("oona publisher: closing the NATS connection failed: %s",
                                closing.exception())
            self._finish()

    async def _wait(self, evt: asyncio.Event, timeout: float) -> None:
        try:
            await asyncio.wait_for(evt.wait(), timeout)
        except TimeoutError:
            pass  # periodic wake-up to check overflow and shutdown

    def _take_batch(self) -> list[_Item]:
        assert self._wake is not None
        self._wake.clear()
        now = time.monotonic()
        with self._lock:
            n = min(len(self._queue), self.config.max_in_flight)
            batch = [self._queue.popleft() for _ in range(n)]
            self._in_flight += n
            for it in batch:
                if it.first_sent is None:
                    it.first_sent = now
            self._sending = batch
            if not batch:
                self._idle = True
                self._changed.notify_all()
        return batch

    def _requeue(self, items: list[_Item]) -> None:
        """Put unacknowledged items back at the head, in order, honouring the bound."""
        with self._lock:
            self._sending = []
            self._in_flight -= len(items)
            self._queue.extendleft(reversed(items))
            while len(self._queue) > self.config.max_queue:
                self._dropped += 1
                self._overflowing = True
                if self.config.drop == "oldest":
                    self._queue.popleft()
                else:
                    self._queue.pop()
            self._changed.notify_all()

    async def _publish_batch(self, js: JetStreamContext, batch: list[_Item]) -> None:
        results = await asyncio.gather(
            *(
                js.publish(
                    it.subject, it.data, timeout=self.config.ack_timeout_s, headers=it.headers
                )
                for it in batch
            ),
            return_exceptions=True,
        )
        retry: list[_Item] = []
        rejected: list[tuple[_Item, BaseException]] = []
        published = duplicates = 0
        for item, res in zip(batch, results, strict=True):
            if not isinstance(res, BaseException):
                published += 1
                duplicates += bool(res.duplicate)
            elif isinstance(res, _TRANSIENT) or (isinstance(res, APIError) and res.code == 503):
                retry.append(item)
                if isinstance(res, NoStreamResponseError | nats.errors.NoRespondersError):
                    self._need_streams = self.config.ensure_streams != "off"
            else:
                # APIError (too large, no permission) and anything unforeseen: retrying the
                # same bytes would fail the same way and block the queue behind it.
                rejected.append((item, res))
        # Reported before the counters move, so a flush() that sees them has seen this too;
        # the envelopes to retry are still counted as waiting (in `_sending`).
        self._check_stall(ended=[it for it, res in zip(batch, results, strict=True)
                                 if not isinstance(res, BaseException)] + [it for it, _ in rejected])
        with self._lock:
            if not retry:
                self._sending = []
            if published or rejected:
                self._last_ack = time.monotonic()
            self._published += published
            self._duplicates += duplicates
            self._rejected += len(rejected)
            self._in_flight -= published + len(rejected)
            if retry:
                self._last_error = f"{type(results[batch.index(retry[0])]).__name__} on publish"
            if self._overflowing and len(self._queue) < self.config.max_queue:
                self._overflowing = False
                self._overflow_reported = False
            self._changed.notify_all()
        if retry:
            self._breaker.record_failure()
            self._requeue(retry)
            # An answer that comes at once (no responders: a stream without a leader) would
            # otherwise spin this loop; the breaker only opens after several such batches.
            await asyncio.sleep(0.05)
        else:
            self._breaker.record_success()
        for item, exc in rejected:
            log.error(
                "oona: JetStream rejected %s (%d bytes): %s", item.subject, len(item.data), exc
            )
            self._emit(
                "rejected", f"{item.subject} (Nats-Msg-Id {item.headers.get('Nats-Msg-Id')}): {exc}"
            )

    def _oldest_unacked(self, exclude: list[_Item]) -> float | None:
        """First-send time of the longest-waiting envelope that was sent and not acked
        (caller holds the lock). Requeued envelopes sit at the head of the queue."""
        skip = {id(it) for it in exclude}
        oldest = None
        for it in self._sending:
            if it.first_sent is not None and id(it) not in skip:
                oldest = it.first_sent if oldest is None else min(oldest, it.first_sent)
        for it in self._queue:
            if it.first_sent is None:
                break
            oldest = it.first_sent if oldest is None else min(oldest, it.first_sent)
        return oldest

    def _check_stall(self, ended: list[_Item] | None = None) -> None:
        """Report "stalled" / "recovered" as the publisher's wait for acks crosses
        stall_after_s; `ended` are envelopes just acknowledged (not waiting any more).

        Stalled while connected means either an envelope sent that long ago is still not
        acknowledged (its stream is stuck, even if another stream acks), or envelopes wait
        and nothing at all was acknowledged for that long (they cannot even be sent: the
        stream lookup fails, the breaker is open).
        """
        now = time.monotonic()
        with self._lock:
            if not self._connected:
                return  # "unavailable" covers it
            waiting = len(self._queue) + self._in_flight - len(ended or [])
            oldest = self._oldest_unacked(ended or [])
            sent_wait = 0.0 if oldest is None else now - max(oldest, self._connected_since)
            idle_wait = 0.0 if waiting <= 0 or (ended and len(ended) > 0) else \
                now - max(self._last_ack, self._backlog_since, self._connected_since)
            waited = max(sent_wait, idle_wait)
            stalled = waited >= self.config.stall_after_s
            if stalled == self._stalled:
                return
            self._stalled = stalled
            if stalled:
                self._stall_started = now - waited
            lasted = now - self._stall_started
            why = self._last_error or "no ack"
        if stalled:
            log.warning("oona: JetStream at %s stalled: no ack for %.1fs (%d envelopes waiting; "
                        "%s)", self.url, waited, waiting, why)
            self._emit("stalled", f"JetStream at {self.url}: no ack for {waited:.1f}s with "
                                  f"{waiting} envelopes waiting ({why})")
        else:
            log.info("oona: JetStream at %s acknowledges again after a %.1fs stall", self.url, lasted)
            self._emit("recovered", f"JetStream at {self.url} acknowledges again after {lasted:.1f}s")

    def _report_overflow(self) -> None:
        with self._lock:
            report = self._overflowing and not self._overflow_reported
            if report:
                self._overflow_reported = True
            dropped = self._dropped
        if report:
            log.warning(
                "oona: publish queue full (%d); dropping %s envelopes (%d so far)",
                self.config.max_queue,
                self.config.drop,
                dropped,
            )
            self._emit(
                "dropping",
                f"queue of {self.config.max_queue} full; dropping {self.config.drop} "
                f"envelopes, {dropped} dropped so far",
            )

    def _finish(self) -> None:
        with self._lock:
            left = len(self._queue) + self._in_flight
            self._dropped += left
            self._queue.clear()
            self._in_flight = 0
            self._connected = False
            self._changed.notify_all()
        if left:
            self._emit("dropped_at_close", f"{left} envelopes never reached NATS at {self.url}")
