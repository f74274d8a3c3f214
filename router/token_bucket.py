"""TokenBucket: a byte-rate limiter, the forwarder's bandwidth cap (bandwidth_cap_bytes_per_s).
Each call is paid for before it is sent, and settled once its real size is known.
"""

from __future__ import annotations

import asyncio
import math

from router.clock import Clock

__all__ = ["TokenBucket"]


class TokenBucket:
    """A byte-rate limiter: `rate` bytes per second, at most `burst` saved up; FIFO.

    `take(n)` waits until the bucket holds min(n, burst) tokens and then removes n, so the
    balance may go below zero: a call bigger than the burst is paid for by the wait of the next.
    `settle` corrects an estimate once the real size is known. Over any long run the bytes
    taken stay within rate * seconds + burst.
    """

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate: must be a finite number of bytes per second > 0, got {rate!r}")
        if not (math.isfinite(burst) and burst > 0):
            raise ValueError(f"burst: must be a finite number of bytes > 0, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock.monotonic()
        self._lock = asyncio.Lock()
        self.taken = 0
        """Bytes taken so far (after settling), for tests and benchmarks."""

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    async def take(self, n: int) -> float:
        """Wait for room for `n` bytes, take them; return the seconds waited."""
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        waited = 0.0
        async with self._lock:
            while True:
                self._refill()
                need = min(float(n), self.burst)
                # A byte of slack: clocks far from zero lose sub-microsecond precision.
                if self._tokens >= need - 1.0:
                    self._tokens -= n
                    self.taken += n
                    return waited
                wait = (need - self._tokens) / self.rate
                await self._clock.sleep(wait)
                waited += wait

    def settle(self, estimated: int, actual: int) -> None:
        """The call sent `actual` bytes where `estimated` were taken: charge or refund the gap."""
        self._refill()
        self._tokens = min(self.burst, self._tokens - (actual - estimated))
        self.taken += actual - estimated

    def _refill(self) -> None:
        now = self._clock.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
