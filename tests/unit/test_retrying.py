"""Retries on a fake clock: what is retried, Retry-After, the cap, the deadline, the link backoff."""

from __future__ import annotations

import email.utils
import random

import pytest

from router.clock import FakeClock
from router.errors import CircuitOpen, CloudRejected, CloudUnavailable
from router.retrying import (
    LinkBackoff,
    RetryPolicy,
    is_retryable,
    parse_retry_after,
    retry_call,
)


class Script:
    """An attempt function that raises the scripted errors in turn, then answers "ok"."""

    def __init__(self, clock: FakeClock, errors: list[Exception], takes_s: float = 0.0) -> None:
        self.clock = clock
        self.errors = list(errors)
        self.takes_s = takes_s
        self.starts: list[float] = []
        self.limits: list[float] = []

    async def __call__(self, limit_s: float) -> str:
        self.starts.append(self.clock.monotonic())
        self.limits.append(limit_s)
        self.clock.advance(min(self.takes_s, limit_s))
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def unavailable(status: int | None = None, retry_after: float | None = None) -> CloudUnavailable:
    return CloudUnavailable(f"status {status}", status=status, retry_after=retry_after)


# --- what is retried ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [None, 429, 502, 503, 504])
async def test_retryable_failures_are_retried_until_success(status: int | None) -> None:
    clock = FakeClock()
    script = Script(clock, [unavailable(status), unavailable(status)])
    assert await retry_call(script, policy=RetryPolicy(), clock=clock) == "ok"
    assert len(script.starts) == 3
    assert len(clock.slept) == 2


@pytest.mark.parametrize(
    "error",
    [
        CloudUnavailable("internal error", status=500),
        CloudUnavailable("not implemented", status=501),
        CloudRejected("bad tensor", status=400),
        CloudRejected("who are you", status=401),
        CloudRejected("conflict", status=422),
        CircuitOpen(),
    ],
    ids=["500", "501", "400", "401", "422", "breaker"],
)
async def test_other_failures_propagate_after_one_attempt(error: Exception) -> None:
    clock = FakeClock()
    script = Script(clock, [error])
    with pytest.raises(type(error)) as raised:
        await retry_call(script, policy=RetryPolicy(), clock=clock)
    assert raised.value is error
    assert len(script.starts) == 1
    assert clock.slept == []


def test_is_retryable_table() -> None:
    assert is_retryable(unavailable(None))
    assert is_retryable(unavailable(429))
    assert not is_retryable(unavailable(500))
    assert not is_retryable(CloudRejected("x", status=404))
    assert not is_retryable(CircuitOpen())
    assert not is_retryable(ValueError("a bug is not a network problem"))


# --- bounds ---------------------------------------------------------------------------------


async def test_gives_up_after_max_attempts_with_the_last_failure_as_cause() -> None:
    clock = FakeClock()
    last = unavailable(503, retry_after=0.5)
    script = Script(clock, [unavailable(None), unavailable(502), last])
    with pytest.raises(CloudUnavailable) as raised:
        await retry_call(script, policy=RetryPolicy(max_attempts=3), clock=clock)
    assert len(script.starts) == 3
    assert raised.value.__cause__ is last
    assert raised.value.status == 503
    assert raised.value.retry_after == 0.5
    assert "3 attempt(s)" in str(raised.value)


async def test_backoff_is_jittered_and_capped() -> None:
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=12, max_total_s=1000, backoff_initial_s=0.5, backoff_max_s=2)
    script = Script(clock, [unavailable(None)] * 11)
    random.seed(7)
    assert await retry_call(script, policy=policy, clock=clock) == "ok"
    assert len(clock.slept) == 11
    for n, wait in enumerate(clock.slept, start=1):
        assert 0 <= wait <= min(2.0, 0.5 * 2 ** (n - 1))
    assert len(set(clock.slept)) > 5  # jittered, not a fixed ladder


async def test_retry_after_is_a_lower_bound_beyond_the_backoff_cap() -> None:
    clock = FakeClock()
    policy = RetryPolicy(backoff_initial_s=0.1, backoff_max_s=0.2)
    script = Script(clock, [unavailable(429, retry_after=3.0), unavailable(503)])
    assert await retry_call(script, policy=policy, clock=clock) == "ok"
    assert clock.slept[0] == pytest.approx(3.0)
    assert clock.slept[1] <= 0.2  # no Retry-After this time: the backoff again
    assert script.starts[1] - script.starts[0] >= 3.0


async def test_retry_after_beyond_the_deadline_gives_up_at_once() -> None:
    clock = FakeClock()
    script = Script(clock, [unavailable(429, retry_after=30.0)])
    deadline = clock.monotonic() + 5.0
    with pytest.raises(CloudUnavailable) as raised:
        await retry_call(script, policy=RetryPolicy(), clock=clock, deadline=deadline)
    assert clock.slept == []  # no sleeping into a certain failure
    assert len(script.starts) == 1
    assert raised.value.status == 429
    assert raised.value.retry_after == 30.0


async def test_attempts_stop_at_the_deadline_and_never_overrun_it() -> None:
    clock = FakeClock()
    start = clock.monotonic()
    deadline = start + 5.0
    policy = RetryPolicy(max_attempts=100, attempt_timeout_s=2.0, min_attempt_s=0.5)
    script = Script(clock, [unavailable(None)] * 100, takes_s=1.5)  # each attempt times out
    with pytest.raises(CloudUnavailable):
        await retry_call(script, policy=policy, clock=clock, deadline=deadline)
    assert clock.monotonic() <= deadline
    for begun, limit in zip(script.starts, script.limits, strict=True):
        assert deadline - begun >= 0.5  # no attempt began that could not get min_attempt_s
        assert limit == pytest.approx(min(2.0, deadline - begun))
    assert len(script.starts) >= 2


async def test_a_wait_for_a_turn_before_an_attempt_leaves_the_attempt_its_whole_timeout() -> None:
    # A paced call may wait for its turn up to the deadline; its attempt's own timeout starts
    # once the wait is over (it used to be what the wait left of it: a call that waited 9.9 s
    # of 10 got 0.1 s to be answered, and timed out).
    clock = FakeClock()
    start = clock.monotonic()
    deadline = start + 60.0
    policy = RetryPolicy(attempt_timeout_s=10.0, max_total_s=30.0, min_attempt_s=0.05)
    latest: list[float] = []

    async def turn(by: float) -> None:
        latest.append(by)
        await clock.sleep(12.0)  # longer than one attempt's timeout

    script = Script(clock, [])
    assert (
        await retry_call(script, policy=policy, clock=clock, deadline=deadline, before_attempt=turn)
        == "ok"
    )
    assert latest == [pytest.approx(start + 30.0 - 0.05)]  # the call's end, not the attempt's
    assert script.starts == [pytest.approx(start + 12.0)]
    assert script.limits == [pytest.approx(10.0)]


async def test_total_time_is_bounded_without_a_caller_deadline() -> None:
    clock = FakeClock()
    start = clock.monotonic()
    policy = RetryPolicy(max_attempts=1000, max_total_s=10.0, attempt_timeout_s=1.0)
    script = Script(clock, [unavailable(None)] * 1000, takes_s=1.0)
    with pytest.raises(CloudUnavailable):
        await retry_call(script, policy=policy, clock=clock)
    assert clock.monotonic() - start <= 10.0


async def test_no_attempt_when_the_deadline_is_too_close() -> None:
    clock = FakeClock()
    script = Script(clock, [])
    deadline = clock.monotonic() + 0.01
    with pytest.raises(CloudUnavailable, match="no time"):
        await retry_call(
            script, policy=RetryPolicy(min_attempt_s=0.05), clock=clock, deadline=deadline
        )
    assert script.starts == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_total_s": 0}, "max_total_s"),
        ({"attempt_timeout_s": -1}, "attempt_timeout_s"),
        ({"min_attempt_s": -0.1}, "min_attempt_s"),
    ],
)
def test_bad_policy_names_the_field(changes: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**changes)  # type: ignore[arg-type]


# --- Retry-After parsing ----------------------------------------------------------------------


def test_parse_retry_after_seconds_and_dates() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 3 ", now) == 3.0
    assert parse_retry_after(email.utils.formatdate(now + 42, usegmt=True), now) == pytest.approx(
        42
    )
    assert parse_retry_after(email.utils.formatdate(now - 42, usegmt=True), now) == 0.0
    assert parse_retry_after("-5", now) == 0.0
    for unreadable in (None, "", "soon", "nan", "inf", "Mon, 99 Foo 2024"):
        assert parse_retry_after(unreadable, now) is None


# --- the link backoff -------------------------------------------------------------------------


def test_link_backoff_sequence_bounds() -> None:
    backoff = LinkBackoff(rng=random.Random(1))
    expected = 1.0
    for n in range(1, 25):
        low, high = backoff.bounds(n)
        assert low == pytest.approx(min(expected, 120.0) * 0.8)
        assert high == pytest.approx(min(min(expected, 120.0) * 1.2, 120.0))
        for _ in range(20):
            assert low <= backoff(n) <= high
        expected *= 1.6
    assert backoff.bounds(1) == pytest.approx((0.8, 1.2))
    assert backoff.bounds(2) == pytest.approx((1.28, 1.92))
    assert backoff.bounds(100) == pytest.approx((96.0, 120.0))


def test_link_backoff_jitter_spreads_waits() -> None:
    backoff = LinkBackoff(rng=random.Random(3))
    waits = {round(backoff(3), 6) for _ in range(50)}
    assert len(waits) > 40
    assert min(waits) < 2.56 < max(waits)


def test_link_backoff_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="jitter"):
        LinkBackoff(jitter=1.5)
