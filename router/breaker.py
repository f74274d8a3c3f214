"""CircuitBreaker: stop calling a cloud that keeps failing, then let one probe find out if it is back.

Closed → open after N consecutive failures (or a failure rate over a window); open for a cool-down
that grows with the failures; then half-open, where exactly one call goes through and decides.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import StrEnum

from router.clock import Clock
from router.retrying import LinkBackoff

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """A three-state breaker on an injected clock. Not thread-safe: use it from one event loop.

    `cooldown(n)` gives the open time after the n-th consecutive failure; by default the link
    backoff (1 s, x1.6, cap 120 s, ±20 %), so a breaker that keeps failing its probes waits
    longer each time. A half-open probe that never reports back (its caller was cancelled
    without `release()`) is presumed lost after `probe_timeout_s`, and another may go.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        failure_threshold: int = 3,
        failure_rate: float | None = None,
        window: int = 20,
        min_calls: int = 10,
        cooldown: Callable[[int], float] | None = None,
        probe_timeout_s: float = 30.0,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {failure_threshold}")
        if failure_rate is not None and not 0 < failure_rate <= 1:
            raise ValueError(f"failure_rate must be in (0, 1], got {failure_rate}")
        if not 1 <= min_calls <= window:
            raise ValueError(f"min_calls must be in [1, window={window}], got {min_calls}")
        self._clock = clock
        self.failure_threshold = failure_threshold
        self.failure_rate = failure_rate
        self.min_calls = min_calls
        self._cooldown = cooldown or LinkBackoff()
        self.probe_timeout_s = probe_timeout_s
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._outcomes: deque[bool] = deque(maxlen=window)
        self._consecutive_failures = 0
        self._half_open_at = 0.0
        self._probe_started: float | None = None
        self.trips = 0
        """Times the breaker has opened since it was made; for metrics."""

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock.monotonic() >= self._half_open_at:
            self._set(BreakerState.HALF_OPEN)
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    @property
    def half_open_at(self) -> float | None:
        """When an open breaker turns half-open (clock.monotonic()); None unless open."""
        return self._half_open_at if self.state is BreakerState.OPEN else None

    def retry_in(self) -> float:
        """Seconds until a call could be allowed: 0 when closed or a probe slot is free."""
        state = self.state
        now = self._clock.monotonic()
        if state is BreakerState.OPEN:
            return self._half_open_at - now
        if state is BreakerState.HALF_OPEN and self._probe_started is not None:
            return max(0.0, self._probe_started + self.probe_timeout_s - now)
        return 0.0

    def allow(self) -> bool:
        """May a call go now? In half-open, True for exactly one caller: the probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        now = self._clock.monotonic()
        if self._probe_started is not None and now - self._probe_started < self.probe_timeout_s:
            return False
        self._probe_started = now
        return True

    def record_success(self) -> None:
        state = self.state
        if state is BreakerState.OPEN:
            return  # a call that began before the breaker opened; the probe decides
        self._consecutive_failures = 0
        if state is BreakerState.HALF_OPEN:
            self._outcomes.clear()
            self._probe_started = None
            self._set(BreakerState.CLOSED)
        else:
            self._outcomes.append(True)

    def record_failure(self) -> None:
        state = self.state
        if state is BreakerState.OPEN:
            return
        self._consecutive_failures += 1
        if state is BreakerState.HALF_OPEN:
            self._open()
            return
        self._outcomes.append(False)
        if self._consecutive_failures >= self.failure_threshold or self._rate_exceeded():
            self._open()

    def hasten(self, within_s: float) -> None:
        """An open breaker turns half-open `within_s` from now at the latest."""
        if self._state is BreakerState.OPEN:
            self._half_open_at = min(self._half_open_at, self._clock.monotonic() + within_s)

    def release(self) -> None:
        """The call ended without a verdict (cancelled, or a 4xx that says nothing of health)."""
        if self._state is BreakerState.HALF_OPEN:
            self._probe_started = None

    def _rate_exceeded(self) -> bool:
        if self.failure_rate is None or len(self._outcomes) < self.min_calls:
            return False
        failures = sum(1 for ok in self._outcomes if not ok)
        return failures / len(self._outcomes) >= self.failure_rate

    def _open(self) -> None:
        self._outcomes.clear()
        self._probe_started = None
        self._half_open_at = self._clock.monotonic() + self._cooldown(self._consecutive_failures)
        self.trips += 1
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        changed = state is not self._state
        self._state = state
        if changed and self._on_change is not None:
            self._on_change(state)
