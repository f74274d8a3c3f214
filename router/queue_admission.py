"""Admission to the durable queue: concurrent enqueues gathered into one group, written by one
statement in one commit, under the byte cap and the full policy (see DurableQueue's docstring).

Callers are answered from one callback per commit, each by a future of its own.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
import sqlite3
import threading
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from router.clock import Clock
from router.errors import QueueFull
from router.queue_ledger import (
    COLUMNS,
    PAYLOAD_BYTES,
    REFUSED,
    ROW_OVERHEAD_BYTES,
    Changes,
    QueueLedger,
    sealed_for,
)
from router.queue_schema import ItemState
from router.sqlite_files import SqliteWorker

TICKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""What a ticket may be: 1-128 of A-Z a-z 0-9 . _ : - (router.tickets checks callers' by it too)."""
INSERT = (
    "INSERT INTO items (ticket, model, priority, enqueued_at, expires_at, state, payload,"
    " payload_bytes, owner) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)"
)
# A known ticket is left as it is; the rows inserted tell which tickets were new.
_INSERT_NEW = INSERT + " ON CONFLICT (ticket) DO NOTHING"


class FullPolicy(StrEnum):
    REFUSE = "refuse"
    DROP_OLDEST_LOWEST = "drop_oldest_lowest"


@dataclass(slots=True)
class Admission:
    """One enqueue waiting for the shared commit; `outcome` is set on the worker thread."""

    ticket: str
    model: str
    payload: bytes
    priority: int
    ttl_s: float
    owner: str
    future: asyncio.Future[bool]
    outcome: bool | QueueFull = False


def check_enqueue(
    ticket: object,
    model: object,
    payload: object,
    priority: object,
    ttl_s: object,
    owner: object,
    priority_levels: int,
) -> None:
    """Raise ValueError naming the first argument of an enqueue that is not acceptable."""
    if not isinstance(ticket, str) or not TICKET.fullmatch(ticket):
        raise ValueError(f"ticket: must be 1-128 of A-Z a-z 0-9 . _ : - , got {ticket!r}")
    if not isinstance(model, str) or not model:
        raise ValueError(f"model: must be a non-empty string, got {model!r}")
    if not isinstance(payload, bytes):
        raise ValueError(f"payload: must be bytes, got {type(payload).__name__}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority: must be an integer, got {priority!r}")
    if not 1 <= priority <= priority_levels:
        raise ValueError(f"priority: must be 1..{priority_levels}, got {priority}")
    if not (isinstance(ttl_s, (int, float)) and math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"ttl_s: must be a finite number of seconds > 0, got {ttl_s!r}")
    if not isinstance(owner, str):
        raise ValueError(f"owner: must be a string, got {type(owner).__name__}")


class GroupAdmission:
    """Enqueues gather in an open group until the worker takes the whole group as one job."""

    def __init__(
        self, worker: SqliteWorker, ledger: QueueLedger, clock: Clock, full_policy: FullPolicy
    ) -> None:
        self._worker = worker
        self._ledger = ledger
        self._clock = clock
        self.full_policy = full_policy
        self._lock = threading.Lock()
        self._open_group: list[Admission] | None = None

    def join(
        self, ticket: str, model: str, payload: bytes, priority: int, ttl_s: float, owner: str
    ) -> asyncio.Future[bool]:
        """Add a checked enqueue to the open group; the future resolves after its commit."""
        # One future each rather than one shared: a caller cancelled while it waits must not
        # cancel the others' acknowledgement.
        future = asyncio.get_running_loop().create_future()
        admission = Admission(ticket, model, payload, priority, float(ttl_s), owner, future)
        with self._lock:
            group = self._open_group
            if group is None:
                group = []
                self._worker.submit(
                    functools.partial(self._admit, group), functools.partial(_settle, group)
                )
                self._open_group = group  # only once submitted: a worker that is not running raises
            group.append(admission)
        return future

    def _admit(self, group: list[Admission], conn: sqlite3.Connection) -> None:
        with self._lock:
            if self._open_group is group:
                self._open_group = None
        now = self._clock.wall()
        if not self._admit_all(conn, group, now):
            self._admit_one_by_one(conn, group, now)

    def _admit_all(self, conn: sqlite3.Connection, group: list[Admission], now: float) -> bool:
        """The usual group: room under the cap for every item. All rows go in one statement,
        and a known ticket (a retried enqueue) is found by the rows it did not add, rather than
        by a look-up of every ticket first. False, having written nothing, when the cap may
        refuse or drop something: that takes the careful way."""
        ledger = self._ledger
        sealing = ledger.keyring.encrypting
        rows, needs, first = [], [], set[str]()
        for a in group:
            if a.ticket in first:
                continue  # the same ticket twice in one group: the second is a repeat
            first.add(a.ticket)
            payload = (
                ledger.keyring.seal(a.payload, sealed_for("payload", a.ticket))
                if sealing
                else a.payload
            )
            rows.append(
                (a.ticket, a.model, a.priority, now, now + a.ttl_s, payload, len(payload), a.owner)
            )
            needs.append(len(payload) + ROW_OVERHEAD_BYTES)
        if ledger.cap_bytes is not None and ledger.used + sum(needs) > ledger.cap_bytes:
            return False
        added = conn.executemany(_INSERT_NEW, rows).rowcount
        if added == len(group):  # the usual group: every ticket new, none twice
            for a in group:
                a.outcome = True
            ledger.apply(conn, Changes(used=sum(needs)))
            return True
        if added == len(rows):
            new = first
        else:  # a new row's seq is above every existing one: the new rows hold the top seqs
            new = {
                r[0]
                for r in conn.execute(
                    "SELECT ticket FROM items ORDER BY seq DESC LIMIT ?", (added,)
                )
            }
        used = sum(need for row, need in zip(rows, needs, strict=True) if row[0] in new)
        for a in group:
            a.outcome = a.ticket in new
            new.discard(a.ticket)  # a repeat later in the group is not new
        ledger.apply(conn, Changes(used=used))
        return True

    def _admit_one_by_one(
        self, conn: sqlite3.Connection, group: list[Admission], now: float
    ) -> None:
        """Item by item, each checked against the cap (refused, or dropping others to fit)."""
        ledger = self._ledger
        cap = ledger.cap_bytes
        known = {
            r[0]
            for r in conn.execute(
                "SELECT ticket FROM items WHERE ticket IN (SELECT value FROM json_each(?))",
                (json.dumps([a.ticket for a in group]),),
            )
        }
        changes, rows = Changes(), list[tuple[Any, ...]]()
        for a in group:
            if a.ticket in known:
                continue
            payload = ledger.keyring.seal(a.payload, sealed_for("payload", a.ticket))
            need = len(payload) + ROW_OVERHEAD_BYTES
            over = ledger.used + changes.used + need - (cap or 0)
            if cap is not None and over > 0:
                conn.executemany(INSERT, rows)
                rows = []
                victims = self._victims(conn, over, a.priority)
                if victims is None:
                    changes.count(REFUSED)
                    a.outcome = QueueFull(ledger.used + changes.used, cap)
                    continue
                why = (
                    f"dropped by the full-queue policy (drop_oldest_lowest): the queue was at its"
                    f" cap of {cap} bytes when an item of priority {a.priority} came"
                )
                ledger.finish(conn, victims, ItemState.DROPPED, now, changes, error=why)
            rows.append(
                (a.ticket, a.model, a.priority, now, now + a.ttl_s, payload, len(payload), a.owner)
            )
            known.add(a.ticket)
            changes.used += need
            a.outcome = True
        conn.executemany(INSERT, rows)
        ledger.apply(conn, changes)

    def _victims(self, conn: sqlite3.Connection, to_free: int, priority: int) -> list[Any] | None:
        if self.full_policy is FullPolicy.REFUSE:
            return None
        chosen: list[Any] = []
        freed = 0
        for row in conn.execute(
            f"SELECT {COLUMNS} FROM items WHERE state = 'pending' AND priority >= ?"
            " ORDER BY priority DESC, enqueued_at, seq",
            (priority,),
        ):
            chosen.append(row)
            freed += row[PAYLOAD_BYTES] + ROW_OVERHEAD_BYTES
            if freed >= to_free:
                return chosen
        return None


def _settle(group: list[Admission], job: asyncio.Future[None]) -> None:
    failure = job.exception() if not job.cancelled() else asyncio.CancelledError()
    for a in group:
        if a.future.done():
            continue
        if failure is not None:
            a.future.set_exception(failure)
        elif isinstance(a.outcome, QueueFull):
            a.future.set_exception(a.outcome)
        else:
            a.future.set_result(a.outcome)
