"""RequestPacer: when the agent may start its next call to the cloud, shared by the live path and
the drain, so that a large batch goes out at a rate the cloud accepts instead of as a storm.

Three rules, on the injected clock:
- a rate of its own (`cloud_requests_per_s`, bursts of `cloud_burst`), as a GCRA schedule
  (the virtual-scheduling form of a token bucket, ITU-T I.371): each call is given a start time;
- the cloud's Retry-After (a 429 or 503) holds every call until it has passed, after which calls
  resume at the rate, not all at once;
- a 429 halves the rate (once per hold: the calls already in flight get theirs too), which then
  grows back to the configured one over `recovery_s` (additive increase, multiplicative
  decrease, as TCP finds a link's rate), so a cloud whose limit is below the agent's is found
  after a few refusals.

A caller with a deadline is told at once when its start time would come too late (RateLimited),
so it can fall back (the live path queues the item) rather than wait in vain.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from router.clock import Clock
from router.errors import RateLimited

__all__ = ["PACING_REASONS", "RequestPacer"]

PACING_REASONS = ("rate", "retry_after")
"""Why a call waited: the agent's own rate, or the cloud's Retry-After."""
_SLOWEST = 1 / 64
"""Halving never takes the rate below this share of the configured one."""


class RequestPacer:
    """Use from one event loop. `rate_per_s` None or 0: no rate of its own, only Retry-After."""

    def __init__(
        self,
        rate_per_s: float | None,
        burst: int,
        clock: Clock,
        *,
        recovery_s: float = 60.0,
        on_wait: Callable[[str, float], None] | None = None,
    ) -> None:
        """`on_wait(reason, seconds)` is told of every wait (metrics)."""
        if rate_per_s is not None and not (math.isfinite(rate_per_s) and rate_per_s >= 0):
            raise ValueError(f"rate_per_s: must be a number >= 0 (0: no limit), got {rate_per_s!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst: must be an integer >= 1, got {burst!r}")
        if not (math.isfinite(recovery_s) and recovery_s > 0):
            raise ValueError(f"recovery_s: must be a number > 0, got {recovery_s!r}")
        self.rate_per_s = rate_per_s or None
        self.burst = burst
        self.recovery_s = recovery_s
        self.on_wait = on_wait
        self._clock = clock
        self._next = -math.inf  # the theoretical time of the next call at the rate (GCRA's TAT)
        self._hold_until = -math.inf
        self._share = 1.0  # of the configured rate, after halvings
        self._halved_at = -math.inf

    @property
    def current_rate_per_s(self) -> float | None:
        """The rate now, after halvings and their recovery; None: no rate of its own."""
        if self.rate_per_s is None:
            return None
        grown = (self._clock.monotonic() - self._halved_at) / self.recovery_s
        return self.rate_per_s * min(1.0, self._share + grown)

    def hold(self, seconds: float, *, rate_limited: bool) -> None:
        """The cloud asked for `seconds` of quiet (Retry-After); `rate_limited`: it was a 429,
        so the rate is halved too."""
        now = self._clock.monotonic()
        # Once per refusal: the calls in flight when the first 429 came get theirs too.
        if rate_limited and self.rate_per_s is not None and now >= self._hold_until:
            rate = self.current_rate_per_s or self.rate_per_s
            self._share = max(_SLOWEST, rate / self.rate_per_s / 2)
            self._halved_at = now
        until = now + max(0.0, seconds)
        self._hold_until = max(self._hold_until, until)
        # Resume at the rate after the hold: no saved-up burst.
        self._next = max(self._next, until + self._tolerance())

    async def acquire(self, latest: float | None = None) -> float:
        """Wait until a call may start; the seconds waited. Raises RateLimited, without
        waiting, when it could not start by `latest` (a `clock.monotonic()` time)."""
        waited = 0.0
        while True:
            now = self._clock.monotonic()
            start = max(now, self._hold_until, self._next - self._tolerance())
            if latest is not None and start > latest:
                raise RateLimited(start - now)
            rate = self.current_rate_per_s
            if rate is not None:
                self._next = max(self._next, start) + 1.0 / rate
            if start <= now:
                return waited
            reason = "retry_after" if self._hold_until >= start else "rate"
            await self._clock.sleep(start - now)
            waited += start - now
            if self.on_wait is not None:
                self.on_wait(reason, start - now)
            if self._hold_until <= self._clock.monotonic():
                return waited
            # A Retry-After came while this call waited: it waits for a new start time.

    def _tolerance(self) -> float:
        """How far ahead of the rate a call may start: the burst, at the current rate."""
        rate = self.current_rate_per_s
        return 0.0 if rate is None else (self.burst - 1) / rate
