"""What limits the router: the queue's disk cap under both full policies, the data budget, the
cloud's rate limit (429 + Retry-After), and the cloud refusing a request or the device."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from model_runtime.v2_json import encode_infer_request
from router import (
    BudgetMode,
    CallerWishes,
    FullPolicy,
    LinkState,
    QueueFull,
    Reason,
    Route,
    RoutedItem,
    Router,
    TicketResult,
)
from router.cloud_client import encode_body
from router.durable_queue import ROW_OVERHEAD_BYTES
from tests.integration.gateway.helpers import Gateway, start_gateway
from tests.integration.router.conftest import RouterFactory
from tests.integration.router.helpers import (
    CLOUD_MODEL,
    fast_config,
    link_is,
    local_answer,
    metric,
    until,
)
from tests.support.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration

UP = (LinkState.UP, LinkState.DEGRADED)


def need(row: np.ndarray) -> int:
    """Bytes the queue accounts for one queued row (its one-row request with a uuid id)."""
    body = encode_body(encode_infer_request({"X": row[None, :]}, request_id=str(uuid.uuid4())))
    return len(body) + ROW_OVERHEAD_BYTES


async def route(
    router: Router, x: np.ndarray, *, confidence: float = 0.1, inputs: str = "X", **wishes: object
) -> list[RoutedItem]:
    answer = await router.route(
        model="digits",
        inputs={inputs: x},
        local=local_answer([confidence] * len(x)),
        wishes=CallerWishes(**wishes),  # type: ignore[arg-type]
        time_left_s=2.0,
        request_id="limits",
    )
    return list(answer.items)


async def collect(
    router: Router, tickets: set[str], within_s: float = 10.0
) -> dict[str, TicketResult]:
    got: dict[str, TicketResult] = {}

    async def watch() -> None:
        async for result in router.watch(0, tickets):
            got[result.ticket] = result

    task = asyncio.ensure_future(watch())
    try:
        await until(lambda: set(got) == tickets, within_s, f"tickets {tickets} to end")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return got


async def test_refuse_policy_refuses_a_whole_batch_that_does_not_fit(
    make_router: RouterFactory, proxy: FaultProxy, pixels: np.ndarray
) -> None:
    proxy.cut()
    x = np.repeat(pixels[:1], 4, axis=0)
    one = need(x[0])
    router = await make_router(queue_cap_bytes=3 * one + one // 2, full_policy=FullPolicy.REFUSE)
    first = await route(router, x[:2])
    assert [i.reason for i in first] == [Reason.LINK_DOWN] * 2
    # Room for one more item, not two: the two-item request is refused whole.
    with pytest.raises(QueueFull):
        await route(router, x[:2])
    status = await router.status()
    assert sum(status.depth_by_priority.values()) == 2
    assert metric(router, "edge_agent_router_queue_admission_rejected_items_total") == 2
    (third,) = await route(router, x[:1])
    assert third.ticket is not None
    with pytest.raises(QueueFull):
        await route(router, x[:1])
    assert sum((await router.status()).depth_by_priority.values()) == 3
    assert metric(router, "edge_agent_router_queue_enqueued_items_total") == 3


async def test_drop_policy_drops_the_oldest_lowest_and_never_fails_the_request(
    make_router: RouterFactory, proxy: FaultProxy, pixels: np.ndarray
) -> None:
    proxy.cut()
    x = np.repeat(pixels[:1], 4, axis=0)
    one = need(x[0])
    router = await make_router(
        queue_cap_bytes=2 * one + one // 2, full_policy=FullPolicy.DROP_OLDEST_LOWEST
    )
    (old,) = await route(router, x[:1], priority=7)
    (newer,) = await route(router, x[:1], priority=7)
    (urgent,) = await route(router, x[:1], priority=3)  # Triton's order: lower is more urgent
    assert urgent.route is Route.QUEUE
    assert urgent.ticket is not None
    assert old.ticket is not None
    ended = await collect(router, {old.ticket})
    assert ended[old.ticket].state == "dropped"
    assert newer.ticket is not None
    assert (await router.result(newer.ticket)).state == "pending"
    # Nothing of level 9 or less urgent to make room: answered at the edge, said so, no error.
    (refused,) = await route(router, x[:1], priority=9)
    assert (refused.route, refused.reason, refused.ticket) == (Route.EDGE, Reason.QUEUE_FULL, None)
    assert not refused.provisional
    assert metric(router, "edge_agent_router_queue_ended_items_total", state="dropped") == 1
    assert metric(router, "edge_agent_router_queue_admission_rejected_items_total") == 1


@pytest.mark.parametrize(
    ("mode", "route_taken"), [(BudgetMode.QUEUE, Route.QUEUE), (BudgetMode.EDGE, Route.EDGE)]
)
async def test_spent_budget_stops_escalation_and_the_forwarder(
    make_router: RouterFactory,
    gateway: Gateway,
    pixels: np.ndarray,
    mode: BudgetMode,
    route_taken: Route,
) -> None:
    # Room for the first probe (its request and an answer of up to 1 kB reserved), not for an
    # item's request and answer besides.
    limit = 1_500
    router = await make_router(budget_day_bytes=limit, budget_mode=mode)
    await link_is(router, *UP)
    runs = gateway.metric("cloud_gateway_model_runs_total", model=CLOUD_MODEL)
    (item,) = await route(router, pixels[:1])
    assert (item.route, item.reason) == (route_taken, Reason.BUDGET_EXHAUSTED)
    assert (item.ticket is not None) == (route_taken is Route.QUEUE)
    if item.ticket is not None:
        await until(
            lambda: metric(router, "edge_agent_router_forwarder_holds_total", reason="budget") > 0,
            what="the forwarder to hold for the budget",
        )
        assert (await router.result(item.ticket)).state == "pending"
    assert gateway.metric("cloud_gateway_model_runs_total", model=CLOUD_MODEL) == runs
    status = await router.status()
    # the probes are all that was spent, and counted
    probes = metric(router, "edge_agent_router_cloud_sent_bytes_total", path="probe") + metric(
        router, "edge_agent_router_cloud_received_bytes_total", path="probe"
    )
    assert 0 < probes < limit
    assert status.budget["day"] == (limit, probes, limit - probes)
    assert status.budget["month"] == (None, probes, None)
    assert metric(router, "edge_agent_router_budget_left_bytes", period="day") == limit - probes
    for path in ("live", "drain"):
        assert metric(router, "edge_agent_router_cloud_sent_bytes_total", path=path) == 0


async def test_a_request_the_cloud_refuses_ends_rejected_not_retried_forever(
    make_router: RouterFactory, pixels: np.ndarray
) -> None:
    router = await make_router()
    await link_is(router, *UP)
    (item,) = await route(router, pixels[:1], inputs="pixels")  # the cloud model has no 'pixels'
    assert (item.route, item.reason) == (Route.QUEUE, Reason.CLOUD_FAILED)
    assert item.ticket is not None
    ended = (await collect(router, {item.ticket}))[item.ticket]
    assert ended.state == "rejected"
    assert ended.error is not None
    assert "400" in ended.error
    assert metric(router, "edge_agent_router_queue_ended_items_total", state="rejected") == 1
    assert (
        metric(router, "edge_agent_router_cloud_calls_total", path="drain", result="rejected") == 1
    )


async def test_a_refused_device_key_holds_items_instead_of_burning_them(
    make_router: RouterFactory, gateway: Gateway, pixels: np.ndarray
) -> None:
    router = await make_router(device_key="cgk_0000000000000000.not-a-real-key")
    await link_is(router, *UP)  # readiness is public; only inference needs the key
    (item,) = await route(router, pixels[:1])
    assert item.reason is Reason.CLOUD_FAILED
    assert item.ticket is not None
    await until(
        lambda: metric(router, "edge_agent_router_forwarder_holds_total", reason="setup") > 0,
        what="the forwarder to pause on 401",
    )
    pending = await router.result(item.ticket)
    assert pending.state == "pending"
    assert pending.attempts >= 1
    assert pending.error is not None
    assert "401" in pending.error


# --- the cloud's rate limit --------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway that lets a device send one request per second, with a burst of one."""
    gw = start_gateway(
        tmp_path_factory.mktemp("limited"),
        env={"CLOUD_GATEWAY_RATE_LIMIT_PER_S": "1", "CLOUD_GATEWAY_RATE_LIMIT_BURST": "1"},
    )
    yield gw
    gw.daemon.stop()


async def test_the_forwarder_honours_retry_after_of_a_429(
    limited_gateway: Gateway, tmp_path: Path, pixels: np.ndarray
) -> None:
    # One request per item, so each meets the gateway's rate (a group would be one request).
    config = fast_config(
        limited_gateway.url, limited_gateway.key, tmp_path, drain_concurrency=4, drain_group_items=1
    )
    router = await Router.open(config, CollectorRegistry())
    try:
        await link_is(router, *UP)
        answer = await router.route(
            model="digits",
            inputs={"X": pixels[:3]},
            local=local_answer([0.1] * 3),
            wishes=CallerWishes(),
            time_left_s=0.001,  # too short for the cloud: queued, and the forwarder sends them
            request_id="rate",
        )
        tickets = {i.ticket for i in answer.items if i.ticket}
        assert len(tickets) == 3
        start = time.monotonic()
        ended = await collect(router, tickets)
        elapsed = time.monotonic() - start
    finally:
        await router.close()
    assert {r.state for r in ended.values()} == {"delivered"}
    limited = metric(
        router, "edge_agent_router_cloud_attempts_total", path="drain", outcome="rate_limited"
    )
    assert limited == limited_gateway.metric("cloud_gateway_rate_limited_total")
    # Three items at one per second: two seconds; a forwarder that ignored Retry-After (its
    # own backoff starts at 50 ms) would have been refused many more times in that while.
    assert 1 <= limited <= 4
    assert elapsed >= 1.5
    assert metric(router, "edge_agent_router_forwarder_holds_total", reason="retry_after") >= 1


async def test_the_forwarder_keeps_within_its_bandwidth_cap_and_uses_it(
    make_router: RouterFactory, proxy: FaultProxy, pixels: np.ndarray
) -> None:
    proxy.cut()
    cap = 15_000
    # One request per item: groups are paced in test_router_groups.py.
    router = await make_router(bandwidth_cap_bytes_per_s=cap, drain_group_items=1)
    items = await route(router, pixels[:40])
    tickets = {i.ticket for i in items if i.ticket}
    assert len(tickets) == 40
    assert router.monitor is not None
    up_at: list[float] = []
    router.monitor.add_listener(
        lambda state: up_at.append(time.monotonic()) if state is not LinkState.DOWN else None
    )
    proxy.restore()
    ended = await collect(router, tickets, within_s=20)
    elapsed = time.monotonic() - up_at[0]
    assert {r.state for r in ended.values()} == {"delivered"}
    sent = metric(router, "edge_agent_router_cloud_sent_bytes_total", path="drain")
    burst = cap * router.config.bandwidth_burst_s
    assert sent <= cap * elapsed + burst
    assert sent - burst >= 0.7 * cap * elapsed  # paced at the cap, not far below it
