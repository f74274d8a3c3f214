"""The link goes away and comes back: requests are queued with tickets, the queue drains when the
link returns, watchers hear of every end, TTLs expire, and each request runs the model once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from router import (
    CallerWishes,
    LinkState,
    Reason,
    Route,
    RoutedItem,
    Router,
    TicketNotFound,
    TicketResult,
)
from tests.integration.gateway.helpers import Gateway
from tests.integration.router.conftest import RouterFactory
from tests.integration.router.helpers import (
    CLOUD_MODEL,
    cloud_model_answers,
    link_is,
    local_answer,
    metric,
    until,
)
from tests.support.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration


class Watcher:
    """Collects what `router.watch` yields, in a task of its own."""

    def __init__(self, router: Router, after: int = 0, tickets: tuple[str, ...] = ()) -> None:
        self.results: list[TicketResult] = []
        self._task = asyncio.ensure_future(self._run(router, after, tickets))

    async def _run(self, router: Router, after: int, tickets: tuple[str, ...]) -> None:
        async for result in router.watch(after, tickets):
            self.results.append(result)

    def by_ticket(self) -> dict[str, TicketResult]:
        return {r.ticket: r for r in self.results}

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def unsure(
    router: Router, x: np.ndarray, request_id: str, **wishes: object
) -> list[RoutedItem]:
    answer = await router.route(
        model="digits",
        inputs={"X": x},
        local=local_answer([0.1] * len(x)),
        wishes=CallerWishes(**wishes),  # type: ignore[arg-type]
        time_left_s=2.0,
        request_id=request_id,
    )
    return list(answer.items)


async def test_cut_link_queues_with_tickets_and_restored_link_delivers_them_once(
    make_router: RouterFactory, gateway: Gateway, proxy: FaultProxy, pixels: np.ndarray
) -> None:
    router = await make_router(live_timeout_s=60.0)
    await link_is(router, LinkState.UP, LinkState.DEGRADED)
    runs = gateway.metric("cloud_gateway_model_runs_total", model=CLOUD_MODEL)
    watcher = Watcher(router)
    proxy.cut()
    start = time.monotonic()
    first = await unsure(router, pixels[:1], "during-cut")
    assert time.monotonic() - start < 20  # a cut link fails fast, not at the 60 s limit
    # Whether the monitor noticed before this call or the call itself found out, it is queued.
    assert first[0].reason in (Reason.CLOUD_FAILED, Reason.LINK_DOWN, Reason.BREAKER_OPEN)
    await link_is(router, LinkState.DOWN)
    later = await unsure(router, pixels[1:4], "after-cut")
    assert {i.reason for i in later} == {Reason.LINK_DOWN}
    items = first + later
    assert all(i.route is Route.QUEUE and i.provisional and i.ticket for i in items)
    tickets = {i.ticket for i in items}
    assert len(tickets) == 4
    status = await router.status()
    assert status.link_state == "down"
    assert sum(status.depth_by_priority.values()) == 4
    assert status.oldest_age_s is not None
    assert metric(router, "edge_agent_router_link_state", state="down") == 1
    assert [(await router.result(t)).state for t in tickets if t] == ["pending"] * 4

    proxy.restore()
    await until(lambda: len(watcher.results) == 4, what="all four tickets to be delivered")
    await watcher.stop()
    assert set(watcher.by_ticket()) == tickets
    assert {r.state for r in watcher.results} == {"delivered"}
    cursors = [r.cursor for r in watcher.results]
    assert cursors == sorted(cursors)
    expected = cloud_model_answers(pixels[:4])
    for row, item in enumerate(items):
        assert item.ticket is not None
        delivered = watcher.by_ticket()[item.ticket]
        assert delivered.outputs["probabilities"].shape == (1, 10)
        np.testing.assert_allclose(
            delivered.outputs["probabilities"][0], expected["probabilities"][row], rtol=1e-6
        )
    assert gateway.metric("cloud_gateway_model_runs_total", model=CLOUD_MODEL) - runs == 4

    # A watcher that reconnects with the cursor it last saw gets only what ended after it.
    resumed = Watcher(router, after=cursors[1])
    await until(lambda: len(resumed.results) == 2, what="the resumed watcher to catch up")
    await resumed.stop()
    assert [r.cursor for r in resumed.results] == cursors[2:]
    status = await router.status()
    assert sum(status.depth_by_priority.values()) == 0
    assert status.ended["delivered"] == 4


async def test_ttl_expiry_ends_a_queued_request_while_the_link_is_down(
    make_router: RouterFactory, proxy: FaultProxy, pixels: np.ndarray
) -> None:
    proxy.cut()
    router = await make_router()
    (item,) = await unsure(router, pixels[:1], "short-lived", ttl_seconds=0.3)
    assert item.reason is Reason.LINK_DOWN
    assert item.ticket is not None
    watcher = Watcher(router, tickets=(item.ticket,))
    await until(lambda: len(watcher.results) == 1, what="the ticket to expire")
    await watcher.stop()
    (expired,) = watcher.results
    assert expired.state == "expired"
    assert expired.outputs == {}
    assert expired.finished_at is not None
    assert expired.finished_at - expired.enqueued_at >= 0.3
    assert metric(router, "edge_agent_router_queue_ended_items_total", state="expired") == 1
    proxy.restore()


async def test_items_wait_for_the_link_and_the_queue_survives_a_restart(
    make_router: RouterFactory,
    gateway: Gateway,
    proxy: FaultProxy,
    pixels: np.ndarray,
    tmp_path: Path,
) -> None:
    proxy.cut()
    state = tmp_path / "restart"
    router = await make_router(state_dir=state)
    items = await unsure(router, pixels[:3], "before-restart", priority=1)
    await router.close()
    proxy.restore()
    again = await make_router(state_dir=state)
    watcher = Watcher(again)
    await until(lambda: len(watcher.results) == 3, what="the reopened queue to drain")
    await watcher.stop()
    assert {r.ticket for r in watcher.results} == {i.ticket for i in items}
    assert {r.state for r in watcher.results} == {"delivered"}


async def test_ended_tickets_are_purged_after_their_retention(
    make_router: RouterFactory, proxy: FaultProxy, pixels: np.ndarray
) -> None:
    proxy.cut()
    router = await make_router(results_retention_s=0.3, purge_interval_s=0.05)
    (item,) = await unsure(router, pixels[:1], "forgotten", ttl_seconds=0.1)
    assert item.ticket is not None
    watcher = Watcher(router, tickets=(item.ticket,))
    await until(lambda: len(watcher.results) == 1, what="the ticket to expire")
    await watcher.stop()
    assert (await router.result(item.ticket)).state == "expired"

    async def purged() -> bool:
        try:
            await router.result(item.ticket or "")
        except TicketNotFound:
            return True
        return False

    deadline = time.monotonic() + 5
    while not await purged():
        assert time.monotonic() < deadline, "the ended ticket was never purged"
        await asyncio.sleep(0.02)
    assert (await router.status()).ended["expired"] == 1  # the count outlives the row
    proxy.restore()
