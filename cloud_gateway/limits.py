"""What a device may send: body size on the wire and after gzip, requests per second, and
requests in flight at once, per device and per worker.

Bodies are read chunk by chunk and refused the moment they pass the limit, so an oversized
upload costs at most the limit; gzip is inflated with a cap on its output, so a zip bomb costs
at most the decompressed limit. A body's size bounds the time its JSON takes to parse.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cloud_gateway.errors import DeviceBusy, Overloaded, RateLimited, UnsupportedEncoding
from model_runtime import InvalidInput, RequestTooLarge

__all__ = ["BodyLimits", "InFlight", "RateLimiter", "read_body"]

_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class BodyLimits:
    max_body_bytes: int
    max_decompressed_bytes: int


async def read_body(
    chunks: AsyncIterator[bytes],
    *,
    content_length: str | None,
    content_encoding: str | None,
    limits: BodyLimits,
) -> tuple[bytes, int]:
    """(decompressed body, bytes on the wire). Raises RequestTooLarge as soon as it knows."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip"):
        raise UnsupportedEncoding(encoding)
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise InvalidInput("Content-Length", "is not an integer") from None
        if declared > limits.max_body_bytes:
            # Refuse before reading a byte of it.
            raise RequestTooLarge(declared, limits.max_body_bytes)
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if encoding != "identity" else None
    parts: list[bytes] = []
    wire = 0
    size = 0
    async for chunk in chunks:
        wire += len(chunk)
        if wire > limits.max_body_bytes:
            raise RequestTooLarge(wire, limits.max_body_bytes)
        if inflater is None:
            parts.append(chunk)
            size = wire
            if size > limits.max_decompressed_bytes:  # the limit on what is parsed, for all
                raise RequestTooLarge(size, limits.max_decompressed_bytes)
        else:
            size = _inflate(inflater, chunk, parts, size, limits.max_decompressed_bytes)
    if inflater is not None:
        size = _inflate(inflater, b"", parts, size, limits.max_decompressed_bytes)
        if not inflater.eof:
            raise InvalidInput("body", "gzip stream is truncated")
    return b"".join(parts), wire


def _inflate(
    inflater: zlib._Decompress, data: bytes, parts: list[bytes], size: int, limit: int
) -> int:
    # Never ask zlib for more than one byte past the limit: that byte proves the overflow
    # without inflating the rest of a bomb.
    try:
        while True:
            out = inflater.decompress(data, limit - size + 1)
            size += len(out)
            if size > limit:
                raise RequestTooLarge(size, limit)
            parts.append(out)
            data = inflater.unconsumed_tail
            if not data or inflater.eof:
                break
    except zlib.error as exc:
        raise InvalidInput("body", f"is not valid gzip: {exc}") from None
    if inflater.eof and inflater.unused_data:
        raise InvalidInput("body", "has bytes after the end of the gzip stream")
    return size


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

    @contextmanager
    def hold(self, device: str) -> Iterator[None]:
        held = self._devices.get(device, 0)
        if held >= self.per_device:
            raise DeviceBusy(self.per_device)
        if self._total >= self.total:
            raise Overloaded(self.total)
        self._devices[device] = held + 1
        self._total += 1
        try:
            yield
        finally:
            self._total -= 1
            left = self._devices[device] - 1
            if left:
                self._devices[device] = left
            else:
                del self._devices[device]  # idle devices leave nothing behind

    @property
    def count(self) -> int:
        return self._total
