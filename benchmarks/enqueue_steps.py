"""What DurableQueue's enqueue costs per item beyond its SQL, step by step, each step timed alone.

Run from the repository root: `python -m benchmarks.enqueue_steps [--repeat 7]`. Each figure is
the best of `repeat` timings of the queue's own code for that step (so the least disturbed by
other work on the machine), per item, with 16 items to a group as at concurrency 16. The steps
timed alone add up to less than the queue's cost measured whole by benchmarks/enqueue.py: there
the two threads also take turns at the GIL and wake each other once per commit.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import tempfile
import threading
import time
import timeit
from collections.abc import Callable
from pathlib import Path

from model_runtime.encryption import Keyring
from router.clock import SystemClock
from router.queue_admission import INSERT, Admission, FullPolicy, GroupAdmission, check_enqueue
from router.queue_admission import _settle as settle_group
from router.queue_ledger import QueueLedger
from router.queue_schema import QUEUE_MIGRATIONS
from router.sqlite_files import SqliteWorker, open_database

GROUP = 16
PAYLOAD = b"\x5a" * 1024


def best_per_call(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Seconds per call of `fn`, the best of `repeat` runs of `number` calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def admissions(loop: asyncio.AbstractEventLoop, tag: int) -> list[Admission]:
    return [
        Admission(f"c{c}-{tag}", "digits", PAYLOAD, 5, 3600.0, "", loop.create_future())
        for c in range(GROUP)
    ]


def sql_and_python_of_a_group(repeat: int) -> tuple[float, float]:
    """Per item: the group's executemany alone, and GroupAdmission._admit_all around it (both in
    a transaction rolled back after each group, on a real file)."""
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory(prefix="bench-steps-", dir=".") as tmp:
        conn = open_database(Path(tmp) / "q.sqlite3", QUEUE_MIGRATIONS, now=time.time).connection
        ledger = QueueLedger(Keyring(), None)
        admission = GroupAdmission(SqliteWorker("unused"), ledger, SystemClock(), FullPolicy.REFUSE)
        groups = [admissions(loop, i) for i in range(64)]
        now = time.time()

        def bare(i: list[int] = [0]) -> None:  # noqa: B006 - a counter across calls
            group = groups[i[0] % len(groups)]
            i[0] += 1
            conn.execute("BEGIN")
            rows = [
                (a.ticket, a.model, a.priority, now, now + a.ttl_s, a.payload, len(a.payload), "")
                for a in group
            ]
            conn.executemany(INSERT, rows)
            conn.execute("ROLLBACK")

        def queue_code(i: list[int] = [0]) -> None:  # noqa: B006 - a counter across calls
            group = groups[i[0] % len(groups)]
            i[0] += 1
            conn.execute("BEGIN")
            admission._admit_all(conn, group, now)
            conn.execute("ROLLBACK")

        sql = best_per_call(bare, 2000, repeat) / GROUP
        whole = best_per_call(queue_code, 2000, repeat) / GROUP
        conn.close()
    loop.close()
    return sql, whole - sql


async def hand_back(rounds: int) -> float:
    """CPU per item of the asyncio side alone: 16 tasks each await a future of their own, all
    resolved from one callback per group, as the queue answers its callers."""
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future[bool]] = []

    async def caller() -> None:
        for _ in range(rounds):
            future = loop.create_future()
            waiting.append(future)
            await future

    async def resolver() -> None:
        while True:
            await asyncio.sleep(0)
            group, waiting[:] = waiting[:], []
            for future in group:
                future.set_result(True)

    resolving = asyncio.ensure_future(resolver())
    cpu = time.process_time()
    await asyncio.gather(*(caller() for _ in range(GROUP)))
    cpu = time.process_time() - cpu
    resolving.cancel()
    return cpu / (GROUP * rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    n, r = 100_000, args.repeat
    loop = asyncio.new_event_loop()
    lock = threading.Lock()
    group: list[object] = []

    future: asyncio.Future[bool] = loop.create_future()  # its making is in the hand-back below

    def join_step() -> None:  # GroupAdmission.join's own work, the worker's submit left out
        admission = Admission("c3-1234", "digits", PAYLOAD, 5, 3600.0, "", future)
        with lock:
            group.append(admission)
            if len(group) == GROUP:
                group.clear()

    settle_batch = admissions(loop, 0)

    def settle_step() -> None:
        for a in settle_batch:
            a.future = loop.create_future()
        settle_group(settle_batch, done)

    def bare_settle_step() -> None:  # what any design does: a future made and resolved
        for a in settle_batch:
            a.future = loop.create_future()
        for a in settle_batch:
            a.future.set_result(True)

    done: asyncio.Future[None] = loop.create_future()
    done.set_result(None)
    sql, admit_python = sql_and_python_of_a_group(r)
    steps = [
        (
            "argument checks (check_enqueue)",
            best_per_call(
                functools.partial(check_enqueue, "c3-1234", "digits", PAYLOAD, 5, 3600, "", 10),
                n,
                r,
            ),
        ),
        ("future + Admission + lock + append (GroupAdmission.join)", best_per_call(join_step, n, r)),
        ("GroupAdmission._admit_all beyond its executemany", admit_python),
        ("_settle beyond set_result", (best_per_call(settle_step, n // 16, r) - best_per_call(bare_settle_step, n // 16, r)) / GROUP),
        ("the asyncio hand-back: a future made, awaited, resolved, its task resumed", loop.run_until_complete(hand_back(20_000))),
        ("for scale: the group's executemany of 16 rows, per row", sql),
    ]  # fmt: skip
    loop.close()
    print(f"### DurableQueue enqueue, its own steps timed alone (best of {r}, µs per item)\n")
    print("| step | µs per item |\n|---|---|")
    for name, seconds in steps:
        print(f"| {name} | {seconds * 1e6:.2f} |")
    own = sum(s for _, s in steps[:-2])
    print(f"\nThe queue's own steps (the first four): {own * 1e6:.2f} µs per item in all.")


if __name__ == "__main__":
    main()
