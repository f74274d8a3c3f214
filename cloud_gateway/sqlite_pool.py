"""SQLite connections shared by the worker threads that run the gateway's blocking queries
(model_runtime.sqlite_wal switches each file to WAL, even when the workers open it together).

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

__all__ = ["ConnectionPool"]


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
