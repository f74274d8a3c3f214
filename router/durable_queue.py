"""DurableQueue: requests waiting for the cloud, kept in SQLite and acknowledged only once committed.

All SQLite work runs on one `SqliteWorker` thread; concurrent enqueues share one commit (one fsync).

Priorities follow Triton's convention: level 1 is the most urgent, `priority_levels` the least.
Order: the most urgent effective level first, where an item's effective level is its level less one
for every `ageing_s` seconds it has waited (so a low-priority item cannot starve behind a stream of
urgent ones); ties go to the oldest item, then to the first enqueued.

Life of an item: pending -> in_flight (claimed under a lease) -> delivered; back to pending on
`release`, on lease expiry, or when the process restarts. It ends in exactly one of delivered,
rejected (by the cloud, for good), expired (TTL passed while pending) or dropped (by the full
policy); finished rows keep their end state and result until `purge`. Requests refused at
admission never enter; they are counted.

Encryption at rest (opt-in): with a current key in `keyring`, payloads and results are
stored sealed (model_runtime.encryption), bound to their ticket; the cap counts sealed bytes.

Disk cap: a waiting item is accounted as its payload + ROW_OVERHEAD_BYTES (columns, index
entries, page slack), a finished one as its result (its payload is freed; the few dozen bytes of
its row are left out, bounded by the retention that `purge` enforces). An answer larger than its
request that would take the total over the cap deletes the oldest ended items first (early, as
`purge` would later), or is not kept if even that cannot make room (the item says so). An enqueue that would take
the total over `cap_bytes` is refused (QueueFull) under `refuse`; under `drop_oldest_lowest`
pending items of the same or a less urgent level are dropped, least urgent first, oldest first
within a level, until it fits (if they cannot make room, it is refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from model_runtime.encryption import Keyring, sealed_key_id_sql
from router.clock import Clock, SystemClock
from router.decision import DEFAULT_PRIORITY, PRIORITY_LEVELS, PriorityScale
from router.errors import QueueFull, TicketNotFound
from router.queue_schema import (
    END_STATES,
    QUEUE_MIGRATIONS,
    ItemState,
    ItemStatus,
    QueuedItem,
    QueueStats,
)
from router.sqlite_files import OpenedDatabase, SqliteWorker, WriteHooks, open_database

__all__ = [
    "ROW_OVERHEAD_BYTES",
    "DurableQueue",
    "FullPolicy",
    "ItemState",
    "ItemStatus",
    "QueueStats",
    "QueuedItem",
]

log = logging.getLogger(__name__)

ROW_OVERHEAD_BYTES = 256
_TICKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Column order of _COLUMNS: the first eleven are ItemStatus's fields, then its owner.
_COLUMNS = (
    "ticket, model, state, priority, enqueued_at, expires_at, attempts, finished_at, result,"
    " last_error, end_seq, seq, payload_bytes, owner"
)
_SEQ, _PAYLOAD_BYTES, _OWNER = 11, 12, 13
_INSERT = (
    "INSERT INTO items (ticket, model, priority, enqueued_at, expires_at, state, payload,"
    " payload_bytes, owner) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)"
)
# A known ticket is left as it is; the rows inserted tell which tickets were new.
_INSERT_NEW = _INSERT + " ON CONFLICT (ticket) DO NOTHING"
# Attempts are counted when an item is claimed for delivery: a claim cut off by a restart or a
# lost lease may have reached the cloud, so it counts as a delivery tried.
_TO_PENDING = "UPDATE items SET state = 'pending', lease_until = NULL"
_REFUSED = "admission_rejected"
_EVICTED = "results_evicted"


class FullPolicy(StrEnum):
    REFUSE = "refuse"
    DROP_OLDEST_LOWEST = "drop_oldest_lowest"


@dataclass(slots=True)
class _Admission:
    """One enqueue waiting for the shared commit; `outcome` is set on the worker thread."""

    ticket: str
    model: str
    payload: bytes
    priority: int
    ttl_s: float
    owner: str
    outcome: bool | QueueFull = False
    future: asyncio.Future[bool] | None = None


@dataclass
class _Changes:
    """What a job did to the state mirrored in memory; applied only once its SQL succeeded."""

    used: int = 0
    ended: list[ItemStatus] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


class DurableQueue:
    """Open with `await DurableQueue.open(path, ...)`; close with `await queue.close()`."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Clock | None = None,
        cap_bytes: int | None = None,
        full_policy: FullPolicy = FullPolicy.REFUSE,
        ageing_s: float | None = 600.0,
        lease_s: float = 300.0,
        priority_levels: int = PRIORITY_LEVELS,
        on_end: Callable[[Sequence[ItemStatus]], None] | None = None,
        keyring: Keyring | None = None,
        hooks: WriteHooks | None = None,
    ) -> None:
        """Use `open`. `on_end` is called on the event loop, after the commit, with items that
        ended. `keyring` seals what is stored and opens what was (none: stored as given).
        `hooks`: failed writes are reported to it (they raise StorageError).

        Waiting items found at a level beyond `priority_levels` (the setting was lowered) are
        moved to the least urgent level at open, and logged."""
        if cap_bytes is not None and cap_bytes < 0:
            raise ValueError(f"cap_bytes: must be >= 0 (0 or None: no cap), got {cap_bytes}")
        if ageing_s is not None and not ageing_s >= 0:
            raise ValueError(f"ageing_s: must be >= 0 (0 or None: no ageing), got {ageing_s}")
        if not lease_s > 0:
            raise ValueError(f"lease_s: must be > 0, got {lease_s}")
        PriorityScale(priority_levels, 1)  # raises ValueError naming priority_levels
        self.path = Path(path)
        self.clock: Clock = clock or SystemClock()
        self.cap_bytes = cap_bytes or None
        self.full_policy = FullPolicy(full_policy)
        self.ageing_s = ageing_s or None
        self.lease_s = lease_s
        self.priority_levels = priority_levels
        self.on_end = on_end
        self.keyring = keyring or Keyring()
        self.quarantined: list[Path] = []
        """Corrupt files found at `path` and moved aside at start-up (log and count them)."""
        self.quarantine_problem = ""
        self._worker = SqliteWorker(
            f"queue:{self.path.name}",
            store="queue",
            on_commit=self._committed,
            on_rollback=self._resync,
            hooks=hooks,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        # Enqueues gather here until the worker takes them all into its next group.
        self._lock = threading.Lock()
        self._open_batch: list[_Admission] | None = None
        # Mirrors of what is on disk; written only on the worker thread.
        self._used = 0
        self._counts: dict[str, int] = {}
        self._end_seq = 0
        self._just_ended: list[ItemStatus] = []

    @classmethod
    async def open(cls, path: Path, **options: Any) -> DurableQueue:
        queue = cls(path, **options)
        queue._loop = asyncio.get_running_loop()
        opened = await queue._worker.start(queue._open)
        if opened.quarantined is not None:
            queue.quarantined.append(opened.quarantined)
            queue.quarantine_problem = opened.problem
        return queue

    def _open(self) -> OpenedDatabase:
        opened = open_database(self.path, QUEUE_MIGRATIONS, now=self.clock.wall)
        # A row sealed with a key that is not configured could never be sent or read: stop now,
        # naming the key, rather than fail item by item.
        self.keyring.require(
            (
                r[0]
                for column in ("payload", "result")
                for r in opened.connection.execute(
                    f"SELECT DISTINCT {sealed_key_id_sql(column)} AS k FROM items"
                    " WHERE k IS NOT NULL"
                )
            ),
            str(self.path),
        )
        # Whatever was in flight when the last process died was maybe sent: send it again.
        opened.connection.execute(
            f"{_TO_PENDING}, last_error = 'interrupted by restart' WHERE state = 'in_flight'"
        )
        moved = opened.connection.execute(
            "UPDATE items SET priority = ? WHERE priority > ? AND finished_at IS NULL",
            (self.priority_levels, self.priority_levels),
        ).rowcount
        if moved:
            log.warning(
                "%d queued item(s) waited at priority levels beyond priority_levels = %d;"
                " they now wait at level %d",
                moved,
                self.priority_levels,
                self.priority_levels,
            )
        self._resync(opened.connection)
        return opened

    async def close(self) -> None:
        await self._worker.close()

    @property
    def commits(self) -> int:
        """Durable commits made so far; fewer than enqueues when commits are shared."""
        return self._worker.commits

    @property
    def used_bytes(self) -> int:
        return self._used

    # -- admission ------------------------------------------------------------------------

    async def enqueue(
        self,
        ticket: str,
        model: str,
        payload: bytes,
        *,
        priority: int = DEFAULT_PRIORITY,
        ttl_s: float,
        owner: str = "",
    ) -> bool:
        """Store a request; return once it is durable: True if new, False if the ticket was known.
        `owner` is who may see its result (see ItemStatus.owner).

        Raises QueueFull when it does not fit (see the module docstring), ValueError on bad input.
        If the caller is cancelled while waiting, the request may still be stored.
        """
        if not isinstance(ticket, str) or not _TICKET.fullmatch(ticket):
            raise ValueError(f"ticket: must be 1-128 of A-Z a-z 0-9 . _ : - , got {ticket!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model: must be a non-empty string, got {model!r}")
        if not isinstance(payload, bytes):
            raise ValueError(f"payload: must be bytes, got {type(payload).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority: must be an integer, got {priority!r}")
        if not 1 <= priority <= self.priority_levels:
            raise ValueError(f"priority: must be 1..{self.priority_levels}, got {priority}")
        if not (isinstance(ttl_s, (int, float)) and math.isfinite(ttl_s) and ttl_s > 0):
            raise ValueError(f"ttl_s: must be a finite number of seconds > 0, got {ttl_s!r}")
        if not isinstance(owner, str):
            raise ValueError(f"owner: must be a string, got {type(owner).__name__}")
        admission = _Admission(ticket, model, payload, priority, float(ttl_s), owner)
        with self._lock:
            batch = self._open_batch
            if batch is None:
                batch = []
                self._worker.submit(
                    lambda conn: self._admit(conn, batch), functools.partial(_settle_batch, batch)
                )
                self._open_batch = batch
            # One future each rather than one shared: a caller cancelled while it waits must
            # not cancel the others' acknowledgement.
            admission.future = asyncio.get_running_loop().create_future()
            batch.append(admission)
        return await admission.future

    def _admit(self, conn: sqlite3.Connection, batch: list[_Admission]) -> None:
        with self._lock:
            if self._open_batch is batch:
                self._open_batch = None
        now = self.clock.wall()
        if not self._admit_all(conn, batch, now):
            self._admit_one_by_one(conn, batch, now)

    def _admit_all(self, conn: sqlite3.Connection, batch: list[_Admission], now: float) -> bool:
        """The usual group: room under the cap for every item. All rows go in one statement,
        and a known ticket (a retried enqueue) is found by the rows it did not add, rather than
        by a look-up of every ticket first. False, having written nothing, when the cap may
        refuse or drop something: that takes the careful way."""
        sealing = self.keyring.encrypting
        rows, needs, first = [], [], set[str]()
        for a in batch:
            if a.ticket in first:
                continue  # the same ticket twice in one group: the second is a repeat
            first.add(a.ticket)
            payload = (
                self.keyring.seal(a.payload, _context("payload", a.ticket))
                if sealing
                else a.payload
            )
            rows.append(
                (a.ticket, a.model, a.priority, now, now + a.ttl_s, payload, len(payload), a.owner)
            )
            needs.append(len(payload) + ROW_OVERHEAD_BYTES)
        if self.cap_bytes is not None and self._used + sum(needs) > self.cap_bytes:
            return False
        added = conn.executemany(_INSERT_NEW, rows).rowcount
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
        for a in batch:
            a.outcome = a.ticket in new
            new.discard(a.ticket)  # a repeat later in the group is not new
        self._apply(conn, _Changes(used=used))
        return True

    def _admit_one_by_one(
        self, conn: sqlite3.Connection, batch: list[_Admission], now: float
    ) -> None:
        """Item by item, each checked against the cap (refused, or dropping others to fit)."""
        known = {
            r[0]
            for r in conn.execute(
                "SELECT ticket FROM items WHERE ticket IN (SELECT value FROM json_each(?))",
                (json.dumps([a.ticket for a in batch]),),
            )
        }
        changes, rows = _Changes(), list[tuple[Any, ...]]()
        for a in batch:
            if a.ticket in known:
                continue
            payload = self.keyring.seal(a.payload, _context("payload", a.ticket))
            need = len(payload) + ROW_OVERHEAD_BYTES
            over = self._used + changes.used + need - (self.cap_bytes or 0)
            if self.cap_bytes is not None and over > 0:
                conn.executemany(_INSERT, rows)
                rows = []
                victims = self._victims(conn, over, a.priority)
                if victims is None:
                    changes.counts[_REFUSED] = changes.counts.get(_REFUSED, 0) + 1
                    a.outcome = QueueFull(self._used + changes.used, self.cap_bytes)
                    continue
                why = (
                    f"dropped by the full-queue policy (drop_oldest_lowest): the queue was at its"
                    f" cap of {self.cap_bytes} bytes when an item of priority {a.priority} came"
                )
                self._finish(conn, victims, ItemState.DROPPED, now, changes, error=why)
            rows.append(
                (a.ticket, a.model, a.priority, now, now + a.ttl_s, payload, len(payload), a.owner)
            )
            known.add(a.ticket)
            changes.used += need
            a.outcome = True
        conn.executemany(_INSERT, rows)
        self._apply(conn, changes)

    def _victims(self, conn: sqlite3.Connection, to_free: int, priority: int) -> list[Any] | None:
        if self.full_policy is FullPolicy.REFUSE:
            return None
        chosen: list[Any] = []
        freed = 0
        for row in conn.execute(
            f"SELECT {_COLUMNS} FROM items WHERE state = 'pending' AND priority >= ?"
            " ORDER BY priority DESC, enqueued_at, seq",
            (priority,),
        ):
            chosen.append(row)
            freed += row[_PAYLOAD_BYTES] + ROW_OVERHEAD_BYTES
            if freed >= to_free:
                return chosen
        return None

    # -- delivery -------------------------------------------------------------------------

    async def claim_batch(self, max_items: int, max_bytes: int) -> list[QueuedItem]:
        """Take the next items in order, up to `max_items` and `max_bytes` of payload (always at
        least one if any waits), and lease them for `lease_s`. Expires due items first."""
        if max_items < 1 or max_bytes < 1:
            raise ValueError(f"max_items and max_bytes: must be >= 1, got {max_items}, {max_bytes}")
        return await self._worker.call(lambda conn: self._claim(conn, max_items, max_bytes))

    def _claim(self, conn: sqlite3.Connection, max_items: int, max_bytes: int) -> list[QueuedItem]:
        now = self.clock.wall()
        conn.execute(
            f"{_TO_PENDING}, last_error = 'lease expired'"
            " WHERE state = 'in_flight' AND lease_until <= ?",
            (now,),
        )
        changes = _Changes()
        self._expire(conn, now, changes)
        # The best max_items overall are among the best max_items of each level, and each
        # level's best are its oldest: a short index scan per level, not a sort of the queue.
        candidates: list[Any] = []
        for p in range(1, self.priority_levels + 1):
            candidates += conn.execute(
                "SELECT seq, priority, enqueued_at, payload_bytes FROM items"
                " WHERE state = 'pending' AND priority = ? ORDER BY enqueued_at, seq LIMIT ?",
                (p, max_items),
            ).fetchall()
        candidates.sort(key=lambda r: (self._effective(r[1], r[2], now), r[2], r[0]))
        items, size = list[QueuedItem](), 0
        for seq, _, _, n in candidates[:max_items]:
            if items and size + n > max_bytes:
                break
            size += n
            conn.execute(
                "UPDATE items SET state = 'in_flight', lease_until = ?, attempts = attempts + 1"
                " WHERE seq = ?",
                (now + self.lease_s, seq),
            )
            row = conn.execute(
                "SELECT ticket, model, payload, priority, enqueued_at, expires_at, attempts"
                " FROM items WHERE seq = ?",
                (seq,),
            ).fetchone()
            ticket, payload = row[0], self.keyring.open(row[2], _context("payload", row[0]))
            items.append(QueuedItem(ticket, row[1], payload, *row[3:]))
        self._apply(conn, changes)
        return items

    def _effective(self, priority: int, enqueued_at: float, now: float) -> int:
        """The level an item competes at: one more urgent per `ageing_s` waited."""
        if self.ageing_s is None:
            return priority
        return priority - int(max(0.0, now - enqueued_at) // self.ageing_s)

    async def mark_delivered(self, ticket: str, result: bytes) -> bool:
        """Record the cloud's answer; False if the item had already ended (e.g. delivered twice)."""
        return await self._worker.call(lambda c: self._end(c, ticket, ItemState.DELIVERED, result))

    async def mark_rejected(self, ticket: str, error: str) -> bool:
        """End an item the cloud refused for good (4xx); False if it had already ended."""
        return await self._worker.call(
            lambda c: self._end(c, ticket, ItemState.REJECTED, None, error)
        )

    def _end(
        self,
        conn: sqlite3.Connection,
        ticket: str,
        state: ItemState,
        result: bytes | None,
        error: str | None = None,
    ) -> bool:
        row = conn.execute(f"SELECT {_COLUMNS} FROM items WHERE ticket = ?", (ticket,)).fetchone()
        if row is None:
            raise TicketNotFound(ticket)
        if row[2] in END_STATES:
            return False
        changes = _Changes()
        if result is not None and self.cap_bytes is not None:
            result, error = self._make_room(conn, row, result, changes)
        self._finish(conn, [row], state, self.clock.wall(), changes, result, error)
        self._apply(conn, changes)
        return True

    def _make_room(
        self, conn: sqlite3.Connection, row: Any, result: bytes, changes: _Changes
    ) -> tuple[bytes | None, str | None]:
        """Room under the cap for an answer larger than its item's request: the oldest ended
        items are deleted early (their tickets read as unknown, as after `purge`). An answer
        that cannot fit even so is not kept, and the item says why."""
        assert self.cap_bytes is not None
        over = self._used + len(result) - row[_PAYLOAD_BYTES] - ROW_OVERHEAD_BYTES - self.cap_bytes
        if over <= 0:
            return result, None
        freed, gone = 0, []
        for seq, size in conn.execute(
            "SELECT seq, result_bytes FROM items WHERE finished_at IS NOT NULL AND seq != ?"
            " ORDER BY finished_at, seq",
            (row[_SEQ],),
        ):
            if freed >= over:
                break
            gone.append(seq)
            freed += size
        if freed < over:
            return (
                None,
                f"delivered, but the answer ({len(result)} bytes) was not kept: it does not fit under the queue's cap_bytes",
            )
        conn.execute(
            "DELETE FROM items WHERE seq IN (SELECT value FROM json_each(?))", (json.dumps(gone),)
        )
        changes.used -= freed
        changes.counts[_EVICTED] = changes.counts.get(_EVICTED, 0) + len(gone)
        return result, None

    async def release(self, ticket: str, error: str, *, sent: bool = True) -> bool:
        """Put an in-flight item back to pending after a failed attempt; False if not in flight.
        `sent=False`: it was claimed but never sent, so its claim is not counted as an attempt."""
        untried = "" if sent else ", attempts = attempts - 1"

        def job(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                f"{_TO_PENDING}{untried}, last_error = ? WHERE ticket = ? AND state = 'in_flight'",
                (error[:500], ticket),
            )
            if (
                cur.rowcount == 0
                and not conn.execute("SELECT 1 FROM items WHERE ticket = ?", (ticket,)).fetchone()
            ):
                raise TicketNotFound(ticket)
            return cur.rowcount == 1

        return await self._worker.call(job)

    async def expire_due(self, now: float | None = None) -> list[str]:
        """End every pending item whose TTL has passed; return their tickets."""

        def job(conn: sqlite3.Connection) -> list[str]:
            changes = _Changes()
            self._expire(conn, self.clock.wall() if now is None else now, changes)
            self._apply(conn, changes)
            return [s.ticket for s in changes.ended]

        return await self._worker.call(job)

    def _expire(self, conn: sqlite3.Connection, now: float, changes: _Changes) -> None:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM items WHERE state = 'pending' AND expires_at <= ?", (now,)
        ).fetchall()
        for row in rows:
            self._finish(conn, [row], ItemState.EXPIRED, now, changes, error=_expired(row))

    async def purge(self, older_than_s: float) -> int:
        """Delete items that ended more than `older_than_s` ago; return how many."""

        def job(conn: sqlite3.Connection) -> int:
            cutoff = (self.clock.wall() - older_than_s,)
            where = "FROM items WHERE finished_at IS NOT NULL AND finished_at < ?"
            n, size = conn.execute(
                f"SELECT COUNT(*), COALESCE(SUM(result_bytes + payload_bytes), 0) {where}", cutoff
            ).fetchone()
            # The freed pages are reused by later items; the file keeps its high-water mark.
            conn.execute(f"DELETE {where}", cutoff)
            self._apply(conn, _Changes(used=-size))
            return int(n)

        return await self._worker.call(job)

    # -- end states and the in-memory mirror ----------------------------------------------

    def _finish(
        self,
        conn: sqlite3.Connection,
        rows: Sequence[Any],
        state: ItemState,
        now: float,
        changes: _Changes,
        result: bytes | None = None,
        error: str | None = None,
    ) -> None:
        """End `rows` (selected as _COLUMNS): free the payload, keep the result (sealed), number
        the end. The ItemStatus handed to `on_end` holds the result as given."""
        for r in rows:
            stored = None if result is None else self.keyring.seal(result, _context("result", r[0]))
            # Numbers handed out by a job that is rolled back are skipped, never reused.
            self._end_seq += 1
            last_error = r[9] if error is None else error[:500]
            conn.execute(
                "UPDATE items SET state = ?, finished_at = ?, end_seq = ?, lease_until = NULL,"
                " payload = NULL, payload_bytes = 0, result = ?, result_bytes = ?, last_error = ?"
                " WHERE seq = ?",
                (state.value, now, self._end_seq, stored, len(stored or b""), last_error, r[_SEQ]),
            )
            changes.ended.append(
                ItemStatus(
                    r[0],
                    r[1],
                    state,
                    r[3],
                    r[4],
                    r[5],
                    r[6],
                    now,
                    result,
                    last_error,
                    self._end_seq,
                    r[_OWNER],
                )
            )
            changes.used += len(stored or b"") - r[_PAYLOAD_BYTES] - ROW_OVERHEAD_BYTES
            changes.counts[state.value] = changes.counts.get(state.value, 0) + 1

    def _apply(self, conn: sqlite3.Connection, changes: _Changes) -> None:
        """Write the counters, then mirror the job's changes in memory (its last step)."""
        if changes.counts or changes.ended:
            conn.executemany(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                list(changes.counts.items()),
            )
            conn.execute("INSERT OR REPLACE INTO counters VALUES ('end_seq', ?)", (self._end_seq,))
        self._used += changes.used
        for name, n in changes.counts.items():
            self._counts[name] = self._counts.get(name, 0) + n
        self._just_ended += changes.ended

    def _committed(self) -> None:
        if self._just_ended:
            ended, self._just_ended = self._just_ended, []
            if self.on_end is not None and self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                    self._loop.call_soon_threadsafe(self.on_end, ended)

    def _resync(self, conn: sqlite3.Connection) -> None:
        """Reload the in-memory mirror from disk (at open, and after a failed commit)."""
        self._used = int(
            conn.execute(
                "SELECT COALESCE(SUM(payload_bytes + result_bytes"
                " + CASE WHEN finished_at IS NULL THEN ? ELSE 0 END), 0) FROM items",
                (ROW_OVERHEAD_BYTES,),
            ).fetchone()[0]
        )
        counts = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        self._end_seq = max(self._end_seq, int(counts.pop("end_seq", 0)))
        self._counts = {name: int(n) for name, n in counts.items()}
        self._just_ended = []

    # -- reads ----------------------------------------------------------------------------

    def _status(self, r: Any) -> ItemStatus:
        result = None if r[8] is None else self.keyring.open(r[8], _context("result", r[0]))
        return ItemStatus(
            r[0], r[1], ItemState(r[2]), r[3], r[4], r[5], r[6], r[7], result, r[9], r[10], r[13]
        )

    async def get(self, ticket: str) -> ItemStatus:
        """The ticket's state (and result once delivered); TicketNotFound if unknown or purged."""

        def job(conn: sqlite3.Connection) -> ItemStatus:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM items WHERE ticket = ?", (ticket,)
            ).fetchone()
            if row is None:
                raise TicketNotFound(ticket)
            return self._status(row)

        return await self._worker.call(job)

    async def results_after(
        self, cursor: int, limit: int = 100, *, owner: str | None = None
    ) -> list[ItemStatus]:
        """Items that ended after `cursor` (an `end_seq`), in end order, of `owner` only if
        given; for resumable watchers."""

        def job(conn: sqlite3.Connection) -> list[ItemStatus]:
            mine = "" if owner is None else " AND owner = ?"
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM items WHERE end_seq > ?{mine} ORDER BY end_seq LIMIT ?",
                (cursor, *(() if owner is None else (owner,)), limit),
            )
            return [self._status(r) for r in rows]

        return await self._worker.call(job)

    async def stats(self) -> QueueStats:
        def job(conn: sqlite3.Connection) -> QueueStats:
            depth = dict.fromkeys(range(1, self.priority_levels + 1), 0)
            in_flight = waiting = 0
            oldest: float | None = None
            for priority, state, n, size, first in conn.execute(
                "SELECT priority, state, COUNT(*), SUM(payload_bytes), MIN(enqueued_at) FROM items"
                " WHERE state IN ('pending', 'in_flight') GROUP BY priority, state"
            ):
                depth[priority] = depth.get(priority, 0) + n
                waiting += size
                if state == ItemState.IN_FLIGHT:
                    in_flight += n
                elif oldest is None or first < oldest:
                    oldest = first
            files = (self.path, Path(f"{self.path}-wal"))
            return QueueStats(
                depth_by_priority=depth,
                in_flight=in_flight,
                waiting_payload_bytes=waiting,
                used_bytes=self._used,
                cap_bytes=self.cap_bytes,
                file_bytes=sum(os.path.getsize(f) for f in files if f.exists()),
                oldest_enqueued_at=oldest,
                oldest_pending_age_s=None if oldest is None else self.clock.wall() - oldest,
                ended={s.value: self._counts.get(s.value, 0) for s in ItemState if s in END_STATES},
                admission_rejected=self._counts.get(_REFUSED, 0),
                results_evicted=self._counts.get(_EVICTED, 0),
                commits=self._worker.commits,
            )

        return await self._worker.call(job)


def _settle_batch(batch: list[_Admission], job: asyncio.Future[None]) -> None:
    failure = job.exception() if not job.cancelled() else asyncio.CancelledError()
    for a in batch:
        if a.future is None or a.future.done():
            continue
        if failure is not None:
            a.future.set_exception(failure)
        elif isinstance(a.outcome, QueueFull):
            a.future.set_exception(a.outcome)
        else:
            a.future.set_result(a.outcome)


def _context(column: str, ticket: str) -> bytes:
    """What a sealed blob is bound to: its column and its row's ticket."""
    return f"queue.{column}\x00{ticket}".encode()


def _expired(r: Any) -> str:
    """Why an item (a row of _COLUMNS) expired, with what its last attempt met, if any."""
    ttl = r[5] - r[4]
    tried = f"{r[6]} attempt(s)" if r[6] else "no attempt"
    text = f"expired: its ttl of {ttl:.0f} s passed before it could be delivered ({tried}"
    return text + (f"; the last: {r[9]})" if r[9] else ")")
