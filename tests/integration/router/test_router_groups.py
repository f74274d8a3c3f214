"""The forwarder sends a backlog in groups (the gateway's infer_group extension) behind the
counting proxy, to the real gateway: each item delivered once whichever group carries it, a bad
item failing alone, groups sized within the gateway's limits, the data budget and the bandwidth
cap counting the bytes on the wire."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from model_runtime.errors import InvalidInput
from model_runtime.infer_group import (
    GROUP_EXTENSION,
    HEADER_LENGTH,
    GroupItem,
    GroupItemAnswer,
    decode_group_answer,
    encode_group_request,
)
from router import LinkState, Router, cloud_client, forwarder
from router.clock import Clock, SystemClock
from router.cloud_client import CloudRequest
from router.config import QUEUE_FILE
from router.durable_queue import DurableQueue, QueuedItem
from tests.integration.gateway.helpers import Gateway, start_gateway
from tests.integration.router.helpers import (
    CLOUD_MODEL,
    body,
    cloud_model_answers,
    fast_config,
    metric,
    queue_backlog,
    until,
)
from tests.support.clock import JumpClock
from tests.support.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration


def gateway_count(gateway: Gateway, endpoint: str) -> float:
    return gateway.metric("cloud_gateway_requests_total", endpoint=endpoint)


def runs(gateway: Gateway) -> float:
    return gateway.metric("cloud_gateway_model_runs_total", model=CLOUD_MODEL, outcome="ok")


async def ended(router: Router, tickets: list[str]) -> dict[str, str]:
    """Wait until every ticket has ended; ticket -> end state."""

    async def states() -> dict[str, str]:
        return {t: (await router.result(t)).state for t in tickets}

    deadline = asyncio.get_running_loop().time() + 30
    while True:
        found = await states()
        if "pending" not in found.values():
            return found
        assert asyncio.get_running_loop().time() < deadline, found
        await asyncio.sleep(0.02)


async def test_a_backlog_goes_in_groups_each_item_delivered_once(
    gateway: Gateway, proxy: FaultProxy, tmp_path: Path, pixels: np.ndarray
) -> None:
    rows = pixels[:20]
    tickets = await queue_backlog(tmp_path, rows)
    groups, singles, ran = (
        gateway_count(gateway, GROUP_EXTENSION),
        gateway_count(gateway, "infer"),
        runs(gateway),
    )
    config = fast_config(
        proxy.url, gateway.key, tmp_path, drain_group_items=8, bandwidth_cap_bytes_per_s=10**6
    )
    router = await Router.open(config, CollectorRegistry())
    try:
        states = await ended(router, tickets)
        assert set(states.values()) == {"delivered"}
        expected = cloud_model_answers(rows)
        for i, ticket in enumerate(tickets):
            result = await router.result(ticket)
            np.testing.assert_array_equal(result.outputs["label"], expected["label"][i : i + 1])
        # Claimed 16 at a time: groups of 8, 8 and 4; nothing went alone.
        assert gateway_count(gateway, GROUP_EXTENSION) - groups == 3
        assert gateway_count(gateway, "infer") == singles
        assert runs(gateway) - ran == 20
        # The bandwidth cap was charged what went on the wire for the deliveries.
        assert router.forwarder is not None
        assert router.forwarder.bucket is not None
        assert router.forwarder.bucket.taken == metric(
            router, "edge_agent_router_cloud_sent_bytes_total", path="drain"
        )
    finally:
        await router.close()


async def test_a_groups_answers_are_encoded_off_the_event_loop_which_serves_meanwhile(
    gateway: Gateway,
    proxy: FaultProxy,
    tmp_path: Path,
    pixels: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Building a group's request (binary tensors, framing, gzip), parsing its answer, and
    decoding and encoding the items' answers take tens of milliseconds for 64 items: done on
    the event loop, they held every local answer back meanwhile. Here the encoding of the
    answers is held by the test, and the loop must go on serving."""
    tickets = await queue_backlog(tmp_path, pixels[:8])
    loop_thread = threading.get_ident()
    threads: dict[str, set[int]] = {"request": set(), "parse": set(), "answers": set()}
    held, go = threading.Event(), threading.Event()
    build, parse, store_form = (
        forwarder.request_for,
        cloud_client.read_answer,
        forwarder.stored_answers,
    )

    def request(group: Sequence[QueuedItem], *, binary: bool, compress: bool) -> CloudRequest:
        threads["request"].add(threading.get_ident())
        return build(group, binary=binary, compress=compress)

    def read(response: httpx.Response, raw: bytes, rtt: float, clock: Clock) -> Any:
        if response.request.url.path.endswith(GROUP_EXTENSION):
            threads["parse"].add(threading.get_ident())
        return parse(response, raw, rtt, clock)

    def answers(results: list[GroupItemAnswer]) -> list[bytes | InvalidInput | None]:
        threads["answers"].add(threading.get_ident())
        held.set()
        if threading.get_ident() != loop_thread:  # on the loop, waiting would hold the test too
            assert go.wait(30)
        return store_form(results)

    monkeypatch.setattr(forwarder, "request_for", request)
    monkeypatch.setattr(cloud_client, "read_answer", read)
    monkeypatch.setattr(forwarder, "stored_answers", answers)
    config = fast_config(proxy.url, gateway.key, tmp_path, drain_group_items=8)
    router = await Router.open(config, CollectorRegistry())
    try:
        assert await asyncio.to_thread(held.wait, 30), "no group was answered"
        assert all(threads.values()), threads
        assert loop_thread not in set().union(*threads.values())
        # The loop serves while the answers are held: a ticket reads as still pending.
        assert (await router.result(tickets[0])).state == "pending"
        go.set()
        assert set((await ended(router, tickets)).values()) == {"delivered"}
    finally:
        go.set()
        await router.close()


async def test_groups_keep_within_the_bandwidth_cap_and_use_it(
    gateway: Gateway, proxy: FaultProxy, tmp_path: Path, pixels: np.ndarray
) -> None:
    cap = 3_000
    tickets = await queue_backlog(tmp_path, pixels[200:296])
    proxy.cut()
    config = fast_config(
        proxy.url, gateway.key, tmp_path, drain_group_items=8, bandwidth_cap_bytes_per_s=cap,
        bandwidth_burst_s=0.5,  # 1,500 bytes: room for a group of 8 (about 1.1 kB)
    )  # fmt: skip
    router = await Router.open(config, CollectorRegistry())
    try:
        assert router.monitor is not None
        up_at: list[float] = []
        router.monitor.add_listener(
            lambda state: up_at.append(time.monotonic()) if state is not LinkState.DOWN else None
        )
        proxy.restore()
        states = await ended(router, tickets)
        elapsed = time.monotonic() - up_at[0]
        assert set(states.values()) == {"delivered"}
        sent = metric(router, "edge_agent_router_cloud_sent_bytes_total", path="drain")
        burst = cap * router.config.bandwidth_burst_s
        assert sent <= cap * elapsed + burst
        assert sent - burst >= 0.7 * cap * elapsed  # paced at the cap, not far below it
    finally:
        await router.close()


async def test_items_run_in_a_group_whose_answer_was_lost_are_replayed_in_other_groups(
    gateway: Gateway, proxy: FaultProxy, tmp_path: Path, pixels: np.ndarray
) -> None:
    rows = pixels[30:42]
    tickets = await queue_backlog(tmp_path, rows)
    # An earlier attempt carried items 1, 4, 7 and 10 in one group, and the gateway ran them,
    # but its answer never came back (a power cut as it arrived): the queue still holds them.
    earlier = [GroupItem(tickets[i], body(rows[i], tickets[i])) for i in (1, 4, 7, 10)]
    payload, header_length = encode_group_request(earlier)
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        lost = await client.post(
            f"/v2/models/{CLOUD_MODEL}/{GROUP_EXTENSION}",
            content=gzip.compress(payload),
            headers={
                "Authorization": f"Bearer {gateway.key}",
                "Content-Encoding": "gzip",
                HEADER_LENGTH: str(header_length),
            },
        )
    first = decode_group_answer(lost.json(), [i.key for i in earlier])
    ran = runs(gateway)
    config = fast_config(proxy.url, gateway.key, tmp_path, drain_group_items=8)
    router = await Router.open(config, CollectorRegistry())
    try:
        states = await ended(router, tickets)
        assert set(states.values()) == {"delivered"}
        # Groups of 0-7 and 8-11 this time: the four were replayed, only the others ran.
        assert runs(gateway) - ran == 8
        for item, answer in zip(earlier, first, strict=True):
            assert answer.response is not None
            result = await router.result(item.key)
            sent = {o["name"]: o["data"] for o in answer.response["outputs"]}
            assert result.outputs["label"].tolist() == sent["label"]
            assert result.parameters["idempotent_replay"] is True
    finally:
        await router.close()


async def test_a_bad_item_fails_alone_in_its_group(
    gateway: Gateway, proxy: FaultProxy, tmp_path: Path, pixels: np.ndarray
) -> None:
    tickets = await queue_backlog(tmp_path, pixels[50:56], bad=frozenset({2}))
    groups = gateway_count(gateway, GROUP_EXTENSION)
    config = fast_config(proxy.url, gateway.key, tmp_path, drain_group_items=8)
    router = await Router.open(config, CollectorRegistry())
    try:
        states = await ended(router, tickets)
        assert [states[t] for t in tickets] == ["delivered"] * 2 + ["rejected"] + ["delivered"] * 3
        error = (await router.result(tickets[2])).error
        assert "400" in error
        assert "X: shape [1, 60]" in error
        assert gateway_count(gateway, GROUP_EXTENSION) - groups == 1
    finally:
        await router.close()


async def test_an_item_whose_request_cannot_be_built_is_rejected_and_its_group_goes_on(
    gateway: Gateway, proxy: FaultProxy, tmp_path: Path, pixels: np.ndarray
) -> None:
    """A queued payload that is not JSON (never one this agent queues: a damaged file) cannot
    be turned into binary tensors: that item ends rejected, the others are delivered."""
    tickets = await queue_backlog(tmp_path, pixels[60:64])
    queue = await DurableQueue.open(tmp_path / QUEUE_FILE, clock=SystemClock())
    try:
        await queue.enqueue("damaged-1", CLOUD_MODEL, b"{not json", ttl_s=3600)
    finally:
        await queue.close()
    config = fast_config(proxy.url, gateway.key, tmp_path, drain_group_items=8)
    router = await Router.open(config, CollectorRegistry())
    try:
        states = await ended(router, [*tickets, "damaged-1"])
        assert [states[t] for t in tickets] == ["delivered"] * 4
        assert states["damaged-1"] == "rejected"
        assert "cannot be sent" in (await router.result("damaged-1")).error
    finally:
        await router.close()


@pytest.fixture(scope="module")
def small_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway that takes 8 items per request, and answers of 4 KiB: 8 digits' answers could
    take more than that (693 bytes each at most), 4 could not."""
    gw = start_gateway(
        tmp_path_factory.mktemp("small-gateway"),
        env={
            "CLOUD_GATEWAY_MAX_ITEMS_PER_REQUEST": "8",
            "CLOUD_GATEWAY_MAX_ANSWER_BYTES": "4096",
            "CLOUD_GATEWAY_RATE_LIMIT_PER_S": "1000",
        },
    )
    yield gw
    assert gw.daemon.stop() == 0


async def test_groups_are_sized_within_the_gateways_limits(
    small_gateway: Gateway, tmp_path: Path, pixels: np.ndarray
) -> None:
    tickets = await queue_backlog(tmp_path, pixels[60:80])
    config = fast_config(small_gateway.url, small_gateway.key, tmp_path, drain_group_items=64)
    router = await Router.open(config, CollectorRegistry())
    try:
        states = await ended(router, tickets)
        assert set(states.values()) == {"delivered"}
        assert router.forwarder is not None
        assert router.forwarder.groups.items_per_group == 4
        refused = small_gateway.metric("cloud_gateway_limit_refusals_total", limit="answer_bytes")
        assert 1 <= refused <= 2  # the groups of 8 in flight at first; none after
        assert small_gateway.metric("cloud_gateway_group_items_total", code="200") == 20
    finally:
        await router.close()


DAY_1 = datetime(2030, 3, 1, tzinfo=UTC).timestamp()


@pytest.fixture
async def day_router(
    gateway: Gateway, proxy: FaultProxy, tmp_path: Path, pixels: np.ndarray
) -> AsyncIterator[tuple[Router, JumpClock, list[str]]]:
    """40 queued items, groups of 8, and a day's budget with room for some of the groups."""
    clock = JumpClock(DAY_1 + 60)
    tickets = await queue_backlog(tmp_path, pixels[100:140], clock=clock)
    config = fast_config(
        proxy.url, gateway.key, tmp_path, drain_group_items=8, budget_day_bytes=LIMIT
    )
    router = await Router.open(config, CollectorRegistry(), clock=clock)
    try:
        yield router, clock, tickets
    finally:
        await router.close()


LIMIT = 6_000
"""Room for the probes and some of the five groups of 8 (about 1.6 kB each way), not all."""


async def test_groups_keep_to_the_data_budget_to_the_byte(
    day_router: tuple[Router, JumpClock, list[str]], proxy: FaultProxy, gateway: Gateway
) -> None:
    router, clock, tickets = day_router
    ran = runs(gateway)

    def delivered() -> int:
        return int(metric(router, "edge_agent_router_queue_ended_items_total", state="delivered"))

    def used() -> int:
        return sum(u.used_bytes for u in router.budget.usage() if u.period.value == "day")

    async def quiet() -> None:
        await asyncio.sleep(0.3)
        await until(lambda: router.budget.reserved_bytes == 0, what="the exchanges to end")

    await quiet()
    for _ in range(5):  # the rest of the day, four hours at a time
        clock.jump(4 * 3600)
        await quiet()
        assert used() <= LIMIT
    held = len(tickets) - delivered()
    assert 0 < held < len(tickets), "the budget was meant to hold some groups back"
    assert held % 8 == 0, "a group goes whole or not at all"

    while delivered() < len(tickets):  # the following days, each within its budget
        assert clock.wall() < DAY_1 + 6 * 86400, "the held items were not released"
        clock.jump(4 * 3600)
        await quiet()
        assert used() <= LIMIT
    await quiet()
    month = sum(u.used_bytes for u in router.budget.usage() if u.period.value == "month")
    # To the byte: what the budget counted is what crossed the proxy, both ways, and what the
    # byte metrics say; and each item ran once.
    await until(lambda: proxy.bytes_to_target + proxy.bytes_to_client == month, what="bytes")
    assert month == sum(
        metric(router, f"edge_agent_router_cloud_{way}_bytes_total", path=path)
        for way in ("sent", "received")
        for path in ("drain", "probe")
    )
    assert runs(gateway) - ran == len(tickets)
