"""The data budget is exact: every byte the router sends to or gets from the cloud, probes
included, is counted in the budget and the byte metrics, the budget is never overspent, and
probing slows, then stops, as the budget runs out. Over a simulated day (a clock the test moves
on) behind the counting proxy, with the real gateway behind it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from router import CallerWishes, Escalation, Reason, Route, Router, RouterConfig
from router.budget import BudgetPeriod
from router.cloud_client import ATTEMPT_OUTCOMES
from tests.integration.gateway.helpers import Gateway
from tests.integration.router.helpers import local_answer, metric, until
from tests.support.clock import JumpClock
from tests.support.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration

DAY_1 = datetime(2030, 3, 1, tzinfo=UTC).timestamp()
LIMIT = 8_500
"""Room for the day's probes and about seven of the items below, not for all twelve."""
STEP_S = 300.0


def wire_bytes(router: Router) -> float:
    """What the byte metrics say went to and came from the cloud, all paths."""
    return sum(
        metric(router, f"edge_agent_router_cloud_{way}_bytes_total", path=path)
        for way in ("sent", "received")
        for path in ("live", "drain", "probe")
    )


def probes(router: Router) -> float:
    """Probes sent (that reached the cloud or not), by the attempt metrics."""
    return sum(
        metric(router, "edge_agent_router_cloud_attempts_total", path="probe", outcome=outcome)
        for outcome in ATTEMPT_OUTCOMES
        if outcome != "budget"
    )


def used(router: Router) -> dict[str, int]:
    return {u.period.value: u.used_bytes for u in router.budget.usage()}


@pytest.fixture
async def day_router(
    gateway: Gateway, proxy: FaultProxy, tmp_path: Path
) -> AsyncIterator[tuple[Router, JumpClock]]:
    """A router with the production timings, a day budget, and a clock the test moves on."""
    clock = JumpClock(DAY_1 + 60)
    config = RouterConfig(
        cloud_url=proxy.url,
        device_key=gateway.key,
        state_dir=tmp_path / "state",
        budget_day_bytes=LIMIT,
        # LIMIT is sized for today's framing, one request per item; groups are
        # test_router_groups.py's.
        drain_group_items=1,
    )
    router = await Router.open(config, CollectorRegistry(), clock=clock)
    try:
        yield router, clock
    finally:
        await router.close()


async def quiet(router: Router) -> None:
    """Let woken tasks start their exchanges, then wait until none is in flight (each holds a
    reservation while it is), so a jump of the clock never lands inside one."""
    await asyncio.sleep(0.02)
    await until(lambda: router.budget.reserved_bytes == 0, what="the exchanges in flight to end")


async def test_budget_used_is_the_bytes_on_the_wire_over_a_day_and_its_rollover(
    day_router: tuple[Router, JumpClock],
    proxy: FaultProxy,
    pixels: np.ndarray,
    caplog: pytest.LogCaptureFixture,
) -> None:
    router, clock = day_router
    assert router.monitor is not None
    await until(lambda: metric(router, "edge_agent_router_cloud_attempts_total", path="probe",
                               outcome="ok") == 1, what="the first probe")  # fmt: skip
    await quiet(router)

    # Four asked live, eight queued for the forwarder (no time for the cloud): a day's items.
    tickets: list[str] = []
    for i in range(12):
        answer = await router.route(
            model="digits",
            inputs={"X": pixels[i : i + 1]},
            local=local_answer([0.1]),
            wishes=CallerWishes(escalation=Escalation.ALWAYS, ttl_seconds=3 * 86400),
            time_left_s=None if i < 4 else 0.001,
            request_id=f"day-{i}",
        )
        (item,) = answer.items
        if item.ticket is not None:
            tickets.append(item.ticket)
        # Queued: no time for the cloud, or the day's budget already held by the deliveries
        # under way (or a live call that a very busy machine let time out): all count alike.
        assert item.reason in (Reason.ESCALATION_ALWAYS, Reason.DEADLINE_TOO_SHORT,
                               Reason.BUDGET_EXHAUSTED, Reason.CLOUD_FAILED)  # fmt: skip
        assert (item.route is Route.CLOUD) == (item.reason is Reason.ESCALATION_ALWAYS)
    await quiet(router)
    assert len(tickets) >= 8

    def delivered() -> int:
        return int(metric(router, "edge_agent_router_queue_ended_items_total", state="delivered"))

    # The rest of the first day, five minutes at a time: never over the limit.
    probes_before = probes(router)
    while clock.wall() + STEP_S < DAY_1 + 86400:
        clock.jump(STEP_S)
        await quiet(router)
        assert used(router)["day"] <= LIMIT
    day_1 = used(router)["day"]
    held = len(tickets) - delivered()
    assert held > 0, "the day's budget was meant to hold some items back"
    assert day_1 > LIMIT - 1_500  # ... and they are held because it is nearly spent
    # as the budget ran low (said at the first probe, which may come while the fixture starts)
    said = caplog.text + "".join(r.getMessage() for r in caplog.get_records("setup"))
    assert "link probes slowed to one per" in said
    assert "the day data budget is spent" in caplog.text
    assert "link probes stop until 2030-03-02 00:00 UTC" in caplog.text
    # at the usual 30 s, a quiet link is probed 2,880 times a day; within 10 % of what is left
    probes_day_1 = probes(router)
    assert probes_day_1 - probes_before <= 4
    assert (await router.status()).depth_by_priority[5] == held

    # Past midnight UTC: the new day's budget releases the held items.
    while delivered() < len(tickets):
        assert clock.wall() < DAY_1 + 86400 + 3600, "the held items were not released"
        clock.jump(STEP_S)
        await quiet(router)
    assert datetime.fromtimestamp(clock.wall(), UTC).day == 2
    await quiet(router)

    usage = {(u.period, u.key): u.used_bytes for u in router.budget.usage()}
    day_2 = usage[BudgetPeriod.DAY, "2030-03-02"]
    assert 0 < day_2 <= LIMIT
    month = usage[BudgetPeriod.MONTH, "2030-03"]
    assert month == day_1 + day_2
    # To the byte: what the budget counted is what crossed the proxy, both ways.
    await until(
        lambda: proxy.bytes_to_target + proxy.bytes_to_client == month,
        what=f"the proxy to have carried {month} bytes",
    )
    assert wire_bytes(router) == month
