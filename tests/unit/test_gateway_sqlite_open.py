"""Gateway workers start together and open the same new SQLite files: each must open them.

SQLite does not call the busy handler when a connection switches a new file to WAL, so workers
opening a new state dir together used to get "database is locked" now and then (6 of 120 opens
in 30 starts of four workers); a worker failing at start-up makes uvicorn's supervisor stop the
whole gateway. Real processes (forked, to start in milliseconds) and real files.
"""

from __future__ import annotations

from pathlib import Path

from cloud_gateway.idempotency.sqlite_store import SqliteIdempotencyStore
from cloud_gateway.keys import KeyStore
from tests.support.together import run_together

WORKERS = 4
STARTS = 20


def open_stores(state: Path) -> None:
    KeyStore(state / "keys.sqlite3", connections=8).close()
    SqliteIdempotencyStore(state / "idempotency.sqlite3", connections=8)


def test_workers_opening_new_state_files_together_all_open_them(tmp_path: Path) -> None:
    assert run_together(open_stores, tmp_path, processes=WORKERS, times=STARTS) == []
