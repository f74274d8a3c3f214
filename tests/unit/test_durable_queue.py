"""DurableQueue on real SQLite files: order, ageing, TTL, the disk cap, group commit, crashes, quarantine."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from model_runtime.fault_points import Action, FaultPlan, sqlite_error
from router.clock import FakeClock
from router.config import FAULT_POINTS
from router.durable_queue import ROW_OVERHEAD_BYTES, DurableQueue, FullPolicy, ItemState, ItemStatus
from router.errors import DiskFull, QueueFull, QueueSchemaTooNew, StorageError, TicketNotFound
from router.queue_schema import QUEUE_MIGRATIONS
from router.sqlite_files import SqliteWorker, WriteHooks, open_database

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "queue.sqlite3"


@pytest.fixture
async def queue(path: Path, clock: FakeClock) -> AsyncIterator[DurableQueue]:
    q = await DurableQueue.open(path, clock=clock, ageing_s=None)
    yield q
    await q.close()


async def put(
    q: DurableQueue, ticket: str, priority: int = 5, ttl_s: float = 3600, size: int = 10
) -> None:
    assert await q.enqueue(
        ticket, "digits", ticket.encode().ljust(size, b"."), priority=priority, ttl_s=ttl_s
    )


def read(p: Path) -> bytes:
    return p.read_bytes()


def write(p: Path, data: bytes) -> None:
    p.write_bytes(data)


async def drain(q: DurableQueue) -> list[str]:
    return [item.ticket for item in await q.claim_batch(1000, 10**9)]


# -- order ------------------------------------------------------------------------------------


async def test_most_urgent_level_first_then_oldest(queue: DurableQueue, clock: FakeClock) -> None:
    # Triton's order: level 1 is the most urgent, 10 the least
    for ticket, priority in [("a", 9), ("b", 3), ("c", 9), ("d", 3), ("e", 1), ("f", 10)]:
        await put(queue, ticket, priority)
        clock.advance(1)
    assert await drain(queue) == ["e", "b", "d", "a", "c", "f"]
    assert await drain(queue) == []  # all in flight now


async def test_claim_respects_max_items_and_max_bytes(queue: DurableQueue) -> None:
    for ticket in "abcde":
        await put(queue, ticket, size=100)
    assert [i.ticket for i in await queue.claim_batch(2, 10**6)] == ["a", "b"]
    assert [i.ticket for i in await queue.claim_batch(10, 250)] == ["c", "d"]
    # An item bigger than max_bytes still goes, alone, or it would never go.
    assert [i.ticket for i in await queue.claim_batch(10, 1)] == ["e"]


async def test_claimed_item_carries_what_was_enqueued(queue: DurableQueue) -> None:
    assert await queue.enqueue("req-1", "digits", b"\x00\x01body", priority=3, ttl_s=60)
    (item,) = await queue.claim_batch(1, 100)
    assert (item.ticket, item.model, item.payload, item.priority) == (
        "req-1",
        "digits",
        b"\x00\x01body",
        3,
    )
    # attempts: deliveries tried, this one included
    assert (item.enqueued_at, item.expires_at, item.attempts) == (T0, T0 + 60, 1)


async def test_ageing_lets_old_low_priority_items_overtake(path: Path, clock: FakeClock) -> None:
    q = await DurableQueue.open(path, clock=clock, ageing_s=60)
    try:
        await put(q, "old-low", priority=8)
        clock.advance(5 * 60)  # waited five levels: effective 3
        await put(q, "new-4", priority=4)
        await put(q, "new-3", priority=3)
        await put(q, "new-2", priority=2)
        # 2 before 3 (old, ties with new-3 but older) before new-3 before new-4
        assert await drain(q) == ["new-2", "old-low", "new-3", "new-4"]
    finally:
        await q.close()


async def test_a_queue_written_under_the_old_priorities_is_migrated_in_order(
    path: Path, clock: FakeClock
) -> None:
    # Schema version 1 stored 0-9 with 9 the most urgent; Triton's 1 is the most urgent.
    old = open_database(path, QUEUE_MIGRATIONS[:1], now=clock.wall).connection
    with closing(old):
        for seq, old_priority in enumerate([0, 9, 5, 3, 9, 7]):
            old.execute(
                "INSERT INTO items (ticket, model, priority, enqueued_at, expires_at, state,"
                " payload, payload_bytes) VALUES (?, 'digits', ?, ?, ?, 'pending', x'00', 1)",
                (f"old-{old_priority}-{seq}", old_priority, T0 + seq, T0 + 3600),
            )
    q = await DurableQueue.open(path, clock=clock, ageing_s=None)
    try:
        items = await q.claim_batch(100, 10**6)
        assert [(i.ticket, i.priority) for i in items] == [
            ("old-9-1", 1),
            ("old-9-4", 1),
            ("old-7-5", 3),
            ("old-5-2", 5),  # the old default is the new default
            ("old-3-3", 7),
            ("old-0-0", 10),
        ]
    finally:
        await q.close()
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(QUEUE_MIGRATIONS)


async def test_items_beyond_fewer_levels_wait_at_the_least_urgent_one(
    path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    q = await DurableQueue.open(path, clock=clock)
    try:
        await put(q, "at-2", priority=2)
        await put(q, "at-8", priority=8)
    finally:
        await q.close()
    q = await DurableQueue.open(path, clock=clock, priority_levels=3)
    try:
        assert (
            "1 queued item(s) waited at priority levels beyond priority_levels = 3" in caplog.text
        )
        assert (await q.get("at-8")).priority == 3
        assert (await q.stats()).depth_by_priority == {1: 0, 2: 1, 3: 1}
        with pytest.raises(ValueError, match=r"^priority: must be 1..3, got 4"):
            await put(q, "at-4", priority=4)
    finally:
        await q.close()


# -- TTL and end states -----------------------------------------------------------------------


async def test_ttl_expires_pending_items_and_records_it(path: Path, clock: FakeClock) -> None:
    ended: list[ItemStatus] = []
    q = await DurableQueue.open(path, clock=clock, on_end=ended.extend)
    try:
        await put(q, "short", ttl_s=10)
        await put(q, "long", ttl_s=1000)
        clock.advance(10)
        assert await q.expire_due() == ["short"]
        assert [(s.ticket, s.state) for s in ended] == [("short", ItemState.EXPIRED)]
        status = await q.get("short")
        assert (status.state, status.finished_at, status.result) == (
            ItemState.EXPIRED,
            T0 + 10,
            None,
        )
        assert await drain(q) == ["long"]
        assert (await q.stats()).ended == {
            "delivered": 0,
            "expired": 1,
            "dropped": 0,
            "rejected": 0,
        }
    finally:
        await q.close()


async def test_an_expired_item_says_why(queue: DurableQueue, clock: FakeClock) -> None:
    await put(queue, "tried", ttl_s=60)
    await put(queue, "never-tried", ttl_s=30)
    clock.advance(1)
    (item,) = await queue.claim_batch(1, 100)
    assert item.ticket == "tried"
    await queue.release("tried", "cloud unreachable: ConnectError")
    clock.advance(60)
    assert sorted(await queue.expire_due()) == ["never-tried", "tried"]
    assert (await queue.get("never-tried")).last_error == (
        "expired: its ttl of 30 s passed before it could be delivered (no attempt)"
    )
    assert (await queue.get("tried")).last_error == (
        "expired: its ttl of 60 s passed before it could be delivered (1 attempt(s);"
        " the last: cloud unreachable: ConnectError)"
    )


async def test_claim_never_hands_out_an_expired_item(queue: DurableQueue, clock: FakeClock) -> None:
    await put(queue, "a", ttl_s=5)
    clock.advance(6)
    assert await drain(queue) == []
    assert (await queue.get("a")).state is ItemState.EXPIRED


async def test_delivery_stores_the_result_once(queue: DurableQueue, clock: FakeClock) -> None:
    await put(queue, "a")
    await put(queue, "b")
    assert await drain(queue) == ["a", "b"]
    clock.advance(2)
    assert await queue.mark_delivered("a", b"cloud answer")
    assert not await queue.mark_delivered("a", b"again")  # a redelivery changes nothing
    status = await queue.get("a")
    assert (status.state, status.result, status.finished_at) == (
        ItemState.DELIVERED,
        b"cloud answer",
        T0 + 2,
    )
    assert (await queue.get("b")).state is ItemState.IN_FLIGHT
    with pytest.raises(TicketNotFound):
        await queue.mark_delivered("nope", b"")
    with pytest.raises(TicketNotFound):
        await queue.get("nope")


async def test_release_puts_an_item_back_counting_the_delivery_tried(queue: DurableQueue) -> None:
    await put(queue, "a")
    assert (await queue.get("a")).attempts == 0
    await drain(queue)
    assert await queue.release("a", "503 from the cloud")
    assert not await queue.release("a", "not in flight any more")
    status = await queue.get("a")
    assert (status.state, status.attempts, status.last_error) == (
        ItemState.PENDING,
        1,
        "503 from the cloud",
    )
    (item,) = await queue.claim_batch(1, 100)
    assert item.attempts == 2
    await queue.mark_delivered("a", b"A")
    assert (await queue.get("a")).attempts == 2
    with pytest.raises(TicketNotFound):
        await queue.release("nope", "x")


async def test_a_claim_released_unsent_is_not_an_attempt(queue: DurableQueue) -> None:
    await put(queue, "a")
    await drain(queue)
    assert await queue.release("a", "not sent: link down", sent=False)
    assert (await queue.get("a")).attempts == 0
    (item,) = await queue.claim_batch(1, 100)
    assert item.attempts == 1


async def test_a_request_the_cloud_refuses_ends_rejected(queue: DurableQueue) -> None:
    await put(queue, "bad")
    await drain(queue)
    assert await queue.mark_rejected("bad", "422: input shape [1, 3] does not fit")
    assert not await queue.mark_delivered("bad", b"late answer")  # an end is final
    status = await queue.get("bad")
    assert (status.state, status.last_error, status.result) == (
        ItemState.REJECTED,
        "422: input shape [1, 3] does not fit",
        None,
    )
    assert (await queue.stats()).ended["rejected"] == 1
    with pytest.raises(TicketNotFound):
        await queue.mark_rejected("nope", "x")


async def test_results_after_a_cursor_resume_in_end_order(
    queue: DurableQueue, clock: FakeClock
) -> None:
    for ticket in "abc":
        await put(queue, ticket, ttl_s=100 if ticket == "b" else 10_000)
    await drain(queue)
    await queue.mark_delivered("c", b"C")
    await queue.mark_delivered("a", b"A")
    first = await queue.results_after(0)
    assert [(s.ticket, s.result) for s in first] == [("c", b"C"), ("a", b"A")]
    assert await queue.results_after(first[-1].end_seq or 0) == []


async def test_purge_removes_old_finished_rows_only(queue: DurableQueue, clock: FakeClock) -> None:
    await put(queue, "done", size=1000)
    await put(queue, "waiting", size=1000)
    await queue.claim_batch(1, 10**6)
    await queue.mark_delivered("done", b"R" * 50)
    assert queue.used_bytes == ROW_OVERHEAD_BYTES + 1000 + 50
    clock.advance(3600)
    assert await queue.purge(older_than_s=7200) == 0
    assert await queue.purge(older_than_s=1800) == 1
    with pytest.raises(TicketNotFound):
        await queue.get("done")
    assert (await queue.get("waiting")).state is ItemState.PENDING
    assert queue.used_bytes == ROW_OVERHEAD_BYTES + 1000


async def test_duplicate_ticket_is_stored_once(queue: DurableQueue) -> None:
    await put(queue, "same")
    assert not await queue.enqueue("same", "digits", b"other", ttl_s=60)
    results = await asyncio.gather(
        *(queue.enqueue("twin", "digits", b"x", ttl_s=60) for _ in range(5))
    )
    assert sorted(results) == [False, False, False, False, True]
    assert await drain(queue) == ["same", "twin"]


async def test_known_tickets_within_a_group_of_new_ones_are_told_apart(
    queue: DurableQueue,
) -> None:
    await put(queue, "old-1")
    await put(queue, "old-2")
    used, commits = queue.used_bytes, queue.commits
    tickets = ["new-1", "old-1", "new-2", "new-1", "old-2", "new-3"]
    results = await asyncio.gather(
        *(queue.enqueue(t, "digits", b"x" * 100, ttl_s=60) for t in tickets)
    )
    assert queue.commits == commits + 1  # one group
    # The new tickets are stored; the known ones and the repeat are not, and keep their payload.
    assert results == [True, False, True, False, False, True]
    assert queue.used_bytes == used + 3 * (100 + ROW_OVERHEAD_BYTES)
    items = await queue.claim_batch(1000, 10**9)
    assert [i.ticket for i in items] == ["old-1", "old-2", "new-1", "new-2", "new-3"]
    assert items[0].payload == b"old-1....."


# -- the disk cap -----------------------------------------------------------------------------

ITEM = 1000 + ROW_OVERHEAD_BYTES  # what one put(..., size=1000) accounts for


async def test_refuse_policy_raises_queue_full_and_counts_it(path: Path, clock: FakeClock) -> None:
    q = await DurableQueue.open(
        path, clock=clock, cap_bytes=3 * ITEM, full_policy=FullPolicy.REFUSE
    )
    try:
        for ticket in "abc":
            await put(q, ticket, size=1000)
        with pytest.raises(QueueFull) as caught:
            await put(q, "d", priority=9, size=1000)
        assert (caught.value.used_bytes, caught.value.cap_bytes) == (3 * ITEM, 3 * ITEM)
        with pytest.raises(TicketNotFound):
            await q.get("d")
        stats = await q.stats()
        assert (
            stats.used_bytes,
            stats.admission_rejected,
            sum(stats.depth_by_priority.values()),
        ) == (3 * ITEM, 1, 3)
    finally:
        await q.close()
    reopened = await DurableQueue.open(path, clock=clock)
    try:
        assert (await reopened.stats()).admission_rejected == 1  # the count is durable too
    finally:
        await reopened.close()


async def test_drop_policy_drops_lowest_priority_oldest_first(path: Path, clock: FakeClock) -> None:
    ended: list[ItemStatus] = []
    q = await DurableQueue.open(
        path,
        clock=clock,
        cap_bytes=4 * ITEM,
        full_policy=FullPolicy.DROP_OLDEST_LOWEST,
        on_end=ended.extend,
    )
    try:
        # levels as Triton numbers them: 1 is the most urgent
        for ticket, priority in [("p5-old", 5), ("p8-old", 8), ("p8-new", 8), ("p2", 2)]:
            await put(q, ticket, priority, size=1000)
            clock.advance(1)
        await put(q, "new-1", priority=4, size=1000)
        await put(q, "new-2", priority=4, size=1000)
        assert [(s.ticket, s.state) for s in ended] == [
            ("p8-old", ItemState.DROPPED),
            ("p8-new", ItemState.DROPPED),
        ]
        why = (await q.get("p8-old")).last_error
        assert why is not None
        assert "dropped by the full-queue policy (drop_oldest_lowest)" in why
        assert f"cap of {4 * ITEM} bytes" in why
        assert "priority 4" in why
        # A new less urgent item may not push out more urgent ones: it is refused instead.
        with pytest.raises(QueueFull):
            await put(q, "new-10", priority=10, size=1000)
        # Two drops can make room for one big item.
        await put(q, "big", priority=1, size=1000 + ITEM)
        assert (await q.get("p5-old")).state is ItemState.DROPPED
        assert (await q.get("new-1")).state is ItemState.DROPPED
        assert await drain(q) == ["big", "p2", "new-2"]
        stats = await q.stats()
        assert stats.ended == {"delivered": 0, "expired": 0, "dropped": 4, "rejected": 0}
        assert stats.admission_rejected == 1
        assert stats.used_bytes == 4 * ITEM
    finally:
        await q.close()


async def test_an_item_bigger_than_the_cap_is_refused_under_either_policy(
    path: Path, clock: FakeClock
) -> None:
    q = await DurableQueue.open(
        path, clock=clock, cap_bytes=ITEM, full_policy=FullPolicy.DROP_OLDEST_LOWEST
    )
    try:
        with pytest.raises(QueueFull):
            await put(q, "huge", size=ITEM)
        assert q.used_bytes == 0
    finally:
        await q.close()


# -- group commit and durability --------------------------------------------------------------


async def test_concurrent_enqueues_share_commits(queue: DurableQueue) -> None:
    before = queue.commits
    await asyncio.gather(*(put(queue, f"t{i}") for i in range(64)))
    commits = queue.commits - before
    assert 1 <= commits <= 4, f"64 concurrent enqueues took {commits} commits"
    assert sum((await queue.stats()).depth_by_priority.values()) == 64


async def test_file_is_wal_with_synchronous_full(queue: DurableQueue, path: Path) -> None:
    await put(queue, "a")
    assert read(Path(f"{path}-wal"))
    assert (
        await queue._worker.call(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2
    )  # FULL
    with closing(sqlite3.connect(path)) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


CHILD = """
import asyncio, sys
from pathlib import Path
from router.durable_queue import DurableQueue

async def client(q, c):
    i = 0
    while True:
        ticket = f"{sys.argv[2]}-c{c}-{i}"
        await q.enqueue(ticket, "digits", b"x" * 200, ttl_s=3600)
        print(ticket, flush=True)
        i += 1

async def main():
    q = await DurableQueue.open(Path(sys.argv[1]))
    await asyncio.gather(*(client(q, c) for c in range(8)))

asyncio.run(main())
"""


def read_acks(process: subprocess.Popen[bytes], want: int, timeout: float) -> list[str]:
    assert process.stdout is not None
    acks: list[str] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    while len(acks) < want:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(acks)} acks after {timeout}s"
        ready, _, _ = select.select([process.stdout], [], [], left)
        if ready:
            chunk = os.read(process.stdout.fileno(), 65536)
            assert chunk, "the child exited early"
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            acks += [line.decode() for line in lines]
    return acks


def test_every_acknowledged_enqueue_survives_sigkill(path: Path, tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    acked: list[str] = []
    for run in ("first", "second"):  # the second run appends to the file the first one left
        command = [sys.executable, str(script), str(path), run]
        with subprocess.Popen(command, stdout=subprocess.PIPE) as process:
            try:
                acked += read_acks(process, 300, timeout=30)
            finally:
                process.send_signal(signal.SIGKILL)  # right after the acks, mid-stream
                process.wait(timeout=10)
        assert process.returncode == -signal.SIGKILL
        assert Path(f"{path}-wal").exists()  # left by the killed writer, not checkpointed

    async def reopen() -> tuple[list[Path], set[str]]:
        # The first to open the file after the kill is the queue itself, as in a real restart.
        q = await DurableQueue.open(path)
        try:
            found = await asyncio.gather(*(q.get(t) for t in acked), return_exceptions=True)
            return q.quarantined, {s.ticket for s in found if isinstance(s, ItemStatus)}
        finally:
            await q.close()

    quarantined, stored = asyncio.run(reopen())
    assert quarantined == []
    assert len(acked) == len(set(acked)) >= 600
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} acknowledged items lost, e.g. {sorted(missing)[:5]}"


async def test_in_flight_items_are_pending_again_after_a_restart(
    path: Path, clock: FakeClock
) -> None:
    q = await DurableQueue.open(path, clock=clock)
    await put(q, "a")
    await put(q, "b")
    assert await drain(q) == ["a", "b"]
    await q.mark_delivered("a", b"A")
    await q.close()  # "b" was never released: as if the process had died mid-send

    q = await DurableQueue.open(path, clock=clock)
    try:
        status = await q.get("b")
        assert (status.state, status.attempts, status.last_error) == (
            ItemState.PENDING,
            1,
            "interrupted by restart",
        )
        assert await drain(q) == ["b"]
        assert (await q.get("a")).state is ItemState.DELIVERED
    finally:
        await q.close()


async def test_an_expired_lease_makes_an_item_claimable_again(path: Path, clock: FakeClock) -> None:
    q = await DurableQueue.open(path, clock=clock, lease_s=30)
    try:
        await put(q, "a")
        assert await drain(q) == ["a"]
        clock.advance(29)
        assert await drain(q) == []
        clock.advance(1)
        (item,) = await q.claim_batch(10, 10**6)
        assert (item.ticket, item.attempts) == ("a", 2)  # the lost lease may have reached it
    finally:
        await q.close()


# -- the writer thread ------------------------------------------------------------------------


@pytest.fixture
async def worker(path: Path) -> AsyncIterator[tuple[SqliteWorker, list[str]]]:
    events: list[str] = []
    w = SqliteWorker("test", on_commit=lambda: events.append("commit"))
    w.on_rollback = lambda conn: events.append("rollback")
    await w.start(lambda: open_database(path, [("CREATE TABLE t (x TEXT)",)], now=time.time))
    yield w, events
    await w.close()


def insert(x: str, then_fail: bool = False) -> Callable[[sqlite3.Connection], None]:
    def job(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (?)", (x,))
        if then_fail:
            raise LookupError(x)

    return job


def rows(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT x FROM t ORDER BY x")]


async def test_a_failing_job_is_undone_alone_within_its_group(
    worker: tuple[SqliteWorker, list[str]],
) -> None:
    w, events = worker
    results = await asyncio.gather(
        w.call(insert("a")), w.call(insert("b", then_fail=True)), w.call(insert("c")),
        return_exceptions=True,
    )  # fmt: skip
    assert [type(r).__name__ for r in results] == ["NoneType", "LookupError", "NoneType"]
    assert await w.call(rows) == ["a", "c"]
    assert (w.commits, events) == (1, ["commit", "commit"])  # the read wrote nothing
    with pytest.raises(LookupError):
        await w.call(insert("d", then_fail=True))  # alone in its group
    assert await w.call(rows) == ["a", "c"]
    assert w.commits == 1


async def test_a_group_sqlite_aborted_fails_whole_and_resyncs(
    worker: tuple[SqliteWorker, list[str]],
) -> None:
    w, events = worker

    def abort(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")  # as SQLite itself does on a full disk or an I/O error
        raise sqlite_error(Action.ENOSPC)  # "database or disk is full", SQLITE_FULL

    results = await asyncio.gather(w.call(insert("a")), w.call(abort), return_exceptions=True)
    assert [type(r) for r in results] == [DiskFull] * 2
    assert all(r.problem == "database or disk is full" for r in results)
    assert await w.call(rows) == []
    assert events[0] == "rollback"


async def test_the_kth_commit_fails_with_an_injected_io_error_and_the_next_one_works(
    path: Path,
) -> None:
    failures: list[StorageError] = []
    plan = FaultPlan.parse("queue.commit:2:eio", FAULT_POINTS)
    w = SqliteWorker("test", store="queue", hooks=WriteHooks(failures.append, plan))
    await w.start(lambda: open_database(path, [("CREATE TABLE t (x TEXT)",)], now=time.time))
    try:
        await w.call(insert("a"))
        assert await w.call(rows) == ["a"]  # a read is not a commit that wrote: not counted
        with pytest.raises(StorageError) as failed:
            await w.call(insert("b"))
        assert type(failed.value) is StorageError  # not DiskFull: an I/O error
        assert (failed.value.store, failed.value.kind) == ("queue", "io_error")
        assert "disk I/O error" in str(failed.value)
        await w.call(insert("c"))
        assert await w.call(rows) == ["a", "c"]
        assert failures == [failed.value]
    finally:
        await w.close()


async def test_a_persistent_full_disk_fails_every_write_until_the_fault_ends(path: Path) -> None:
    plan = FaultPlan.parse("queue.commit:2-3:enospc", FAULT_POINTS)
    q = await DurableQueue.open(path, clock=FakeClock(T0), hooks=WriteHooks(faults=plan))
    try:
        await put(q, "a")
        for ticket in ("b", "c"):
            with pytest.raises(DiskFull, match="queue file could not be written"):
                await put(q, ticket)
        await put(q, "d")
        # nothing of the failed enqueues was kept, on disk or in the mirror of its bytes
        assert q.used_bytes == 2 * (10 + ROW_OVERHEAD_BYTES)
        assert await drain(q) == ["a", "d"]
    finally:
        await q.close()


async def test_a_failing_disk_that_fails_the_rollback_too_leaves_the_worker_running(
    path: Path,
) -> None:
    def resync(conn: sqlite3.Connection) -> None:
        raise sqlite_error(Action.EIO)  # the owner's re-read fails on the same bad disk

    plan = FaultPlan.parse("queue.commit:1:eio", FAULT_POINTS)
    w = SqliteWorker("test", store="queue", on_rollback=resync, hooks=WriteHooks(faults=plan))
    await w.start(lambda: open_database(path, [("CREATE TABLE t (x TEXT)",)], now=time.time))
    try:
        with pytest.raises(StorageError):
            await w.call(insert("a"))
        await w.call(insert("b"))  # the thread lives on, and the next write goes through
        assert await w.call(rows) == ["b"]
    finally:
        await w.close()


# -- corrupt and foreign files ----------------------------------------------------------------


async def test_garbage_file_is_quarantined_and_a_fresh_queue_works(
    path: Path, clock: FakeClock
) -> None:
    garbage = b"\x00garbage, not SQLite\xff" * 512
    write(path, garbage)
    write(Path(f"{path}-wal"), b"stale wal")
    q = await DurableQueue.open(path, clock=clock)
    try:
        moved = path.with_name("queue.sqlite3.corrupt-20231114T221320Z")
        assert q.quarantined == [moved]
        assert "not a database" in q.quarantine_problem
        assert read(moved) == garbage  # kept byte for byte, never deleted
        assert read(Path(f"{moved}-wal")) == b"stale wal"
        await put(q, "after")
        assert await drain(q) == ["after"]
    finally:
        await q.close()


async def test_damaged_pages_fail_quick_check_and_are_quarantined(
    path: Path, clock: FakeClock
) -> None:
    q = await DurableQueue.open(path, clock=clock)
    for i in range(200):
        await put(q, f"t{i}", size=500)
    await q.close()  # the last connection checkpoints the WAL into the file
    data = bytearray(read(path))
    page = 4096
    data[3 * page : 6 * page] = os.urandom(3 * page)  # the header stays valid, the b-trees do not
    write(path, bytes(data))

    q = await DurableQueue.open(path, clock=clock)
    try:
        assert len(q.quarantined) == 1
        assert q.quarantine_problem.startswith("quick_check: ")
        assert read(q.quarantined[0]) == bytes(data)
        assert (await q.stats()).depth_by_priority[5] == 0
        await put(q, "fresh")
        assert await drain(q) == ["fresh"]
    finally:
        await q.close()
    # A second corrupt file the same second gets its own name.
    write(path, b"junk" * 100)
    q = await DurableQueue.open(path, clock=clock)
    await q.close()
    assert sorted(
        p.name for p in path.parent.glob("*.corrupt-*") if not p.name.endswith(("-wal", "-shm"))
    ) == [
        "queue.sqlite3.corrupt-20231114T221320Z",
        "queue.sqlite3.corrupt-20231114T221320Z.1",
    ]


async def test_a_newer_schema_is_refused_and_left_alone(path: Path, clock: FakeClock) -> None:
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 99")
    before = read(path)
    with pytest.raises(QueueSchemaTooNew, match="schema version 99"):
        await DurableQueue.open(path, clock=clock)
    assert read(path) == before
    assert not list(path.parent.glob("*.corrupt-*"))


# -- bad input and stats ----------------------------------------------------------------------

BAD: Sequence[tuple[dict[str, Any], str]] = [
    ({"ticket": ""}, "ticket"),
    ({"ticket": "has space"}, "ticket"),
    ({"ticket": "x" * 129}, "ticket"),
    ({"model": ""}, "model"),
    ({"payload": "text"}, "payload"),
    ({"priority": 11}, "priority"),
    ({"priority": 0}, "priority"),  # the queue stores levels; 0 is resolved by CallerWishes
    ({"priority": True}, "priority"),
    ({"ttl_s": 0}, "ttl_s"),
    ({"ttl_s": float("nan")}, "ttl_s"),
]


@pytest.mark.parametrize(
    ("override", "field"), BAD, ids=[f"{b[1]}={next(iter(b[0].values()))!r}"[:30] for b in BAD]
)
async def test_bad_input_names_the_field_and_stores_nothing(
    queue: DurableQueue, override: dict[str, Any], field: str
) -> None:
    args: dict[str, Any] = {
        "ticket": "ok",
        "model": "digits",
        "payload": b"x",
        "priority": 5,
        "ttl_s": 60,
    }
    with pytest.raises(ValueError, match=f"^{field}:"):
        await queue.enqueue(**(args | override))
    assert queue.commits == 0
    assert (await queue.stats()).depth_by_priority == dict.fromkeys(range(1, 11), 0)


async def test_bad_claims_and_closed_queues_are_refused(queue: DurableQueue) -> None:
    with pytest.raises(ValueError, match="max_items"):
        await queue.claim_batch(0, 100)
    await queue.close()
    with pytest.raises(RuntimeError, match="not running"):
        await queue.enqueue("late", "digits", b"x", ttl_s=60)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("cap_bytes", -1),
        ("ageing_s", -5.0),
        ("lease_s", 0),
        ("full_policy", "evict"),
        ("priority_levels", 0),
        ("priority_levels", 33),
    ],
)
def test_bad_options_are_refused(path: Path, option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option if option != "full_policy" else "evict"):
        DurableQueue(path, **{option: value})


async def test_stats_report_depth_bytes_and_age(queue: DurableQueue, clock: FakeClock) -> None:
    await put(queue, "a", priority=9, size=100)
    clock.advance(30)
    await put(queue, "b", priority=1, size=200)
    await put(queue, "c", priority=1, size=300)
    await queue.claim_batch(1, 10**6)  # "b" in flight
    clock.advance(10)
    stats = await queue.stats()
    assert stats.depth_by_priority == {p: {9: 1, 1: 2}.get(p, 0) for p in range(1, 11)}
    assert (stats.in_flight, stats.waiting_payload_bytes) == (1, 600)
    assert stats.oldest_pending_age_s == 40
    assert stats.used_bytes == 600 + 3 * ROW_OVERHEAD_BYTES
    assert stats.file_bytes > 0


async def test_a_large_answer_makes_room_under_the_cap_by_ending_old_results_early(
    path: Path, clock: FakeClock
) -> None:
    # Found by tests/unit/test_durable_queue_model.py (issue 13): an answer larger than its
    # request took the queue's accounted bytes over cap_bytes.
    q = await DurableQueue.open(path, clock=clock, cap_bytes=2000, ageing_s=None)
    try:
        for ticket in ("old", "new", "big"):
            await put(q, ticket, size=10)
        for ticket, answer in (("old", 600), ("new", 600)):
            await q.claim_batch(1, 100)
            assert await q.mark_delivered(ticket, b"a" * answer)
            clock.advance(1)
        await q.claim_batch(1, 100)
        assert await q.mark_delivered("big", b"b" * 1000)  # 600 + 600 + 1000 > 2000
        assert q.used_bytes <= 2000
        with pytest.raises(TicketNotFound):
            await q.get("old")  # the oldest ended item went first, as a purge would take it
        assert (await q.get("new")).result == b"a" * 600
        assert (await q.get("big")).result == b"b" * 1000
        assert (await q.stats()).results_evicted == 1
    finally:
        await q.close()


async def test_an_answer_that_cannot_fit_under_the_cap_is_not_kept_and_says_so(
    path: Path, clock: FakeClock
) -> None:
    q = await DurableQueue.open(path, clock=clock, cap_bytes=1500, ageing_s=None)
    try:
        await put(q, "t", size=0)
        await q.claim_batch(1, 100)
        assert await q.mark_delivered("t", b"r" * 1501)
        status = await q.get("t")
        assert status.state is ItemState.DELIVERED
        assert status.result is None
        assert status.last_error is not None
        assert "was not kept" in status.last_error
        assert q.used_bytes <= 1500
    finally:
        await q.close()
