"""Tenacity parts for calls to the cloud: a deadline stop, a Retry-After floor, the link backoff.

`retry_call` runs one cloud call with bounded, jittered retries that never outlive the caller's deadline.
"""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from router.clock import Clock
from router.errors import CircuitOpen, CloudUnavailable, RateLimited

__all__ = [
    "RETRYABLE_STATUSES",
    "DeadlineStop",
    "LinkBackoff",
    "ProportionalJitter",
    "RetryAfterWait",
    "RetryPolicy",
    "is_retryable",
    "parse_retry_after",
    "retry_call",
]

T = TypeVar("T")

# 429: the server asks us to come back later; 502/503/504: a proxy or the model server is
# momentarily unable. A plain 500 is not retried at once: for inference it usually means this
# input crashes the model, and repeating it at once repeats the crash. It still surfaces as
# CloudUnavailable, so a queued request is tried again later (bounded by its TTL).
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounds of one cloud call's retries; times in seconds on the injected clock."""

    max_attempts: int = 4
    """Attempts in all, the first one included."""
    max_total_s: float = 30.0
    """No attempt starts later than this after the call began, whatever the caller's deadline."""
    attempt_timeout_s: float = 10.0
    """One attempt's limit; the time left before the deadline lowers it further."""
    backoff_initial_s: float = 0.25
    """Full-jitter exponential backoff: the n-th wait is uniform in [0, initial * 2**(n-1)]."""
    backoff_max_s: float = 4.0
    """Cap of the backoff window. A server's Retry-After may ask for longer; the deadline decides."""
    min_attempt_s: float = 0.05
    """An attempt is not started with less time than this left before the deadline."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        for name in ("max_total_s", "attempt_timeout_s", "backoff_max_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("backoff_initial_s", "min_attempt_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110 §10.2.3).

    Returns None when the header is absent or unreadable; a date in the past gives 0.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive result means "-0000"
            return None
        seconds = when.timestamp() - now_wall
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def is_retryable(error: BaseException) -> bool:
    """Connection errors, timeouts and the statuses in RETRYABLE_STATUSES; nothing else (not
    a call the breaker or the rate held back: it was not sent)."""
    if not isinstance(error, CloudUnavailable) or isinstance(error, CircuitOpen | RateLimited):
        return False
    return error.status is None or error.status in RETRYABLE_STATUSES


class DeadlineStop(stop_base):
    """Stop when the next attempt could not start, after its wait, with `min_attempt_s` left.

    Tenacity computes the wait before asking the stop, so a Retry-After beyond the deadline
    ends the call at once instead of sleeping into a certain failure.
    """

    def __init__(self, clock: Clock, deadline: float, min_attempt_s: float) -> None:
        self.clock = clock
        self.deadline = deadline
        self.min_attempt_s = min_attempt_s

    def __call__(self, retry_state: RetryCallState) -> bool:
        starts_at = self.clock.monotonic() + retry_state.upcoming_sleep
        return starts_at + self.min_attempt_s > self.deadline


class RetryAfterWait(wait_base):
    """The wrapped backoff, raised to the failed attempt's Retry-After when it asked for longer."""

    def __init__(self, backoff: wait_base) -> None:
        self.backoff = backoff

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self.backoff(retry_state)
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None and outcome.failed else None
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, int | float):
            return max(wait, float(retry_after))
        return wait


class ProportionalJitter(wait_base):
    """Multiply another wait by a uniform factor in [1 - ratio, 1 + ratio], never above `cap`."""

    def __init__(
        self, base: wait_base, ratio: float, cap: float, rng: random.Random | None = None
    ) -> None:
        self.base = base
        self.ratio = ratio
        self.cap = cap
        self.rng = rng or random.Random()

    def __call__(self, retry_state: RetryCallState) -> float:
        factor = self.rng.uniform(1 - self.ratio, 1 + self.ratio)
        return min(self.cap, self.base(retry_state) * factor)


class LinkBackoff:
    """Waits between probes of a down link: initial * factor**(n-1), capped, with ± jitter.

    Defaults: 1 s, x1.6, cap 120 s, ±20 %. The jitter is applied around the capped value and
    the result clipped to the cap again, so no wait exceeds `cap` (at the cap: 96 to 120 s).
    """

    def __init__(
        self,
        initial_s: float = 1.0,
        factor: float = 1.6,
        cap_s: float = 120.0,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        if not (initial_s > 0 and factor >= 1 and cap_s >= initial_s and 0 <= jitter < 1):
            raise ValueError(
                "LinkBackoff needs initial_s > 0, factor >= 1, cap_s >= initial_s, 0 <= jitter < 1"
            )
        self.initial_s = initial_s
        self.factor = factor
        self.cap_s = cap_s
        self.jitter = jitter
        self._wait = ProportionalJitter(
            wait_exponential(multiplier=initial_s, exp_base=factor, max=cap_s), jitter, cap_s, rng
        )
        self._state = RetryCallState(retry_object=AsyncRetrying(), fn=None, args=(), kwargs={})

    def __call__(self, n: int) -> float:
        """The wait after the n-th consecutive failure (n >= 1)."""
        self._state.attempt_number = max(1, n)
        return self._wait(self._state)

    def bounds(self, n: int) -> tuple[float, float]:
        """The range the n-th wait is drawn from; for tests and docs."""
        base = min(self.cap_s, self.initial_s * self.factor ** (max(1, n) - 1))
        return base * (1 - self.jitter), min(self.cap_s, base * (1 + self.jitter))


async def retry_call(
    attempt: Callable[[float], Awaitable[T]],
    *,
    policy: RetryPolicy,
    clock: Clock,
    deadline: float | None = None,
    before_attempt: Callable[[float], Awaitable[object]] | None = None,
) -> T:
    """Run `attempt(timeout_s)` until it succeeds, fails for good, or the time is up.

    `deadline` is an absolute `clock.monotonic()` time. Each attempt gets
    min(policy.attempt_timeout_s, time left). A non-retryable error propagates as it is; when
    retries give up, CloudUnavailable is raised from the last failure, keeping its status and
    Retry-After. `before_attempt(latest)` is awaited before each attempt (a rate's turn, to
    come by the `clock.monotonic()` time `latest`, or raise): its wait comes out of the time
    left, not out of the attempt's own timeout, which starts after it.
    """
    end = clock.monotonic() + policy.max_total_s
    if deadline is not None:
        end = min(end, deadline)
    left = end - clock.monotonic()
    if left < policy.min_attempt_s:
        raise CloudUnavailable(f"no time for a cloud call: {max(0.0, left):.3f} s left")

    async def one() -> T:
        if before_attempt is not None:
            await before_attempt(end - policy.min_attempt_s)
        return await attempt(min(policy.attempt_timeout_s, end - clock.monotonic()))

    retrying = AsyncRetrying(
        sleep=clock.sleep,
        stop=stop_after_attempt(policy.max_attempts)
        | DeadlineStop(clock, end, policy.min_attempt_s),
        wait=RetryAfterWait(
            wait_random_exponential(multiplier=policy.backoff_initial_s, max=policy.backoff_max_s)
        ),
        retry=retry_if_exception(is_retryable),
    )
    try:
        result: T = await retrying(one)
    except RetryError as gave_up:
        last = gave_up.last_attempt.exception()
        attempts = gave_up.last_attempt.attempt_number
        status = getattr(last, "status", None)
        retry_after = getattr(last, "retry_after", None)
        raise CloudUnavailable(
            f"cloud call gave up after {attempts} attempt(s): {last}",
            status=status,
            retry_after=retry_after,
        ) from last
    return result
