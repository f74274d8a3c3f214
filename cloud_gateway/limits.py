"""What a device may send: body size on the wire and after gzip, requests per second, and
requests in flight at once, per device and per worker.

Bodies are read within their limits by model_runtime.http_body (shared with the edge agent's
REST API), re-exported here; a body's size bounds the time its JSON takes to parse.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from cloud_gateway.errors import DeviceBusy, Overloaded, RateLimited
from model_runtime.http_body import BodyLimits, read_body

__all__ = ["BodyLimits", "InFlight", "RateLimiter", "read_body"]


class RateLimiter:
    """Token bucket per device: `burst` at once, then `rate_per_s` sustained.

    Each worker process keeps its own buckets: a device on one keep-alive connection meets
    exactly this limit; one spread over W workers could reach up to W times it. This is the
    limiter of SQLite mode; with Redis the gateway shares one bucket (rate_limit.py).
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._monotonic = monotonic
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, device: str) -> None:
        """Take one token for `device`, or raise RateLimited with the wait until the next."""
        now = self._monotonic()
        tokens, stamp = self._buckets.get(device, (self._burst, now))
        tokens = min(self._burst, tokens + (now - stamp) * self._rate)
        if tokens < 1.0:
            self._buckets[device] = (tokens, now)
            raise RateLimited(math.ceil((1.0 - tokens) / self._rate * 1000) / 1000)
        self._buckets[device] = (tokens - 1.0, now)

    async def acquire(self, device: str) -> None:
        """`check`, as the gateway's routes call every limiter (rate_limit.DeviceRateLimiter)."""
        self.check(device)


class InFlight:
    """Counts the requests being worked on, per device and in this worker, and refuses one
    more past either limit: a device waits for its own answers (429), the rest retry (503).

    Per worker process, like RateLimiter: only the event loop's thread touches it.
    """

    def __init__(self, per_device: int, total: int) -> None:
        self.per_device = per_device
        self.total = total
        self._devices: dict[str, int] = {}
        self._total = 0

    def hold(self, device: str) -> _Held:
        """`with in_flight.hold(device):` counts the request while the block runs; raises
        DeviceBusy or Overloaded when it would pass a limit."""
        return _Held(self, device)

    def _take(self, device: str) -> None:
        held = self._devices.get(device, 0)
        if held >= self.per_device:
            raise DeviceBusy(self.per_device)
        if self._total >= self.total:
            raise Overloaded(self.total)
        self._devices[device] = held + 1
        self._total += 1

    def _give_back(self, device: str) -> None:
        self._total -= 1
        left = self._devices[device] - 1
        if left:
            self._devices[device] = left
        else:
            del self._devices[device]  # idle devices leave nothing behind

    @property
    def count(self) -> int:
        return self._total


class _Held:
    # A class rather than a generator-based context manager: a third of its cost per request.
    __slots__ = ("_device", "_in_flight")

    def __init__(self, in_flight: InFlight, device: str) -> None:
        self._in_flight = in_flight
        self._device = device

    def __enter__(self) -> None:
        self._in_flight._take(self._device)

    def __exit__(self, *exc: object) -> None:
        self._in_flight._give_back(self._device)
