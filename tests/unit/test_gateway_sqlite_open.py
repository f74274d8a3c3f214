"""Gateway workers start together and open the same new SQLite files: each must open them.

SQLite does not call the busy handler when a connection switches a new file to WAL, so workers
opening a new state dir together used to get "database is locked" now and then (6 of 120 opens
in 30 starts of four workers); a worker failing at start-up makes uvicorn's supervisor stop the
whole gateway. Real processes (forked, to start in milliseconds) and real files.
"""

from __future__ import annotations

import multiprocessing
import traceback
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

from cloud_gateway.idempotency.sqlite_store import SqliteIdempotencyStore
from cloud_gateway.keys import KeyStore

WORKERS = 4
STARTS = 20


def open_stores(state: Path, barrier: Barrier, problems: Queue[str]) -> None:
    barrier.wait()
    try:
        KeyStore(state / "keys.sqlite3", connections=8).close()
        SqliteIdempotencyStore(state / "idempotency.sqlite3", connections=8)
    except Exception:
        problems.put(traceback.format_exc(limit=2))


def test_workers_opening_new_state_files_together_all_open_them(tmp_path: Path) -> None:
    fork = multiprocessing.get_context("fork")
    problems: Queue[str] = fork.Queue()
    for start in range(STARTS):
        state = tmp_path / str(start)
        state.mkdir()
        barrier = fork.Barrier(WORKERS)
        workers = [
            fork.Process(target=open_stores, args=(state, barrier, problems))
            for _ in range(WORKERS)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert [w.exitcode for w in workers] == [0] * WORKERS
    found = []
    while not problems.empty():
        found.append(problems.get())
    assert found == []
