"""The CloudClient's bytes against the data budget: counted to the byte as the proxy carries them
(answers with a length or chunked, errors, probes), reserved before sending so that calls in
flight together never overspend, and an answer too large for what is left is left unread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from router.budget import BudgetPeriod, DataBudget
from router.cloud_client import CloudClient
from router.errors import BudgetExhausted, CloudRejected, CloudUnavailable
from router.retrying import RetryPolicy
from tests.integration.router.helpers import until
from tests.integration.test_cloud_client import KEY, Action, Attempts, ScriptedCloud
from tests.support.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration

BODY = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


@pytest.fixture
def cloud() -> Iterator[ScriptedCloud]:
    with ScriptedCloud() as server:
        yield server


@pytest.fixture
def proxy(cloud: ScriptedCloud) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", cloud.port) as proxy:
        yield proxy


async def open_budget(tmp_path: Path, limit: int | None) -> DataBudget:
    return await DataBudget.open(tmp_path / "budget.sqlite", daily_bytes=limit)


@pytest.fixture
async def budget(tmp_path: Path) -> AsyncIterator[DataBudget]:
    opened = await open_budget(tmp_path, None)
    yield opened
    await opened.close()


def client(url: str, budget: DataBudget, attempts: Attempts) -> CloudClient:
    return CloudClient(
        url,
        KEY,
        retry=RetryPolicy(max_attempts=1),
        on_attempt=attempts.append,
        budget=budget,
        probe_timeout_s=2.0,
    )


def used(budget: DataBudget) -> int:
    return budget.usage()[0].used_bytes


async def test_every_byte_each_way_is_counted_as_the_proxy_carried_it(
    cloud: ScriptedCloud, proxy: FaultProxy, budget: DataBudget
) -> None:
    attempts = Attempts()
    cloud.script = [
        Action(),
        Action(chunked=True, floats=2_000),  # gzip, streamed: chunk framing counts too
        Action(status=429, headers={"Retry-After": "1"}),
        Action(status=400),
        Action(chunked=True, floats=5),
    ]
    async with client(proxy.url, budget, attempts) as c:
        assert await c.ready()
        await c.infer("m", BODY, idempotency_key="k-1")
        await c.infer("m", BODY, idempotency_key="k-2")
        with pytest.raises(CloudUnavailable):
            await c.infer("m", BODY, idempotency_key="k-3")
        with pytest.raises(CloudRejected):
            await c.infer("m", BODY, idempotency_key="k-4")
        await c.infer("m", BODY, idempotency_key="k-5")
        cloud.ready = False
        assert not await c.ready()
    assert [a.outcome for a in attempts] == [
        "ok", "ok", "ok", "rate_limited", "rejected", "ok", "unavailable"
    ]  # fmt: skip
    sent = sum(a.bytes_sent for a in attempts)
    received = sum(a.bytes_received for a in attempts)
    await until(
        lambda: (proxy.bytes_to_target, proxy.bytes_to_client) == (sent, received),
        what=f"the proxy to have passed on {sent} bytes up and {received} down",
    )
    assert used(budget) == sent + received
    assert budget.reserved_bytes == 0


async def test_calls_in_flight_together_never_overspend_the_budget(
    cloud: ScriptedCloud, proxy: FaultProxy, tmp_path: Path
) -> None:
    attempts = Attempts()
    limit = 0
    budget = await open_budget(tmp_path, None)
    try:
        async with client(proxy.url, budget, attempts) as c:
            await c.infer("m", BODY, idempotency_key="k-99")  # what one exchange takes
            one = used(budget)
            limit = 5 * one + one // 2
            budget.limits[BudgetPeriod.DAY] = limit + one
            attempts.clear()
            # Twenty at once: each reserves its bytes before its first wait, so all twenty
            # have reserved or been refused before any is answered.
            results = await asyncio.gather(
                *(c.infer("m", BODY, idempotency_key=f"k-{i:02d}") for i in range(20)),
                return_exceptions=True,
            )
        answered = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, BudgetExhausted)]
        assert (len(answered), len(refused)) == (5, 15)
        assert len(cloud.seen) == 1 + 5  # the refused ones were never sent
        assert used(budget) == one + 5 * one <= one + limit
        await until(
            lambda: proxy.bytes_to_target + proxy.bytes_to_client == 6 * one,
            what="the proxy to have passed on six exchanges",
        )
        assert [a.outcome for a in attempts].count("budget") == 15
    finally:
        await budget.close()


async def test_an_answer_too_large_for_what_is_left_is_left_unread(
    cloud: ScriptedCloud, proxy: FaultProxy, tmp_path: Path
) -> None:
    attempts = Attempts()
    budget = await open_budget(tmp_path, 4_000)
    try:
        cloud.script = [Action(floats=3), Action(floats=20_000)]
        async with client(proxy.url, budget, attempts) as c:
            await c.infer("m", BODY, idempotency_key="small")
            with pytest.raises(BudgetExhausted, match="day data budget spent"):
                await c.infer("m", BODY, idempotency_key="large")
            assert budget.reserved_bytes == 0
        assert [a.outcome for a in attempts] == ["ok", "budget"]
        assert used(budget) <= 4_000
        assert used(budget) == sum(a.bytes_sent + a.bytes_received for a in attempts)
        # Its status line and headers were read and counted, its body (larger than what was
        # left, by its Content-Length) was not: the connection was closed instead.
        assert 0 < attempts[1].bytes_received < 500
    finally:
        await budget.close()
