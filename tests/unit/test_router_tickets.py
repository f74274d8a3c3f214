"""TicketStore on a real DurableQueue file: results by ticket, watchers in end order, resuming
from a cursor, filtering, waking on new ends, paging, closing."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from model_runtime.v2_json import encode_infer_response
from router.clock import FakeClock
from router.durable_queue import DurableQueue
from router.errors import TicketNotFound
from router.tickets import TicketResult, TicketStore, decode_result, encode_result


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[TicketStore]:
    tickets = TicketStore()
    queue = await DurableQueue.open(tmp_path / "queue.sqlite", clock=clock, on_end=tickets.notify)
    tickets.attach(queue)
    yield tickets
    tickets.close()
    await queue.close()


def answer(label: int) -> dict[str, object]:
    probabilities = np.zeros((1, 10), dtype=np.float32)
    probabilities[0, label] = 1.0
    return encode_infer_response(
        "digits-large",
        {"label": np.asarray([label], dtype=np.int64), "probabilities": probabilities},
        parameters={"idempotent_replay": False},
    )


async def put(store: TicketStore, *tickets: str, ttl_s: float = 3600.0) -> None:
    for t in tickets:
        assert await store.queue.enqueue(t, "digits-large", b'{"inputs":[]}', ttl_s=ttl_s)


async def deliver(store: TicketStore, ticket: str, label: int) -> None:
    claimed = await store.queue.claim_batch(100, 1 << 20)
    for item in claimed:
        if item.ticket != ticket:
            await store.queue.release(item.ticket, "not this one")
    assert await store.queue.mark_delivered(ticket, encode_result(answer(label)))


async def take(watch: AsyncIterator[TicketResult], n: int) -> list[TicketResult]:
    got = []
    async with asyncio.timeout(5):
        async for result in watch:
            got.append(result)
            if len(got) == n:
                break
    return got


async def end_four(store: TicketStore, clock: FakeClock) -> None:
    """a delivered, b expired, c rejected, d delivered; e stays pending."""
    await put(store, "a", "c", "d", "e")
    await put(store, "b", ttl_s=10)
    await deliver(store, "a", 3)
    clock.advance(11)
    assert await store.queue.expire_due() == ["b"]
    claimed = await store.queue.claim_batch(100, 1 << 20)
    for item in claimed:
        if item.ticket == "c":
            assert await store.queue.mark_rejected("c", "cloud answered 400: bad input")
        else:
            await store.queue.release(item.ticket, "later")
    await deliver(store, "d", 7)


async def test_results_decode_the_clouds_answer_and_pending_says_so(
    store: TicketStore, clock: FakeClock
) -> None:
    await end_four(store, clock)
    a = await store.result("a")
    assert (a.state, a.model, a.cursor) == ("delivered", "digits-large", 1)
    assert a.outputs["label"].tolist() == [3]
    assert a.outputs["probabilities"].shape == (1, 10)
    assert a.parameters == {"idempotent_replay": False}
    assert a.finished_at is not None
    b = await store.result("b")
    assert (b.state, b.outputs, b.cursor) == ("expired", {}, 2)
    c = await store.result("c")
    assert c.state == "rejected"
    assert c.error is not None
    assert "400" in c.error
    e = await store.result("e")
    assert (e.state, e.cursor, e.finished_at, e.outputs) == ("pending", 0, None, {})
    assert e.attempts >= 1  # claimed and released once
    with pytest.raises(TicketNotFound):
        await store.result("nope")


async def test_a_watcher_gets_every_end_in_order_and_resumes_after_its_cursor(
    store: TicketStore, clock: FakeClock
) -> None:
    await end_four(store, clock)
    everything = await take(store.watch(0), 4)
    assert [(r.ticket, r.state) for r in everything] == [
        ("a", "delivered"),
        ("b", "expired"),
        ("c", "rejected"),
        ("d", "delivered"),
    ]
    assert [r.cursor for r in everything] == [1, 2, 3, 4]
    assert everything[3].outputs["label"].tolist() == [7]
    # Reconnecting with the cursor of the second: only what ended after it.
    resumed = await take(store.watch(everything[1].cursor), 2)
    assert [r.ticket for r in resumed] == ["c", "d"]
    only = await take(store.watch(0, tickets={"b", "d"}), 2)
    assert [r.ticket for r in only] == ["b", "d"]


async def test_a_waiting_watcher_is_woken_by_each_new_end(store: TicketStore) -> None:
    await put(store, "x", "y")
    watch = store.watch(0)
    first = asyncio.ensure_future(take(watch, 1))
    await asyncio.sleep(0.05)  # let it find nothing and wait; not a synchronisation
    assert not first.done()
    await deliver(store, "y", 2)
    assert [r.ticket for r in await first] == ["y"]
    second = asyncio.ensure_future(take(watch, 1))
    await deliver(store, "x", 4)
    (x,) = await second
    assert (x.ticket, x.cursor, x.outputs["label"].tolist()) == ("x", 2, [4])


async def test_a_watcher_pages_through_a_long_backlog(store: TicketStore) -> None:
    tickets = [f"t{i:03d}" for i in range(250)]
    await put(store, *tickets)
    claimed = await store.queue.claim_batch(250, 1 << 30)
    assert len(claimed) == 250
    for item in claimed:
        await store.queue.mark_rejected(item.ticket, "bad")
    results = await take(store.watch(0), 250)
    assert [r.cursor for r in results] == list(range(1, 251))


async def test_closing_the_store_ends_its_watchers(store: TicketStore) -> None:
    watch = store.watch(0)

    async def drain() -> list[TicketResult]:
        return [r async for r in watch]

    task = asyncio.ensure_future(drain())
    await asyncio.sleep(0.05)  # the watcher is waiting for ends; not a synchronisation
    store.close()
    assert await asyncio.wait_for(task, 5) == []


async def test_a_bad_cursor_is_refused(store: TicketStore) -> None:
    with pytest.raises(ValueError, match="after_cursor"):
        await anext(store.watch(-1))


def test_stored_answers_are_gzip_and_plain_json_is_read_too() -> None:
    body = answer(5)
    stored = encode_result(body)
    assert stored[:2] == b"\x1f\x8b"
    assert gzip.decompress(stored) == json.dumps(body, separators=(",", ":")).encode()
    outputs, _ = decode_result(stored)
    plain, _ = decode_result(json.dumps(body).encode())
    assert outputs["label"].tolist() == plain["label"].tolist() == [5]
    assert decode_result(None) == ({}, {})
