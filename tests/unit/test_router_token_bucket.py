"""TokenBucket on a fake clock: bursts, waits before sending, debts, estimates settled, FIFO order."""

from __future__ import annotations

import asyncio
import random

import pytest

from router.clock import FakeClock
from router.forwarder import TokenBucket


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_a_full_bucket_lets_a_burst_go_then_paces_at_the_rate(clock: FakeClock) -> None:
    bucket = TokenBucket(1000, 500, clock)
    assert await bucket.take(500) == 0
    assert await bucket.take(500) == pytest.approx(0.5)
    assert await bucket.take(200) == pytest.approx(0.2)
    assert clock.monotonic() - 1_000_000.0 == pytest.approx(0.7)


async def test_idle_time_refills_only_up_to_the_burst(clock: FakeClock) -> None:
    bucket = TokenBucket(1000, 500, clock)
    await bucket.take(500)
    clock.advance(60)  # a long idle spell saves no more than the burst
    assert bucket.tokens == pytest.approx(500)
    assert await bucket.take(500) == 0
    assert await bucket.take(100) == pytest.approx(0.1)


async def test_a_call_bigger_than_the_burst_goes_and_the_next_pays_for_it(
    clock: FakeClock,
) -> None:
    bucket = TokenBucket(1000, 500, clock)
    assert await bucket.take(2000) == 0  # waits for a full bucket at most, never forever
    assert bucket.tokens == pytest.approx(-1500)
    assert await bucket.take(100) == pytest.approx(1.6)


async def test_settling_charges_or_refunds_the_gap_to_the_estimate(clock: FakeClock) -> None:
    bucket = TokenBucket(1000, 1000, clock)
    await bucket.take(1000)
    bucket.settle(estimated=1000, actual=1300)  # the call sent more than estimated
    assert await bucket.take(100) == pytest.approx(0.4)
    bucket.settle(estimated=100, actual=0)  # nothing was sent after all
    assert bucket.tokens == pytest.approx(100)
    assert bucket.taken == 1300


async def test_over_a_long_run_bytes_stay_within_rate_times_time_plus_burst(
    clock: FakeClock,
) -> None:
    rate, burst = 4000.0, 1000.0
    bucket = TokenBucket(rate, burst, clock)
    rng = random.Random(7)
    start = clock.monotonic()
    sizes = [rng.randint(50, 3000) for _ in range(300)]
    for n in sizes:
        await bucket.take(n)
    elapsed = clock.monotonic() - start
    total = sum(sizes)
    assert total <= rate * elapsed + burst + max(sizes)
    # and it does not hold back more than needed: the last call went as soon as it could
    assert elapsed <= (total - burst) / rate + 0.01


async def test_waiters_are_served_in_arrival_order(clock: FakeClock) -> None:
    bucket = TokenBucket(100, 100, clock)
    await bucket.take(100)
    done: list[int] = []

    async def take(i: int) -> None:
        await bucket.take(50)
        done.append(i)

    await asyncio.gather(*(take(i) for i in range(6)))
    assert done == list(range(6))
    assert clock.monotonic() - 1_000_000.0 == pytest.approx(3.0)


@pytest.mark.parametrize(("rate", "burst", "field"), [(0, 10, "rate"), (10, -1, "burst")])
def test_bad_arguments_name_the_field(
    clock: FakeClock, rate: float, burst: float, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        TokenBucket(rate, burst, clock)


async def test_a_negative_take_is_refused(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="n: must be >= 0"):
        await TokenBucket(10, 10, clock).take(-1)
