"""Body limits enforced while reading, gzip bombs defused, per-device token buckets."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterable

import pytest

from cloud_gateway.errors import DeviceBusy, Overloaded, RateLimited, UnsupportedEncoding
from cloud_gateway.limits import BodyLimits, InFlight, RateLimiter, read_body
from model_runtime import InvalidInput, RequestTooLarge

LIMITS = BodyLimits(max_body_bytes=10_000, max_decompressed_bytes=50_000)


class Chunks:
    """An upload arriving in chunks; counts how many the reader pulled."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = list(chunks)
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            self.pulled += 1
            yield chunk


async def read(
    chunks: Chunks, *, length: str | None = None, encoding: str | None = None
) -> tuple[bytes, int]:
    return await read_body(
        chunks.__aiter__(), content_length=length, content_encoding=encoding, limits=LIMITS
    )


async def test_a_body_within_the_limit_is_returned_whole() -> None:
    body, wire = await read(Chunks([b"a" * 4000, b"b" * 4000]), length="8000")
    assert body == b"a" * 4000 + b"b" * 4000
    assert wire == 8000


async def test_a_declared_oversize_body_is_refused_before_reading() -> None:
    chunks = Chunks([b"x" * 100])
    with pytest.raises(RequestTooLarge) as err:
        await read(chunks, length="10001")
    assert chunks.pulled == 0
    assert err.value.limit_bytes == 10_000


async def test_a_streamed_oversize_body_is_cut_off_at_the_limit() -> None:
    chunks = Chunks([b"x" * 4000] * 100)
    with pytest.raises(RequestTooLarge):
        await read(chunks)
    assert chunks.pulled == 3  # 12,000 bytes in: the third chunk crossed the limit


async def test_gzip_bodies_are_inflated() -> None:
    raw = b'{"inputs": []}' * 1000
    packed = gzip.compress(raw)
    body, wire = await read(Chunks([packed[:100], packed[100:]]), encoding="gzip")
    assert body == raw
    assert wire == len(packed)


async def test_a_gzip_bomb_is_refused_without_inflating_it() -> None:
    # 200 MB of zeros in about 200 kB: far under the wire limit once allowed, far over the
    # decompressed one.
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    bomb = b"".join(compressor.compress(block) for _ in range(200)) + compressor.flush()
    limits = BodyLimits(max_body_bytes=len(bomb) + 1, max_decompressed_bytes=1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(RequestTooLarge) as err:
            await read_body(
                Chunks([bomb]).__aiter__(),
                content_length=None,
                content_encoding="gzip",
                limits=limits,
            )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.size_bytes == (1 << 20) + 1
    assert peak < 8 << 20  # a few MB, not 200


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"not gzip at all", "not valid gzip"),
        (gzip.compress(b"hello")[:-4], "truncated"),
        (gzip.compress(b"hello") + b"junk", "after the end"),
    ],
)
async def test_broken_gzip_is_a_client_error(data: bytes, words: str) -> None:
    with pytest.raises(InvalidInput) as err:
        await read(Chunks([data]), encoding="gzip")
    assert err.value.field == "body"
    assert words in err.value.problem


async def test_other_encodings_and_bad_lengths_are_refused() -> None:
    with pytest.raises(UnsupportedEncoding):
        await read(Chunks([b"x"]), encoding="br")
    with pytest.raises(InvalidInput) as err:
        await read(Chunks([b"x"]), length="ten")
    assert err.value.field == "Content-Length"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=2.0, burst=3, monotonic=clock)
    for _ in range(3):
        limiter.check("clinic-1")
    with pytest.raises(RateLimited) as err:
        limiter.check("clinic-1")
    assert err.value.retry_after_s == pytest.approx(0.5)
    limiter.check("clinic-2")  # buckets are per device
    clock.now += 0.5
    limiter.check("clinic-1")
    with pytest.raises(RateLimited):
        limiter.check("clinic-1")
    clock.now += 100
    for _ in range(3):  # refills up to the burst, not beyond
        limiter.check("clinic-1")
    with pytest.raises(RateLimited):
        limiter.check("clinic-1")


def test_requests_in_flight_are_held_per_device_and_in_total() -> None:
    in_flight = InFlight(per_device=2, total=3)
    with in_flight.hold("a"), in_flight.hold("a"):
        with pytest.raises(DeviceBusy), in_flight.hold("a"):
            pass
        with in_flight.hold("b"):
            with pytest.raises(Overloaded), in_flight.hold("c"):
                pass
            assert in_flight.count == 3
    assert in_flight.count == 0
    with in_flight.hold("a"), in_flight.hold("a"):  # freed, even after refusals
        pass


async def test_a_plain_body_is_held_to_the_decompressed_limit_too() -> None:
    # What is parsed is bounded whatever the encoding: a plain body is its own inflated form.
    limits = BodyLimits(max_body_bytes=10_000, max_decompressed_bytes=5_000)
    with pytest.raises(RequestTooLarge) as err:
        await read_body(
            Chunks([b"x" * 4000] * 2).__aiter__(),
            content_length=None,
            content_encoding=None,
            limits=limits,
        )
    assert err.value.limit_bytes == 5_000
