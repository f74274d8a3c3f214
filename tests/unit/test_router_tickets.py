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

from model_runtime.errors import InvalidInput
from model_runtime.v2_json import encode_infer_response
from router.clock import FakeClock
from router.durable_queue import DurableQueue
from router.errors import TicketNotFound, TooManyWatchers
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


@pytest.mark.parametrize("cursor", [-1, 2**63, 2**64 + 5])
async def test_a_cursor_beyond_what_a_result_can_have_is_refused_before_the_stream(
    store: TicketStore, cursor: int
) -> None:
    with pytest.raises(InvalidInput, match=r"^after_cursor: must be an integer 0\.\.") as caught:
        store.watch(cursor)  # refused at the call: the stream never starts
    assert "\n" not in str(caught.value)
    assert store.watchers == 0


async def test_a_huge_ticket_is_refused_without_echoing_it(store: TicketStore) -> None:
    huge = "t" * 1_000_000
    with pytest.raises(InvalidInput) as caught:
        await store.result(huge)
    assert len(str(caught.value)) < 200
    assert "1000000 characters" in str(caught.value)
    with pytest.raises(InvalidInput):
        store.watch(0, tickets=[huge])
    with pytest.raises(InvalidInput, match="at most 1000 tickets"):
        store.watch(0, tickets=[f"t{i}" for i in range(1001)])


async def test_results_are_shown_to_their_owner_only(store: TicketStore) -> None:
    await store.queue.enqueue("mine", "digits-large", b"{}", ttl_s=60, owner="app-a")
    await store.queue.enqueue("theirs", "digits-large", b"{}", ttl_s=60, owner="app-b")
    await store.queue.enqueue("nobody", "digits-large", b"{}", ttl_s=60)
    a_watch, b_watch = store.watch(0, owner="app-a"), store.watch(0, owner="app-b")
    first_a = asyncio.ensure_future(take(a_watch, 1))
    for ticket, label in (("theirs", 1), ("nobody", 2), ("mine", 3)):
        await deliver(store, ticket, label)
    (got,) = await first_a
    assert (got.ticket, got.outputs["label"].tolist()) == ("mine", [3])
    assert [r.ticket for r in await take(b_watch, 1)] == ["theirs"]
    assert [r.ticket for r in await take(store.watch(0), 1)] == ["nobody"]
    assert (await store.result("mine", owner="app-a")).state == "delivered"
    # Another owner's ticket reads as unknown: its existence is not given away.
    for owner in ("app-b", ""):
        with pytest.raises(TicketNotFound):
            await store.result("mine", owner=owner)


async def test_watchers_beyond_the_cap_are_refused_and_counted(tmp_path: Path) -> None:
    refused: list[int] = []
    tickets = TicketStore(max_watchers=2, on_watcher_refused=lambda: refused.append(1))
    queue = await DurableQueue.open(tmp_path / "q.sqlite", on_end=tickets.notify)
    tickets.attach(queue)
    try:
        first, second = tickets.watch(0), tickets.watch(0, owner="x")
        with pytest.raises(TooManyWatchers):
            tickets.watch(0)
        assert refused == [1]
        assert tickets.watchers == 2
        # A stream that ends gives its place back.
        waiting = asyncio.ensure_future(anext(first))
        await asyncio.sleep(0.05)  # let it reach its wait; not a synchronisation
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await first.aclose()
        assert tickets.watchers == 1
        third = tickets.watch(0)
        await third.aclose()
        await second.aclose()
    finally:
        tickets.close()
        await queue.close()


async def test_a_watcher_closed_before_its_first_read_gives_its_place_back(
    tmp_path: Path,
) -> None:
    # The transport may be gone between watch() and the stream's first read (a client that
    # cancels at once): closing the stream must free its place even though it never started.
    tickets = TicketStore(max_watchers=1)
    queue = await DurableQueue.open(tmp_path / "q.sqlite", on_end=tickets.notify)
    tickets.attach(queue)
    try:
        for _ in range(3):
            unread = tickets.watch(0)
            assert tickets.watchers == 1
            await unread.aclose()
            assert tickets.watchers == 0
        read = tickets.watch(0)
        waiting = asyncio.ensure_future(anext(read))
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await read.aclose()
        await read.aclose()  # twice: the place is given back once
        assert tickets.watchers == 0
    finally:
        tickets.close()
        await queue.close()


async def test_an_end_is_read_from_the_file_once_per_owner_not_once_per_watcher(
    store: TicketStore,
) -> None:
    """The cause of 30 deliveries taking 23 s with 3,000 idle watchers: every end woke every
    watcher, and each read the file and decoded the answer for itself."""
    await put(store, "x")
    watchers = [store.watch(0, owner=f"kiosk-{i}") for i in range(200)]
    mine = store.watch(0)
    waiting = [asyncio.ensure_future(anext(w)) for w in (*watchers, mine)]
    await asyncio.sleep(0.05)  # every watcher has read the (empty) file and waits
    reads = store.queue._worker.jobs
    await deliver(store, "x", 1)
    got = await asyncio.wait_for(waiting[-1], 5)
    assert got.ticket == "x"
    assert not any(w.done() for w in waiting[:-1])  # the other owners' watchers slept on
    # claim, mark_delivered: the end reached its one watcher without another read of the file
    assert store.queue._worker.jobs - reads == 2
    for w in waiting:
        w.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_a_watcher_that_falls_far_behind_catches_up_from_the_file(
    store: TicketStore,
) -> None:
    n = 1_100  # over the 1,000 results a watcher may have waiting in memory
    tickets = [f"t{i:04d}" for i in range(n)]
    await put(store, *tickets)
    watch = store.watch(0)
    reader = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0.05)  # it has read the empty file and waits
    claimed = await store.queue.claim_batch(n, 1 << 30)
    for item in claimed:
        await store.queue.mark_rejected(item.ticket, "bad")
    results = [await reader, *await take(watch, n - 1)]
    assert [r.cursor for r in results] == list(range(1, n + 1))


def test_stored_answers_are_gzip_and_plain_json_is_read_too() -> None:
    body = answer(5)
    stored = encode_result(body)
    assert stored[:2] == b"\x1f\x8b"
    assert gzip.decompress(stored) == json.dumps(body, separators=(",", ":")).encode()
    outputs, _ = decode_result(stored)
    plain, _ = decode_result(json.dumps(body).encode())
    assert outputs["label"].tolist() == plain["label"].tolist() == [5]
    assert decode_result(None) == ({}, {})
