"""SQLite connections shared by the worker threads that run the gateway's blocking queries.

A connection is taken for one job and given back, whichever thread ran it. One connection per
thread (thread-local) leaked: the thread pool replaces threads that idle, and each new thread
opened another connection that was never closed (a soak found 113 open on keys.sqlite3 in one
worker after 40 minutes, with their page caches).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["ConnectionPool"]


class ConnectionPool:
    """At most as many connections as jobs ever ran at once; `close` closes them all."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._idle: list[sqlite3.Connection] = []
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._idle.pop() if self._idle else None
        if db is None:
            db = self._connect()
            with self._lock:
                self._all.append(db)
        try:
            yield db
        finally:
            with self._lock:
                self._idle.append(db)

    @property
    def size(self) -> int:
        """Connections open."""
        return len(self._all)

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                db.close()
            self._all.clear()
            self._idle.clear()
