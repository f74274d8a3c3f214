"""The link comes back after a long outage while items wait: the router notices within a bounded
time and starts delivering, with the production timings, and probing a dead link costs no data
budget. Ten minutes of outage on a clock the test moves on, the real gateway behind the proxy."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from router import CallerWishes, LinkState, Reason, Route, Router, RouterConfig
from tests.integration.gateway.helpers import Gateway
from tests.integration.router.helpers import local_answer, metric, until
from tests.integration.router.test_router_budget import probes, wire_bytes
from tests.support.clock import JumpClock
from tests.support.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration

START = 1_900_000_000.0


async def settle(router: Router) -> None:
    """Let the tasks a jump woke start their exchanges, then wait for them to end (each holds a
    reservation of the data budget while in flight), so no jump lands inside one."""
    await asyncio.sleep(0.01)
    await until(lambda: router.budget.reserved_bytes == 0, what="the exchanges in flight to end")


async def run_for(router: Router, clock: JumpClock, seconds: float, step_s: float) -> None:
    end = clock.monotonic() + seconds
    while clock.monotonic() < end:
        clock.jump(step_s)
        await settle(router)


async def test_delivery_starts_within_15_s_of_the_link_returning_after_10_minutes_down(
    gateway: Gateway, proxy: FaultProxy, pixels: np.ndarray, tmp_path: Path
) -> None:
    clock = JumpClock(START)
    budget = 20_000
    config = RouterConfig(  # the production timings: only the budget is set
        cloud_url=proxy.url, device_key=gateway.key, state_dir=tmp_path, budget_day_bytes=budget
    )
    assert (config.monitor.recovery_probe_cap_s, config.link_backoff_cap_s) == (10.0, 120.0)
    router = await Router.open(config, CollectorRegistry(), clock=clock)
    try:
        assert router.monitor is not None
        monitor = router.monitor
        await until(lambda: monitor.state is LinkState.UP, what="the link to be up")
        await settle(router)

        proxy.refuse()  # the gateway's host is gone: connecting is refused
        # Three items, too pressed for a live call: the forwarder's deliveries find out.
        answer = await router.route(
            model="digits",
            inputs={"X": pixels[:3]},
            local=local_answer([0.1] * 3),
            wishes=CallerWishes(),
            time_left_s=0.001,
            request_id="outage",
        )
        assert {i.route for i in answer.items} == {Route.QUEUE}
        assert {i.reason for i in answer.items} == {Reason.DEADLINE_TOO_SHORT}
        await run_for(router, clock, 30, step_s=1.0)
        assert monitor.state is LinkState.DOWN
        used_before = router.budget.usage()[0].used_bytes
        probes_before = probes(router)

        step_s = 1.0
        await run_for(router, clock, 600, step_s)  # ten minutes down, items waiting
        # Probed all along, never more than 10 s apart (a probe falls due within a step of the
        # test's clock), and none of it cost a byte: a probe that cannot connect sends nothing.
        assert probes(router) - probes_before >= 600 / (
            config.monitor.recovery_probe_cap_s + step_s
        )
        assert router.budget.usage()[0].used_bytes == used_before
        assert metric(router, "edge_agent_router_queue_ended_items_total", state="delivered") == 0

        proxy.restore()
        back_at = clock.monotonic()
        while not metric(router, "edge_agent_router_queue_ended_items_total", state="delivered"):
            assert clock.monotonic() - back_at <= 15, "no delivery within 15 s of the link's return"
            clock.jump(0.5)
            await settle(router)
        assert monitor.state is not LinkState.DOWN
        await until(
            lambda: (
                metric(router, "edge_agent_router_queue_ended_items_total", state="delivered") == 3
            ),
            what="the three waiting items to be delivered",
        )
        await settle(router)
        used = router.budget.usage()[0].used_bytes
        assert used == wire_bytes(router) <= budget
    finally:
        await router.close()
