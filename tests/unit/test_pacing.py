"""RequestPacer on a fake clock: the rate and its burst, Retry-After held by every call, halving
on 429 and growing back, and callers told at once when their turn comes past their deadline."""

from __future__ import annotations

import asyncio

import pytest

from router.clock import FakeClock
from router.errors import RateLimited
from router.pacing import RequestPacer


class Clock(FakeClock):
    """Sleeps end when `advance` takes the clock past them (several tasks sleep at once here,
    so a sleep must not move the clock itself, as FakeClock's does)."""

    def __init__(self) -> None:
        super().__init__()
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        woken = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.monotonic() + seconds, woken))
        await woken

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        for when, woken in list(self._sleepers):
            if when <= self.monotonic() + 1e-9:
                self._sleepers.remove((when, woken))
                if not woken.done():
                    woken.set_result(None)


async def start_times(pacer: RequestPacer, clock: FakeClock, n: int) -> list[float]:
    """When each of `n` calls asked at once may start, by driving the clock forward."""
    t0 = clock.monotonic()
    starts: list[float] = []

    async def one() -> None:
        await pacer.acquire()
        starts.append(round(clock.monotonic() - t0, 6))

    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    while not all(t.done() for t in tasks):
        await asyncio.sleep(0)
        clock.advance(0.001)
    return sorted(starts)


async def test_a_burst_at_once_then_the_rate() -> None:
    clock = Clock()
    waits: list[tuple[str, float]] = []
    pacer = RequestPacer(10.0, 3, clock, on_wait=lambda r, s: waits.append((r, s)))
    starts = await start_times(pacer, clock, 6)
    assert starts[:3] == [0.0, 0.0, 0.0]
    assert starts[3:] == pytest.approx([0.1, 0.2, 0.3], abs=0.002)
    assert [r for r, _ in waits] == ["rate"] * 3


async def test_retry_after_holds_every_call_then_they_resume_at_the_rate() -> None:
    clock = Clock()
    waits: list[tuple[str, float]] = []
    pacer = RequestPacer(10.0, 5, clock, on_wait=lambda r, s: waits.append((r, s)))
    pacer.hold(2.0, rate_limited=False)  # a 503 with Retry-After: 2
    starts = await start_times(pacer, clock, 3)
    # not the five of a burst at once when the hold ends: one, then the rate
    assert starts == pytest.approx([2.0, 2.1, 2.2], abs=0.002)
    assert waits[0][0] == "retry_after"


async def test_a_hold_that_comes_while_calls_wait_holds_them_too() -> None:
    clock = Clock()
    pacer = RequestPacer(1.0, 1, clock)
    await pacer.acquire()
    waiting = asyncio.ensure_future(pacer.acquire())  # its turn: in one second
    await asyncio.sleep(0)
    clock.advance(0.5)
    pacer.hold(3.0, rate_limited=False)
    while not waiting.done():
        await asyncio.sleep(0)
        clock.advance(0.01)
    assert clock.monotonic() - 1_000_000.0 >= 3.5


async def test_each_429_halves_the_rate_and_it_grows_back() -> None:
    clock = Clock()
    pacer = RequestPacer(40.0, 1, clock, recovery_s=60.0)
    pacer.hold(1.0, rate_limited=True)
    assert pacer.current_rate_per_s == 20.0
    pacer.hold(1.0, rate_limited=True)  # another call that was in flight: the same refusal
    assert pacer.current_rate_per_s == 20.0
    clock.advance(1.0)
    grown = 20.0 + 40.0 / 60  # a sixtieth of the configured rate back per second
    pacer.hold(1.0, rate_limited=True)  # refused again after the hold: halved again
    assert pacer.current_rate_per_s == pytest.approx(grown / 2)
    clock.advance(30.0)  # half the recovery time: half of the configured rate more
    assert pacer.current_rate_per_s == pytest.approx(grown / 2 + 20.0)
    clock.advance(30.0)
    assert pacer.current_rate_per_s == 40.0
    for _ in range(20):
        pacer.hold(0.0, rate_limited=True)
        clock.advance(0.001)
    assert pacer.current_rate_per_s == pytest.approx(40.0 / 64, abs=0.05)  # a floor, not zero


async def test_a_caller_whose_turn_comes_past_its_deadline_is_told_at_once() -> None:
    clock = Clock()
    pacer = RequestPacer(2.0, 1, clock)
    await pacer.acquire()
    now = clock.monotonic()
    with pytest.raises(RateLimited) as raised:
        await pacer.acquire(latest=now + 0.4)  # its turn: in half a second
    assert raised.value.retry_after == pytest.approx(0.5)
    assert clock.monotonic() == now  # it did not wait
    in_time = asyncio.ensure_future(pacer.acquire(latest=now + 0.6))
    while not in_time.done():
        await asyncio.sleep(0)
        clock.advance(0.01)
    assert in_time.result() == pytest.approx(0.5)


async def test_without_a_rate_only_retry_after_holds_calls() -> None:
    clock = Clock()
    pacer = RequestPacer(0, 1, clock)
    assert pacer.current_rate_per_s is None
    assert await start_times(pacer, clock, 50) == [0.0] * 50
    pacer.hold(1.0, rate_limited=True)
    assert (await start_times(pacer, clock, 2))[0] == pytest.approx(1.0, abs=0.002)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rate_per_s": -1.0}, "rate_per_s"),
        ({"burst": 0}, "burst"),
        ({"recovery_s": 0}, "recovery"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict[str, float], field: str) -> None:
    args: dict[str, object] = {"rate_per_s": 1.0, "burst": 1, "clock": FakeClock(), **kwargs}
    with pytest.raises(ValueError, match=field):
        RequestPacer(**args)  # type: ignore[arg-type]
