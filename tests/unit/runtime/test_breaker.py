"""CircuitBreaker: resilience4j state machine over a count-based failure-rate window."""

from __future__ import annotations

import threading

import pytest

from esper.errors import ConfigError, NotFoundError, UnavailableError
from esper.runtime.breaker import BreakerConfig, BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _breaker(clock: Clock, **kw: object) -> CircuitBreaker:
    cfg = dict(failure_rate_threshold=50.0, window_size=10, minimum_calls=4,
               open_wait_s=2.0, half_open_calls=2)
    cfg.update(kw)
    return CircuitBreaker("urza", BreakerConfig(**cfg), clock=clock)


def _fail(b: CircuitBreaker) -> None:
    b.acquire()
    b.record_failure()


def _ok(b: CircuitBreaker) -> None:
    b.acquire()
    b.record_success()


def test_stays_closed_below_minimum_calls_even_when_all_fail() -> None:
    b = _breaker(Clock())
    for _ in range(3):
        _fail(b)
    assert b.state is BreakerState.CLOSED
    assert b.failure_rate() == pytest.approx(100.0)


def test_opens_when_failure_rate_reaches_threshold() -> None:
    b = _breaker(Clock())
    _ok(b)
    _ok(b)
    _fail(b)
    assert b.state is BreakerState.CLOSED  # 3 calls < minimum 4
    _fail(b)  # 2/4 = 50% >= 50%
    assert b.state is BreakerState.OPEN


def test_below_threshold_stays_closed() -> None:
    b = _breaker(Clock())
    for _ in range(3):
        _ok(b)
    _fail(b)  # 25%
    assert b.state is BreakerState.CLOSED


def test_window_slides_old_failures_out() -> None:
    b = _breaker(Clock(), window_size=4, minimum_calls=4, failure_rate_threshold=75.0)
    _fail(b)
    _fail(b)
    _ok(b)
    _ok(b)  # 50%
    _ok(b)  # window [F, O, O, O] = 25%
    _fail(b)  # [O, O, O, F] = 25%
    assert b.state is BreakerState.CLOSED
    assert b.failure_rate() == pytest.approx(25.0)


def test_open_refuses_calls_then_half_opens_after_wait() -> None:
    clock = Clock()
    b = _breaker(clock)
    for _ in range(4):
        _fail(b)
    with pytest.raises(UnavailableError, match="'urza' is OPEN") as err:
        b.acquire()
    assert err.value.reason == "CIRCUIT_OPEN"
    assert b.rejected_calls == 1
    clock.t += 1.99
    assert b.state is BreakerState.OPEN
    clock.t += 0.01
    assert b.state is BreakerState.HALF_OPEN


def test_half_open_permits_limited_trials_and_closes_on_success() -> None:
    clock = Clock()
    b = _breaker(clock)
    for _ in range(4):
        _fail(b)
    clock.t += 2.0
    b.acquire()
    b.acquire()
    with pytest.raises(UnavailableError, match="HALF_OPEN"):
        b.acquire()  # only 2 trial calls
    b.record_success()
    assert b.state is BreakerState.HALF_OPEN  # one trial still out
    b.record_success()
    assert b.state is BreakerState.CLOSED
    assert b.failure_rate() == 0.0  # window restarted


def test_half_open_reopens_when_trials_fail() -> None:
    clock = Clock()
    transitions: list[tuple[BreakerState, BreakerState]] = []
    b = CircuitBreaker(
        "urza",
        BreakerConfig(window_size=4, minimum_calls=4, open_wait_s=1.0, half_open_calls=2),
        clock=clock,
        on_state_change=lambda name, old, new: transitions.append((old, new)),
    )
    for _ in range(4):
        _fail(b)
    clock.t += 1.0
    _ok(b)
    _fail(b)  # 1/2 = 50% >= 50%
    assert b.state is BreakerState.OPEN
    with pytest.raises(UnavailableError):
        b.acquire()  # wait restarted at the re-open
    assert transitions == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.OPEN),
    ]


def test_guard_counts_caller_errors_as_success_and_transport_errors_as_failure() -> None:
    b = _breaker(Clock(), minimum_calls=3, window_size=3)
    with pytest.raises(NotFoundError), b.guard():
        raise NotFoundError("kernel sha256:00 not found")
    with pytest.raises(ConnectionError), b.guard():
        raise ConnectionError("refused")
    assert b.failure_rate() == pytest.approx(50.0)
    with pytest.raises(UnavailableError), b.guard():
        raise UnavailableError("urza unreachable")
    assert b.state is BreakerState.OPEN  # 2/3 failures


def test_concurrent_outcomes_are_all_counted() -> None:
    b = _breaker(Clock(), window_size=1000, minimum_calls=1000, failure_rate_threshold=100.0)

    def work() -> None:
        for i in range(100):
            b.acquire()
            (b.record_failure if i % 4 == 0 else b.record_success)()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.failure_rate() == pytest.approx(25.0)
    assert b.state is BreakerState.CLOSED


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"failure_rate_threshold": 0.0}, "failure_rate_threshold=0.0"),
        ({"window_size": 0}, "window_size=0"),
        ({"minimum_calls": 30}, "minimum_calls=30"),
        ({"half_open_calls": 0}, "half_open_calls=0"),
        ({"open_wait_s": -1.0}, "open_wait_s=-1.0"),
    ],
)
def test_config_rejects_bad_values(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BreakerConfig(**kw)


def test_config_from_dict_rejects_unknown_keys() -> None:
    assert BreakerConfig.from_dict({"window_size": 5, "minimum_calls": 5}).window_size == 5
    with pytest.raises(ConfigError, match="wait_duration"):
        BreakerConfig.from_dict({"wait_duration": 1})


def test_half_open_trials_that_never_report_are_abandoned_for_a_new_round() -> None:
    clock = Clock()
    b = _breaker(clock, half_open_max_wait_s=0.5)
    for _ in range(4):
        _fail(b)
    assert b.state is BreakerState.OPEN
    clock.t += 2.0
    hung = [b.acquire(), b.acquire()]  # both trial permits taken by calls that hang
    with pytest.raises(UnavailableError):
        b.acquire()
    clock.t += 0.5  # the trials did not report in time: open again ...
    assert b.state is BreakerState.OPEN
    clock.t += 2.0  # ... and a fresh round of trials is let through
    fresh = [b.acquire(), b.acquire()]
    # The abandoned round's trials report late, as failures: they must not decide this round.
    for t in hung:
        b.record_failure(t)
    assert b.state is BreakerState.HALF_OPEN
    for t in fresh:
        b.record_success(t)
    assert b.state is BreakerState.CLOSED


def test_a_late_success_of_an_abandoned_round_counts_in_the_current_one() -> None:
    """Under load a trial can outlast its round; its success is still a fresh answer."""
    clock = Clock()
    b = _breaker(clock, half_open_max_wait_s=0.5)
    for _ in range(4):
        _fail(b)
    clock.t += 2.0
    slow = [b.acquire(), b.acquire()]
    clock.t += 0.5
    assert b.state is BreakerState.OPEN  # round abandoned
    clock.t += 2.0
    current = b.acquire()
    for t in slow:
        b.record_success(t)  # late successes: two results decide a round of two trials
    assert b.state is BreakerState.CLOSED
    b.record_success(current)  # the current trial reports after the breaker closed
    assert b.state is BreakerState.CLOSED


def test_raise_if_refusing_fails_fast_without_taking_a_permit() -> None:
    clock = Clock()
    b = _breaker(clock)
    b.raise_if_refusing()  # CLOSED: passes
    for _ in range(4):
        _fail(b)
    with pytest.raises(UnavailableError, match="CIRCUIT_OPEN|OPEN"):
        b.raise_if_refusing()
    assert b.rejected_calls == 1
    clock.t += 2.0
    b.raise_if_refusing()  # HALF_OPEN with permits left
    b.raise_if_refusing()
    assert [b.acquire(), b.acquire()] == [1, 1]  # the checks took no permit
    with pytest.raises(UnavailableError, match="HALF_OPEN"):
        b.raise_if_refusing()
    assert b.rejected_calls == 2


def test_half_open_max_wait_must_be_positive() -> None:
    with pytest.raises(ValueError, match="half_open_max_wait_s=0"):
        BreakerConfig(half_open_max_wait_s=0)
