"""Circuit breaker with resilience4j semantics (CLOSED / OPEN / HALF_OPEN).

CLOSED: calls pass; outcomes go into a count-based sliding window. Once the window
holds at least `minimum_calls` outcomes and the failure rate reaches
`failure_rate_threshold`, the breaker OPENs.
OPEN: calls are refused with `UnavailableError` (no remote call is made) until
`open_wait_s` has passed; the next permission request then moves it to HALF_OPEN.
HALF_OPEN: `half_open_calls` trial calls are let through (more are refused); when all
have reported, the breaker CLOSEs if their failure rate is below the threshold and
OPENs again otherwise. Trials that have not all reported after `half_open_max_wait_s`
are abandoned: the breaker OPENs and a new round follows. A late *failure* of an
abandoned round is stale (the call may have been waiting on a server that has since
come back) and is dropped; a late *success* is a fresh answer from the dependency and
counts in the current round -- under heavy load a trial can outlast its round and still
be the best evidence that the dependency is back.

Thread-safe: one lock guards every transition, so a breaker can be shared by a
pool of fetcher threads.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from esper.config import from_dict
from esper.errors import EsperError, UnavailableError

T = TypeVar("T")


class BreakerState(enum.Enum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


@dataclass(kw_only=True, frozen=True)
class BreakerConfig:
    """Thresholds of one circuit breaker."""

    failure_rate_threshold: float = 50.0
    """Percentage of failed calls in the window (0 < x <= 100) at which the breaker opens."""
    window_size: int = 20
    """Number of most recent call outcomes the failure rate is computed over."""
    minimum_calls: int = 10
    """Outcomes the window must hold before the failure rate is evaluated (<= window_size)."""
    open_wait_s: float = 5.0
    """Seconds the breaker stays OPEN before it lets trial calls through."""
    half_open_calls: int = 3
    """Trial calls permitted in HALF_OPEN; their failure rate decides CLOSED or OPEN."""
    half_open_max_wait_s: float = 10.0
    """Seconds HALF_OPEN waits for its trial calls to report; past it the breaker opens again
    and a new round of trials starts. Without it, trials that hang until their deadline
    (a server that accepts connections but does not answer yet) hold every permit."""

    def __post_init__(self) -> None:
        if not 0.0 < self.failure_rate_threshold <= 100.0:
            raise ValueError(
                f"failure_rate_threshold={self.failure_rate_threshold!r}: must be in (0, 100]"
            )
        if self.window_size < 1:
            raise ValueError(f"window_size={self.window_size!r}: must be >= 1")
        if not 1 <= self.minimum_calls <= self.window_size:
            raise ValueError(
                f"minimum_calls={self.minimum_calls!r}: must be in [1, window_size="
                f"{self.window_size}]"
            )
        if self.open_wait_s < 0:
            raise ValueError(f"open_wait_s={self.open_wait_s!r}: must be >= 0")
        if self.half_open_calls < 1:
            raise ValueError(f"half_open_calls={self.half_open_calls!r}: must be >= 1")
        if self.half_open_max_wait_s <= 0:
            raise ValueError(
                f"half_open_max_wait_s={self.half_open_max_wait_s!r}: must be > 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> BreakerConfig:
        return from_dict(cls, data, what="circuit breaker settings")


class CircuitBreaker:
    """A failure-rate circuit breaker shared by every caller of one dependency."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._clock = clock
        self._on_state_change = on_state_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._window: deque[bool] = deque(maxlen=self.config.window_size)  # True = failure
        self._opened_at = 0.0
        self._half_open_permits = 0
        self._half_open_results: list[bool] = []
        self._half_open_since = 0.0
        # Which HALF_OPEN round a trial belongs to: a trial of an abandoned round that
        # reports late must not decide the current one.
        self._round = 0
        self.rejected_calls = 0
        """Calls refused because the breaker was OPEN (or HALF_OPEN with no permit left)."""

    @property
    def state(self) -> BreakerState:
        with self._lock:
            self._maybe_half_open()
            return self._state

    def failure_rate(self) -> float:
        """Failure percentage over the current window (0 when it is empty)."""
        with self._lock:
            return _rate(self._window)

    def raise_if_refusing(self) -> None:
        """Raise the same `UnavailableError` as `acquire` when a call would be refused now,
        without taking a trial permit. Lets a caller fail fast before it sets up a call
        (retry state, request objects): with hundreds of callers polling an open
        breaker, the refusal path is what runs most."""
        with self._lock:
            self._maybe_half_open()
            if self._state is BreakerState.CLOSED or (
                self._state is BreakerState.HALF_OPEN
                and self._half_open_permits < self.config.half_open_calls
            ):
                return
            self.rejected_calls += 1
        raise self._refusal()

    def acquire(self) -> int | None:
        """Ask to make one call; raises `UnavailableError` when the breaker refuses it.

        Every successful `acquire` must be followed by exactly one `record_success`
        or `record_failure` (pass them the returned ticket: the HALF_OPEN round of a
        trial call, None for a call admitted while CLOSED).
        """
        with self._lock:
            self._maybe_half_open()
            if self._state is BreakerState.CLOSED:
                return None
            if (
                self._state is BreakerState.HALF_OPEN
                and self._half_open_permits < self.config.half_open_calls
            ):
                self._half_open_permits += 1
                return self._round
            self.rejected_calls += 1
        raise self._refusal()

    def _refusal(self) -> UnavailableError:
        # Read without the lock: the message is advisory.
        remaining = max(0.0, self._opened_at + self.config.open_wait_s - self._clock())
        return UnavailableError(
            f"circuit breaker {self.name!r} is {self._state.value}: calls refused for "
            f"another {remaining:.2f}s (failure rate reached "
            f"{self.config.failure_rate_threshold}%)",
            reason="CIRCUIT_OPEN",
        )

    def record_success(self, ticket: int | None = None) -> None:
        self._record(failed=False, ticket=ticket)

    def record_failure(self, ticket: int | None = None) -> None:
        self._record(failed=True, ticket=ticket)

    @contextmanager
    def guard(self, is_failure: Callable[[BaseException], bool] | None = None
              ) -> Iterator[int | None]:
        """Run the block as one call; an exception counts as a failure when `is_failure` says so.

        Yields the call's ticket: not None when it is a HALF_OPEN trial call.

        By default every exception counts except `EsperError`s that are the caller's
        fault (bad argument, not found, ...): those say the dependency is healthy.
        """
        ticket = self.acquire()
        try:
            yield ticket
        except BaseException as exc:
            if (is_failure or default_is_failure)(exc):
                self.record_failure(ticket)
            else:
                self.record_success(ticket)
            raise
        self.record_success(ticket)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.guard():
            return fn(*args, **kwargs)

    # -- internals (lock held) -------------------------------------------------

    def _maybe_half_open(self) -> None:
        if (
            self._state is BreakerState.HALF_OPEN
            and self._clock() - self._half_open_since >= self.config.half_open_max_wait_s
        ):
            self._open()  # the trials never reported: try again after open_wait_s
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.config.open_wait_s
        ):
            self._transition(BreakerState.HALF_OPEN)
            self._half_open_permits = 0
            self._half_open_results = []
            self._half_open_since = self._clock()
            self._round += 1

    def _record(self, *, failed: bool, ticket: int | None = None) -> None:
        with self._lock:
            self._maybe_half_open()
            if self._state is BreakerState.CLOSED:
                self._window.append(failed)
                if (
                    len(self._window) >= self.config.minimum_calls
                    and _rate(self._window) >= self.config.failure_rate_threshold
                ):
                    self._open()
            elif self._state is BreakerState.HALF_OPEN:
                if failed and ticket is not None and ticket != self._round:
                    return  # a stale failure: a trial of an abandoned round
                self._half_open_results.append(failed)
                if len(self._half_open_results) >= self.config.half_open_calls:
                    if _rate(self._half_open_results) >= self.config.failure_rate_threshold:
                        self._open()
                    else:
                        self._window.clear()
                        self._transition(BreakerState.CLOSED)
            # OPEN: a call admitted before the breaker opened reports late; the state
            # was already decided by the window, so its outcome is dropped.

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._window.clear()
        self._transition(BreakerState.OPEN)

    def _transition(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if self._on_state_change is not None and old is not new:
            self._on_state_change(self.name, old, new)


def default_is_failure(exc: BaseException) -> bool:
    """Whether an exception says the dependency is unhealthy (vs. a caller mistake)."""
    if isinstance(exc, UnavailableError):
        return True
    return not isinstance(exc, EsperError)


def _rate(outcomes: deque[bool] | list[bool]) -> float:
    if not outcomes:
        return 0.0
    return 100.0 * sum(outcomes) / len(outcomes)
