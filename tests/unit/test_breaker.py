"""CircuitBreaker on a fake clock: trips, cool-down, exactly one half-open probe, close and reopen."""

from __future__ import annotations

import pytest

from router.breaker import BreakerState, CircuitBreaker
from router.clock import FakeClock


def make(clock: FakeClock, **kwargs: object) -> tuple[CircuitBreaker, list[BreakerState]]:
    changes: list[BreakerState] = []
    kwargs.setdefault("cooldown", lambda n: 10.0 * n)
    breaker = CircuitBreaker(clock, on_change=changes.append, **kwargs)  # type: ignore[arg-type]
    return breaker, changes


def test_opens_after_consecutive_failures_only() -> None:
    clock = FakeClock()
    breaker, changes = make(clock, failure_threshold=3)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # a success breaks the run
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert changes == [BreakerState.OPEN]
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(30.0)  # cooldown(3 consecutive failures)


def test_half_open_lets_exactly_one_probe_and_closes_on_success() -> None:
    clock = FakeClock()
    breaker, changes = make(clock, failure_threshold=1)
    breaker.record_failure()
    clock.advance(9.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # the probe
    assert not breaker.allow()
    assert not breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert all(breaker.allow() for _ in range(5))
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
    assert breaker.consecutive_failures == 0


def test_failed_probe_reopens_for_a_longer_cooldown() -> None:
    clock = FakeClock()
    breaker, changes = make(clock, failure_threshold=2)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.retry_in() == pytest.approx(20.0)
    clock.advance(20.0)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_in() == pytest.approx(30.0)
    assert breaker.trips == 2
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.OPEN]


def test_late_results_while_open_do_not_change_it() -> None:
    clock = FakeClock()
    breaker, _ = make(clock, failure_threshold=1)
    breaker.record_failure()
    breaker.record_success()  # a call that started before the trip
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_in() == pytest.approx(10.0)


def test_released_probe_slot_lets_another_probe_go() -> None:
    clock = FakeClock()
    breaker, _ = make(clock, failure_threshold=1)
    breaker.record_failure()
    clock.advance(10.0)
    assert breaker.allow()
    breaker.release()  # the probe was cancelled without a verdict
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()


def test_lost_probe_expires_after_probe_timeout() -> None:
    clock = FakeClock()
    breaker, _ = make(clock, failure_threshold=1, probe_timeout_s=5.0)
    breaker.record_failure()
    clock.advance(10.0)
    assert breaker.allow()
    clock.advance(4.0)
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(1.0)
    clock.advance(1.0)
    assert breaker.allow()


def test_failure_rate_trips_without_a_consecutive_run() -> None:
    clock = FakeClock()
    breaker, _ = make(clock, failure_threshold=100, failure_rate=0.5, window=10, min_calls=10)
    for _ in range(4):
        breaker.record_failure()
        breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED  # 5 of 9: below min_calls
    breaker.record_success()  # 5 failures of 10 is 0.5
    assert breaker.state is BreakerState.CLOSED  # a success never trips it
    breaker.record_failure()  # window now holds 5 failures of 10
    assert breaker.state is BreakerState.OPEN


def test_default_cooldown_is_the_link_backoff() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(clock, failure_threshold=1)
    breaker.record_failure()
    assert 0.8 <= breaker.retry_in() <= 1.2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"window": 5, "min_calls": 6}, "min_calls"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CircuitBreaker(FakeClock(), **kwargs)  # type: ignore[arg-type]


def test_hasten_cuts_an_open_cooldown_short_and_never_lengthens_it() -> None:
    clock = FakeClock()
    breaker, _ = make(clock, failure_threshold=1, cooldown=lambda n: 120.0)
    breaker.hasten(10.0)  # closed: nothing to cut short
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.retry_in() == 120.0
    breaker.hasten(10.0)
    assert breaker.retry_in() == 10.0
    breaker.hasten(30.0)
    assert breaker.retry_in() == 10.0
    clock.advance(10.0)
    assert breaker.state is BreakerState.HALF_OPEN
