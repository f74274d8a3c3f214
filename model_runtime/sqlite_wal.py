"""Switching a SQLite file to WAL when others may have it open: SQLite does not wait for them
there, so the switch is tried again until they let go. Used by the gateway and the agent.
"""

from __future__ import annotations

import sqlite3

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random

__all__ = ["enable_wal", "is_busy"]

WAL_SWITCH_WAIT_S = 30.0


def is_busy(exc: BaseException) -> bool:
    """Another connection holds the lock this one needs (SQLITE_BUSY, SQLITE_LOCKED)."""
    return isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorcode", None) in (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
    )


def enable_wal(db: sqlite3.Connection) -> str:
    """Switch `db`'s file to WAL (a setting of the file, kept once made); the journal mode it
    then has. SQLite does not call the busy handler for this switch: gateway workers opening a
    new file together, or the agent opening one while `edge-agent queue status` reads it, got
    "database is locked" at once and failed to start. They now try again until the other
    connection is done."""
    retrying = Retrying(
        stop=stop_after_delay(WAL_SWITCH_WAIT_S),
        wait=wait_random(0.01, 0.1),
        retry=retry_if_exception(is_busy),
        reraise=True,
    )
    return str(retrying(lambda: db.execute("PRAGMA journal_mode=WAL").fetchone()[0]))
