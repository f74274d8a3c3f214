"""ConnectivityMonitor on a fake clock: link states, probe backoff, breaker, learning from calls."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable

import pytest

from router.breaker import BreakerState
from router.clock import FakeClock, SystemClock
from router.connectivity import ConnectivityMonitor, MonitorConfig
from router.decision import LinkState, LinkView
from router.errors import BudgetExhausted
from router.retrying import LinkBackoff


class SteppingClock(FakeClock):
    """A fake clock whose sleeps advance at most `step` at a time and fire hooks on the way."""

    def __init__(self, step: float = 5.0) -> None:
        super().__init__()
        self.step = step
        self.hooks: list[tuple[float, Callable[[], None]]] = []

    def at(self, when: float, hook: Callable[[], None]) -> None:
        self.hooks.append((when, hook))

    async def sleep(self, seconds: float) -> None:
        await super().sleep(min(seconds, self.step))
        due = [h for h in self.hooks if h[0] <= self.monotonic()]
        self.hooks = [h for h in self.hooks if h[0] > self.monotonic()]
        for _, hook in due:
            hook()


class Cloud:
    """A scripted probe: answers from `answers` (the last one repeats), logs when it was asked."""

    def __init__(self, clock: FakeClock, answers: list[bool], stop_after: int = 1000) -> None:
        self.clock = clock
        self.answers = answers
        self.stop_after = stop_after
        self.times: list[float] = []
        self.monitor: ConnectivityMonitor | None = None

    async def __call__(self) -> bool:
        self.times.append(self.clock.monotonic())
        if len(self.times) >= self.stop_after and self.monitor is not None:
            self.monitor.stop()
        return self.answers[min(len(self.times), len(self.answers)) - 1]


def monitor_for(cloud: Cloud, **config: float) -> ConnectivityMonitor:
    monitor = ConnectivityMonitor(
        cloud,
        clock=cloud.clock,
        config=MonitorConfig(**config),  # type: ignore[arg-type]
        backoff=LinkBackoff(rng=random.Random(5)),
    )
    cloud.monitor = monitor
    return monitor


async def test_starts_down_and_comes_up_with_the_first_probe() -> None:
    clock = FakeClock()
    cloud = Cloud(clock, [True], stop_after=1)
    monitor = monitor_for(cloud)
    seen: list[LinkState] = []
    monitor.add_listener(seen.append)
    assert monitor.state is LinkState.DOWN
    await asyncio.wait_for(monitor.run(), 5)
    assert cloud.times == [clock.monotonic()]  # probed at once, no waiting
    assert monitor.state is LinkState.UP
    assert seen == [LinkState.UP]
    await asyncio.wait_for(monitor.wait_up(), 1)


async def test_probes_back_off_while_down_and_the_breaker_opens() -> None:
    clock = FakeClock()
    cloud = Cloud(clock, [False], stop_after=16)
    monitor = monitor_for(cloud)
    await asyncio.wait_for(monitor.run(), 5)
    gaps = [b - a for a, b in zip(cloud.times, cloud.times[1:], strict=False)]
    assert len(gaps) == 15
    backoff = LinkBackoff()
    for n, gap in enumerate(gaps, start=1):
        low, high = backoff.bounds(n)
        assert low - 1e-9 <= gap <= high + 1e-9, (n, gap)
    assert max(gaps) <= 120.0
    assert gaps[-1] >= 96.0  # reached the cap: 1.6**14 > 120
    assert monitor.state is LinkState.DOWN
    snap = monitor.snapshot()
    assert snap.breaker_open
    assert snap.consecutive_failures == 16
    assert snap.since_success_s is None


async def test_recovery_goes_degraded_then_up() -> None:
    clock = SteppingClock(step=200.0)
    cloud = Cloud(clock, [False, False, False, False, True], stop_after=5)
    monitor = monitor_for(cloud, recent_window_s=60.0)
    seen: list[LinkState] = []
    monitor.add_listener(seen.append)
    await asyncio.wait_for(monitor.run(), 5)
    assert monitor.breaker.state is BreakerState.CLOSED
    assert monitor.state is LinkState.DEGRADED  # failures within the last minute
    clock.advance(61.0)
    monitor.record_success(rtt_s=0.05, bytes_transferred=1000, seconds=0.1)
    assert monitor.state is LinkState.UP
    assert seen == [LinkState.DEGRADED, LinkState.UP]


async def test_up_link_probes_on_interval_and_real_calls_postpone_probes() -> None:
    clock = SteppingClock(step=5.0)
    t0 = clock.monotonic()
    cloud = Cloud(clock, [True], stop_after=3)
    monitor = monitor_for(cloud, probe_interval_s=30.0)
    clock.at(t0 + 20, lambda: monitor.record_success(0.1, 500, 0.2))
    await asyncio.wait_for(monitor.run(), 5)
    assert [t - t0 for t in cloud.times] == pytest.approx([0.0, 50.0, 80.0])


async def test_failing_real_calls_trip_the_breaker_and_take_the_link_down() -> None:
    clock = FakeClock()
    monitor = monitor_for(Cloud(clock, [True]))
    monitor.record_success(0.1, 100, 0.1)
    seen: list[LinkState] = []
    monitor.add_listener(seen.append)
    for _ in range(3):
        assert monitor.allow_call()
        monitor.record_failure("timeout")
    assert monitor.state is LinkState.DOWN
    assert not monitor.allow_call()
    assert seen == [LinkState.DEGRADED, LinkState.DOWN]
    waiter = asyncio.ensure_future(monitor.wait_up())
    await asyncio.sleep(0)
    assert not waiter.done()
    clock.advance(monitor.breaker.retry_in())
    assert monitor.allow_call()  # the one half-open probe
    assert not monitor.allow_call()
    monitor.record_success(0.1, 100, 0.1)
    await asyncio.wait_for(waiter, 1)
    assert seen[-1] is LinkState.DEGRADED


async def test_probe_skips_when_a_real_call_holds_the_half_open_slot() -> None:
    clock = FakeClock()
    cloud = Cloud(clock, [True])
    monitor = monitor_for(cloud)
    for _ in range(3):
        monitor.record_failure("network_error")
    clock.advance(monitor.breaker.retry_in())
    assert monitor.allow_call()  # a real call takes the probe slot
    assert await monitor.probe() is False
    assert cloud.times == []  # nothing was sent
    monitor.record_neutral(0.2)  # that call ended without a verdict (a 4xx)
    assert await monitor.probe() is True
    assert monitor.breaker.state is BreakerState.CLOSED


async def test_learns_latency_goodput_and_rtt_from_calls() -> None:
    clock = FakeClock()
    monitor = monitor_for(Cloud(clock, [True]), rtt_alpha=0.5)
    for seconds in [0.1 * i for i in range(1, 11)]:  # 0.1 .. 1.0 s
        monitor.record_success(rtt_s=0.2, bytes_transferred=int(1000 * seconds), seconds=seconds)
    monitor.record_success(rtt_s=0.4, bytes_transferred=0, seconds=1.0)
    snap = monitor.snapshot()
    assert snap.state is LinkState.UP
    assert snap.expected_latency_s == pytest.approx(1.0)  # p90 of 11 samples
    assert snap.rtt_s == pytest.approx(0.3)  # 0.5 * 0.4 + 0.5 * 0.2
    assert snap.goodput_bytes_per_s == pytest.approx(5500 / 6.5)
    assert snap.since_success_s == 0.0
    assert monitor.view() == LinkView(
        LinkState.UP, False, snap.expected_latency_s, snap.goodput_bytes_per_s
    )
    clock.advance(121.0)  # old transfers fall out of the goodput window
    assert monitor.snapshot().goodput_bytes_per_s is None


async def test_high_rtt_makes_the_link_degraded() -> None:
    clock = FakeClock()
    monitor = monitor_for(Cloud(clock, [True]), degraded_rtt_s=1.0)
    monitor.record_success(rtt_s=0.5, bytes_transferred=10, seconds=0.5)
    assert monitor.state is LinkState.UP
    monitor.record_success(rtt_s=3.0, bytes_transferred=10, seconds=3.0)
    assert monitor.state is LinkState.DEGRADED


async def test_a_probe_that_raises_or_hangs_counts_as_a_failure() -> None:
    async def raising() -> bool:
        raise ConnectionError("refused")

    async def hanging() -> bool:
        await asyncio.Event().wait()
        return True

    for probe in (raising, hanging):
        monitor = ConnectivityMonitor(probe, config=MonitorConfig(probe_timeout_s=0.05))
        assert await asyncio.wait_for(monitor.probe(), 2) is False
        assert monitor.breaker.consecutive_failures == 1


async def test_stop_wakes_a_long_sleep() -> None:
    probed = asyncio.Event()

    async def down() -> bool:
        probed.set()
        return False

    monitor = ConnectivityMonitor(down, clock=SystemClock())
    task = asyncio.ensure_future(monitor.run())
    await asyncio.wait_for(probed.wait(), 2)
    await asyncio.sleep(0)  # let the failure be recorded and the next sleep begin
    monitor.stop()  # the monitor now sleeps about a second before its next probe
    await asyncio.wait_for(task, 0.5)
    assert monitor.breaker.consecutive_failures == 1


async def test_a_broken_listener_does_not_blind_the_others() -> None:
    clock = FakeClock()
    monitor = monitor_for(Cloud(clock, [True]))
    seen: list[LinkState] = []

    def broken(state: LinkState) -> None:
        raise RuntimeError("listener bug")

    monitor.add_listener(broken)
    unsubscribe = monitor.add_listener(seen.append)
    monitor.record_success(0.1, 1, 0.1)
    unsubscribe()
    for _ in range(3):
        monitor.record_failure("timeout")
    assert seen == [LinkState.UP]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"probe_interval_s": 0}, "probe_interval_s"),
        ({"rtt_alpha": 1.5}, "rtt_alpha"),
        ({"latency_quantile": 0}, "latency_quantile"),
        ({"latency_samples": 0}, "latency_samples"),
    ],
)
def test_bad_config_names_the_field(changes: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MonitorConfig(**changes)  # type: ignore[arg-type]


# -- items waiting for a down link; the data budget's say ---------------------------------------


async def test_while_items_wait_a_down_link_is_probed_at_least_every_ten_seconds() -> None:
    clock = SteppingClock(step=1.0)
    cloud = Cloud(clock, [False], stop_after=40)
    monitor = monitor_for(cloud)  # the production defaults: backoff capped at 120 s
    cap = MonitorConfig().recovery_probe_cap_s
    # Down long enough to reach the cap, then items come: the open breaker's two-minute
    # cool-down is cut short, and every later wait is at most recovery_probe_cap_s.
    items_at = clock.monotonic() + 600
    clock.at(items_at, lambda: monitor.set_waiting(True))
    await asyncio.wait_for(monitor.run(), 5)
    before = [t for t in cloud.times if t < items_at]
    after = [t for t in cloud.times if t >= items_at]
    assert max(b - a for a, b in itertools.pairwise(before)) >= 96.0
    assert after[0] - items_at <= cap + clock.step  # the hook fires within a step
    assert max(b - a for a, b in itertools.pairwise(after)) <= cap


async def test_the_budget_holds_probes_back_unless_items_wait_for_a_down_link() -> None:
    asked: list[bool] = []
    clock = FakeClock()
    allowed_at = clock.monotonic() + 500.0

    def wait(urgent: bool) -> float:
        asked.append(urgent)
        return 0.0 if urgent else max(0.0, allowed_at - clock.monotonic())

    for waiting, first_probe_after in ((True, 0.0), (False, 500.0)):
        cloud = Cloud(clock, [False], stop_after=1)
        monitor = ConnectivityMonitor(cloud, clock=clock, probe_wait=wait)
        cloud.monitor = monitor
        monitor.set_waiting(waiting)
        start = clock.monotonic()
        await asyncio.wait_for(monitor.run(), 5)
        assert cloud.times[0] - start == pytest.approx(first_probe_after)
    assert set(asked) == {False, True}


async def test_a_probe_the_budget_refuses_says_nothing_of_the_link() -> None:
    clock = FakeClock()
    calls: list[float] = []
    monitor: ConnectivityMonitor | None = None

    async def refused() -> bool:
        calls.append(clock.monotonic())
        if len(calls) == 2 and monitor is not None:
            monitor.stop()
        raise BudgetExhausted("day", 1000, 1000)

    monitor = ConnectivityMonitor(refused, clock=clock, config=MonitorConfig(probe_interval_s=30))
    monitor.record_success(0.1, 100, 0.1)
    await asyncio.wait_for(monitor.run(), 5)
    assert calls[1] - calls[0] == pytest.approx(30.0)  # asked again an interval later
    assert monitor.breaker.consecutive_failures == 0
    assert monitor.state is LinkState.UP
