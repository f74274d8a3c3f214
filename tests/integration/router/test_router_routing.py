"""Routing with the link up, against a real cloud gateway behind the fault proxy: which rows reach
the cloud, how the cloud's rows are merged into the batch, what the caller is told."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from router import CallerWishes, Escalation, LinkState, Reason, Route, TicketNotFound
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

UP = (LinkState.UP, LinkState.DEGRADED)


def model_runs(gateway: Gateway) -> float:
    return gateway.metric("cloud_gateway_model_runs_total", model=CLOUD_MODEL)


async def test_unsure_rows_get_the_clouds_answer_and_confident_rows_stay(
    make_router: RouterFactory, gateway: Gateway, pixels: np.ndarray
) -> None:
    router = await make_router()
    await link_is(router, *UP)
    x = pixels[:6]
    confidence = [0.99, 0.1, 0.95, 0.2, 0.3, 0.97]
    runs = model_runs(gateway)
    answer = await router.route(
        model="digits",
        inputs={"X": x},
        local=local_answer(confidence),
        wishes=CallerWishes(),
        time_left_s=5.0,
        request_id="req-merge",
    )
    unsure = [1, 3, 4]
    assert [i.route for i in answer.items] == [
        Route.CLOUD if i in unsure else Route.EDGE for i in range(6)
    ]
    assert [i.answered_by for i in answer.items] == [
        "cloud" if i in unsure else "edge" for i in range(6)
    ]
    assert [i.reason for i in answer.items] == [
        Reason.UNSURE if i in unsure else Reason.CONFIDENT for i in range(6)
    ]
    assert all(not i.provisional and i.ticket is None for i in answer.items)
    assert [i.confidence for i in answer.items] == pytest.approx(confidence)
    expected = cloud_model_answers(x[unsure])
    probabilities = np.asarray(answer.outputs["probabilities"], dtype=np.float32)
    labels = np.asarray(answer.outputs["label"], dtype=np.int64)
    assert answer.outputs["probabilities"].dtype == np.float32
    assert answer.outputs["label"].dtype == np.int64
    np.testing.assert_allclose(probabilities[unsure], expected["probabilities"], rtol=1e-6)
    np.testing.assert_array_equal(labels[unsure], expected["label"])
    confident = [0, 2, 5]
    assert (probabilities[confident] == -1).all()
    assert (labels[confident] == -1).all()
    # one call per row, each keyed by its would-be ticket, so a failed call's redelivery replays
    assert model_runs(gateway) - runs == 3
    assert metric(router, "edge_agent_router_routes_total", route="cloud", reason="unsure") == 3
    assert metric(router, "edge_agent_router_routes_total", route="edge", reason="confident") == 3
    assert metric(router, "edge_agent_router_cloud_calls_total", path="live", result="ok") == 3
    status = await router.status()
    assert status.budget["day"][1] > 0  # the call's bytes were counted


async def test_confident_requests_never_reach_the_cloud_nor_wait(
    make_router: RouterFactory, gateway: Gateway, proxy: FaultProxy, pixels: np.ndarray
) -> None:
    router = await make_router()
    await link_is(router, *UP)
    runs, sent = model_runs(gateway), proxy.bytes_to_target
    proxy.black_hole()  # anything that tried the cloud now would hang
    for i in range(20):
        coro = router.route(
            model="digits",
            inputs={"X": pixels[i : i + 3]},
            local=local_answer([0.9, 0.8, 0.99]),
            wishes=CallerWishes(),
            time_left_s=None,
            request_id=f"c-{i}",
        )
        # Driven by hand: a coroutine that awaits nothing finishes on its first step.
        with pytest.raises(StopIteration) as done:
            coro.send(None)
        answer = done.value.value
        assert {(it.route, it.reason) for it in answer.items} == {(Route.EDGE, Reason.CONFIDENT)}
    never = await router.route(
        model="digits",
        inputs={"X": pixels[:2]},
        local=local_answer([0.1, 0.2]),
        wishes=CallerWishes(escalation=Escalation.NEVER),
        time_left_s=None,
        request_id="never",
    )
    assert {i.reason for i in never.items} == {Reason.ESCALATION_NEVER}
    no_cloud = await router.route(
        model="digits",
        inputs={"X": pixels[:1]},
        local=local_answer([0.1], cloud_model=None),
        wishes=CallerWishes(),
        time_left_s=None,
        request_id="no-cloud-model",
    )
    assert no_cloud.items[0].reason is Reason.NO_CLOUD_CONFIGURED
    proxy.restore()
    assert model_runs(gateway) == runs
    assert proxy.bytes_to_target - sent < 2000  # at most the monitor's probes
    assert metric(router, "edge_agent_router_routes_total", route="edge", reason="confident") == 60


async def test_always_escalates_a_confident_item_and_a_lone_item_is_keyed_by_its_ticket(
    make_router: RouterFactory, gateway: Gateway, pixels: np.ndarray
) -> None:
    router = await make_router()
    await link_is(router, *UP)
    replays = gateway.metric("cloud_gateway_idempotent_replays_total", model=CLOUD_MODEL)
    answer = await router.route(
        model="digits",
        inputs={"X": pixels[7:8]},
        local=local_answer([0.99]),
        wishes=CallerWishes(escalation=Escalation.ALWAYS),
        time_left_s=None,
        request_id="",
    )
    (item,) = answer.items
    assert (item.route, item.reason, item.answered_by) == (
        Route.CLOUD,
        Reason.ESCALATION_ALWAYS,
        "cloud",
    )
    assert answer.outputs["label"][0] == cloud_model_answers(pixels[7:8])["label"][0]
    assert gateway.metric("cloud_gateway_idempotent_replays_total", model=CLOUD_MODEL) == replays


async def test_a_deadline_too_short_for_the_cloud_queues_and_the_forwarder_delivers(
    make_router: RouterFactory, gateway: Gateway, pixels: np.ndarray
) -> None:
    router = await make_router()
    await link_is(router, *UP)
    answer = await router.route(
        model="digits",
        inputs={"X": pixels[:2]},
        local=local_answer([0.1, 0.9]),
        wishes=CallerWishes(priority=7),
        time_left_s=0.001,
        request_id="short",
    )
    queued, edge = answer.items
    assert (queued.route, queued.reason, queued.provisional) == (
        Route.QUEUE,
        Reason.DEADLINE_TOO_SHORT,
        True,
    )
    assert queued.answered_by == "edge"
    assert queued.ticket is not None
    assert edge.ticket is None
    assert (answer.outputs["probabilities"] == -1).all()  # the local answer, unchanged
    results = []

    async def watch() -> None:
        async for result in router.watch(0):
            results.append(result)

    watcher = asyncio.ensure_future(watch())
    await until(lambda: len(results) == 1, what="the watcher to get the delivered ticket")
    watcher.cancel()
    (delivered,) = results
    assert delivered.ticket == queued.ticket
    assert delivered.state == "delivered"
    assert delivered.cursor >= 1
    np.testing.assert_array_equal(
        delivered.outputs["label"], cloud_model_answers(pixels[:1])["label"]
    )
    fetched = await router.result(queued.ticket)
    assert fetched.state == "delivered"
    assert fetched.model == CLOUD_MODEL
    np.testing.assert_array_equal(
        fetched.outputs["probabilities"], delivered.outputs["probabilities"]
    )
    with pytest.raises(TicketNotFound):
        await router.result("no-such-ticket")
    assert metric(router, "edge_agent_router_queue_ended_items_total", state="delivered") == 1
    assert metric(router, "edge_agent_router_cloud_calls_total", path="drain", result="ok") == 1
