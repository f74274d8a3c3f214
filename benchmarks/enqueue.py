"""Durable enqueue throughput: DurableQueue's group commit vs one commit per insert vs persist-queue.

Run from the repository root: `python -m benchmarks.enqueue [--concurrency 16] [--seconds 2]`.
Every configuration writes to a fresh SQLite file in WAL mode with synchronous=FULL (persist-queue:
WAL and SQLite's default, FULL), so every acknowledgement it counts is durable. Rounds interleave
the configurations so that load from elsewhere on the machine hits them alike; the median is shown,
with the process's CPU time per item: when the disk is busy, fsync's wait bounds every
configuration alike and items/s hides what the code costs; CPU per item does not.
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import persistqueue

from benchmarks._harness import Result, print_table, summarize
from router.durable_queue import DurableQueue
from router.queue_admission import INSERT
from router.queue_schema import QUEUE_MIGRATIONS
from router.sqlite_files import open_database


@dataclass(frozen=True)
class Load:
    concurrency: int
    seconds: float
    payload: bytes


async def in_tasks(
    load: Load, one: Callable[[int, int], Awaitable[object]]
) -> tuple[list[float], float]:
    """`concurrency` tasks each await `one(task, i)` in a loop for `seconds`: the latencies and
    the time elapsed."""
    latencies: list[float] = []
    stop = time.perf_counter() + load.seconds

    async def client(c: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await one(c, i)
            latencies.append(time.perf_counter() - t)
            i += 1

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(load.concurrency)))
    return latencies, time.perf_counter() - start


async def durable_queue(directory: Path, load: Load) -> Result:
    """`concurrency` tasks enqueue in a loop; each await returns after its commit is durable."""
    queue = await DurableQueue.open(directory / "durable.sqlite3")

    def enqueue(c: int, i: int) -> Awaitable[bool]:
        return queue.enqueue(f"c{c}-{i}", "digits", load.payload, ttl_s=3600)

    latencies, elapsed = await in_tasks(load, enqueue)
    per_commit = len(latencies) / max(1, queue.commits)
    await queue.close()
    name = f"DurableQueue enqueue, concurrency {load.concurrency} ({per_commit:.1f} per commit)"
    return Result(name, len(latencies), elapsed, latencies)


async def durable_queue_cycle(directory: Path, load: Load) -> Result:
    """The full life of an item, as persist-queue's put+get+ack: enqueue, claim, mark delivered."""
    queue = await DurableQueue.open(directory / "cycle.sqlite3")

    async def cycle(c: int, i: int) -> None:
        await queue.enqueue(f"c{c}-{i}", "digits", load.payload, ttl_s=3600)
        for item in await queue.claim_batch(1, len(load.payload)):
            await queue.mark_delivered(item.ticket, b"answer")

    latencies, elapsed = await in_tasks(load, cycle)
    await queue.close()
    return Result("DurableQueue enqueue+claim+deliver", len(latencies), elapsed, latencies)


def in_threads(name: str, load: Load, one: Callable[[int, int], None]) -> Result:
    """`concurrency` threads each call `one(thread, i)` in a plain loop for `seconds`."""
    latencies: list[float] = []
    stop = time.perf_counter() + load.seconds

    def loop(c: int) -> None:
        mine, i = [], 0
        while time.perf_counter() < stop:
            t = time.perf_counter()
            one(c, i)
            mine.append(time.perf_counter() - t)
            i += 1
        latencies.extend(mine)

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(load.concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Result(name, len(latencies), time.perf_counter() - start, latencies)


def _plain_connection(path: Path) -> sqlite3.Connection:
    """A connection to a fresh file with the queue's own schema and pragmas."""
    open_database(path, QUEUE_MIGRATIONS, now=time.time).connection.close()
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous = FULL")  # journal_mode=WAL is stored in the file
    return conn


def _row(load: Load, c: int, i: int) -> tuple[object, ...]:
    now = time.time()
    return (f"c{c}-{i}", "digits", 5, now, now + 3600, load.payload, len(load.payload), "")


def commit_per_insert(directory: Path, load: Load) -> Result:
    """The plain way: the queue's own schema and pragmas, one INSERT and one COMMIT per item.

    One shared connection behind a lock is the fastest form of it: a connection per thread adds
    SQLite's busy-wait sleeps on top of the same one-fsync-per-item cost.
    """
    conn = _plain_connection(directory / "plain.sqlite3")
    lock = threading.Lock()

    def insert(c: int, i: int) -> None:
        row = _row(load, c, i)
        with lock:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(INSERT, row)
            conn.execute("COMMIT")

    result = in_threads(
        f"sqlite3, one commit per insert, concurrency {load.concurrency}", load, insert
    )
    conn.close()
    return result


def rows_per_commit(directory: Path, load: Load) -> Result:
    """The ceiling of any group commit at this concurrency: one thread, no Python around it,
    `concurrency` rows per INSERT and COMMIT. Latencies are per commit; throughput counts rows."""
    conn = _plain_connection(directory / "ceiling.sqlite3")
    latencies: list[float] = []
    rows, stop = 0, time.perf_counter() + load.seconds
    start = time.perf_counter()
    while time.perf_counter() < stop:
        t = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT, [_row(load, c, rows) for c in range(load.concurrency)])
        conn.execute("COMMIT")
        latencies.append(time.perf_counter() - t)
        rows += load.concurrency
    elapsed = time.perf_counter() - start
    conn.close()
    name = f"sqlite3, {load.concurrency} rows per commit, one thread (the ceiling)"
    return Result(name, rows, elapsed, latencies)


async def hand_off_floor(directory: Path, load: Load) -> Result:
    """The floor of any group commit acknowledged to asyncio callers: the ceiling's SQL on a
    worker thread, fed as DurableQueue is (a future per caller, the callers of one group in a
    list under a lock, one job per group on a SimpleQueue) and answered with one
    call_soon_threadsafe per commit; no checks, no admission, no bookkeeping."""
    conn = _plain_connection(directory / "floor.sqlite3")
    loop = asyncio.get_running_loop()
    groups: queue.SimpleQueue[list[tuple[asyncio.Future[None], tuple[object, ...]]] | None]
    groups = queue.SimpleQueue()
    lock = threading.Lock()
    open_group: list[list[tuple[asyncio.Future[None], tuple[object, ...]]]] = []

    def settle(group: list[tuple[asyncio.Future[None], tuple[object, ...]]]) -> None:
        for future, _ in group:
            if not future.done():
                future.set_result(None)

    def writer() -> None:
        while (group := groups.get()) is not None:
            with lock:
                if open_group and open_group[0] is group:
                    open_group.clear()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT, [row for _, row in group])
            conn.execute("COMMIT")
            loop.call_soon_threadsafe(settle, group)

    def insert(c: int, i: int) -> asyncio.Future[None]:
        future = loop.create_future()
        with lock:
            if not open_group:
                open_group.append([])
                groups.put(open_group[0])
            open_group[0].append((future, _row(load, c, i)))
        return future

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        latencies, elapsed = await in_tasks(load, insert)
    finally:
        groups.put(None)
        await asyncio.to_thread(thread.join)
        conn.close()
    name = (
        f"the hand-off floor: the ceiling's SQL on a thread, asyncio callers, c{load.concurrency}"
    )
    return Result(name, len(latencies), elapsed, latencies)


async def asyncio_floor(directory: Path, load: Load) -> Result:
    """The hand-off floor without its thread: the same callers and SQL, each group committed by a
    callback on the event loop, which it blocks for the fsync. Not a design (the loop must not
    wait on the disk), a measure: the floor less this is what the writer thread costs."""
    conn = _plain_connection(directory / "inline.sqlite3")
    loop = asyncio.get_running_loop()
    group: list[tuple[asyncio.Future[None], tuple[object, ...]]] = []

    def commit() -> None:
        taken = group[:]
        group.clear()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT, [row for _, row in taken])
        conn.execute("COMMIT")
        for future, _ in taken:
            future.set_result(None)

    def insert(c: int, i: int) -> asyncio.Future[None]:
        future = loop.create_future()
        if not group:
            loop.call_soon(commit)
        group.append((future, _row(load, c, i)))
        return future

    try:
        latencies, elapsed = await in_tasks(load, insert)
    finally:
        conn.close()
    name = f"the floor without its thread: SQL inline on the event loop, c{load.concurrency}"
    return Result(name, len(latencies), elapsed, latencies)


def persist_queue(directory: Path, load: Load) -> Result:
    queue = persistqueue.SQLiteAckQueue(str(directory / "persist"), multithreading=True)

    def put_get_ack(c: int, i: int) -> None:
        queue.put(load.payload)
        item = queue.get(raw=True)
        queue.ack(id=item["pqid"])

    return in_threads("persist-queue SQLiteAckQueue put+get+ack", load, put_get_ack)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0, help="per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--payload-bytes", type=int, default=1024)
    args = parser.parse_args()
    load = Load(args.concurrency, args.seconds, b"\x5a" * args.payload_bytes)
    heavier = Load(4 * args.concurrency, args.seconds, load.payload)
    configurations: list[Callable[[Path], Result]] = [
        lambda d: commit_per_insert(d, load),
        lambda d: rows_per_commit(d, load),
        lambda d: asyncio.run(durable_queue(d, load)),
        lambda d: asyncio.run(hand_off_floor(d, load)),
        lambda d: asyncio.run(asyncio_floor(d, load)),
        lambda d: rows_per_commit(d, heavier),
        lambda d: asyncio.run(durable_queue(d, heavier)),
        lambda d: asyncio.run(durable_queue_cycle(d, load)),
        lambda d: persist_queue(d, load),
    ]
    runs: list[list[Result]] = [[] for _ in configurations]
    for _ in range(args.rounds):
        for runs_of, configuration in zip(runs, configurations, strict=True):
            with tempfile.TemporaryDirectory(prefix="bench-enqueue-", dir=".") as tmp:
                cpu = time.process_time()
                result = configuration(Path(tmp))
                runs_of.append(replace(result, server_cpu_s=time.process_time() - cpu))
    medians = [sorted(r, key=lambda x: x.throughput)[len(r) // 2] for r in runs]
    cpu_per_item = [statistics.median((x.server_cpu_s or 0.0) / x.calls for x in r) for r in runs]
    baseline = medians[0].throughput
    rows = []
    for result, cpu_s in zip(medians, cpu_per_item, strict=True):
        figures = summarize(result)
        del figures["server CPU µs/req"]
        rows.append(
            (
                result.name,
                figures
                | {"CPU µs/item": cpu_s * 1e6, "x one-commit": result.throughput / baseline},
            )
        )
    title = f"Durable enqueue, {args.payload_bytes} B payloads (median of {args.rounds} rounds)"
    print_table(title, rows)
    for what, at, (subject, ceiling) in (
        ("DurableQueue", load, (2, 1)),
        ("the hand-off floor", load, (3, 1)),
        ("the floor without its thread", load, (4, 1)),
        ("DurableQueue", heavier, (6, 5)),
    ):
        ratio = medians[subject].throughput / medians[ceiling].throughput
        cpu_ratio = cpu_per_item[ceiling] / cpu_per_item[subject]
        print(
            f"{what} ÷ the ceiling at concurrency {at.concurrency}: {ratio:.2f} in items/s, "
            f"{cpu_ratio:.2f} in items per CPU second"
            + (" (target >= 0.85)" if subject == 2 else "")
        )
    print(
        f"DurableQueue ÷ the hand-off floor at concurrency {load.concurrency}: "
        f"{cpu_per_item[3] / cpu_per_item[2]:.2f} in items per CPU second"
    )


if __name__ == "__main__":
    main()
