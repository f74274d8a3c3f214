"""SQLite connections shared by the worker threads that run the gateway's blocking queries, and
opened in WAL mode even when the workers open a new file together.

A connection is taken for one job and given back, whichever thread ran it. One connection per
thread (thread-local) leaked: the thread pool replaced threads that idled, and each new thread
opened another connection that was never closed (a soak found 113 open on keys.sqlite3 in one
worker after 40 minutes, with their page caches). A gateway worker opens as many as it has
threads (worker_threads.py), all at start, so its open files stay where start-up left them.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random

__all__ = ["ConnectionPool", "enable_wal", "is_busy"]

_WAL_SWITCH_WAIT_S = 30.0


def is_busy(exc: BaseException) -> bool:
    """Another connection holds the lock this one needs (SQLITE_BUSY, SQLITE_LOCKED)."""
    return isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorcode", None) in (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
    )


def enable_wal(db: sqlite3.Connection) -> None:
    """Switch `db`'s file to WAL (a setting of the file, kept once made). SQLite does not call
    the busy handler for this switch: when workers open a new file together, all but one got
    "database is locked" at once and, that being a start-up failure, uvicorn's supervisor then
    stopped the whole gateway. They now try again until the one switching is done."""
    for attempt in Retrying(
        stop=stop_after_delay(_WAL_SWITCH_WAIT_S),
        wait=wait_random(0.01, 0.1),
        retry=retry_if_exception(is_busy),
        reraise=True,
    ):
        with attempt:
            db.execute("PRAGMA journal_mode=WAL")


class ConnectionPool:
    """`size` connections, opened at once; a job finding none idle waits for one. `close`
    closes them all."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], size: int = 1) -> None:
        if size < 1:
            raise ValueError(f"size: must be at least 1, got {size}")
        self._returned = threading.Condition()
        self._all: list[sqlite3.Connection] = []
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        try:
            for _ in range(size):
                self._all.append(connect())
        except BaseException:
            self.close()
            raise
        self._idle = list(self._all)

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        with self._returned:
            self._returned.wait_for(lambda: bool(self._idle) or self._closed)
            if self._closed:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            db = self._idle.pop()
        try:
            yield db
        finally:
            with self._returned:
                self._idle.append(db)
                self._returned.notify()

    @property
    def size(self) -> int:
        """Connections open."""
        return len(self._all)

    def close(self) -> None:
        with self._returned:
            self._closed = True
            self._returned.notify_all()
            for db in self._all:
                db.close()
            self._all.clear()
            self._idle.clear()
