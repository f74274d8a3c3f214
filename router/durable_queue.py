"""DurableQueue: requests waiting for the cloud, kept in SQLite and acknowledged only once committed.

All SQLite work runs on one `SqliteWorker` thread; concurrent enqueues share one commit (one fsync).
This module is the queue's face; the work is in queue_admission (enqueues, the cap and the full
policy), queue_delivery (claims, leases, ends, purges) and queue_ledger (totals and end states).

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
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from model_runtime.encryption import Keyring, sealed_key_id_sql
from router.clock import Clock, SystemClock
from router.decision import DEFAULT_PRIORITY, PRIORITY_LEVELS, PriorityScale
from router.errors import TicketNotFound
from router.queue_admission import FullPolicy, GroupAdmission, check_enqueue
from router.queue_delivery import Delivery
from router.queue_ledger import (
    COLUMNS,
    EVICTED,
    REFUSED,
    ROW_OVERHEAD_BYTES,
    TO_PENDING,
    QueueLedger,
)
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
        self._ledger = QueueLedger(self.keyring, self.cap_bytes)
        self._worker = SqliteWorker(
            f"queue:{self.path.name}",
            store="queue",
            on_commit=self._committed,
            on_rollback=self._ledger.resync,
            hooks=hooks,
        )
        self._admission = GroupAdmission(self._worker, self._ledger, self.clock, self.full_policy)
        self._delivery = Delivery(
            self._ledger,
            self.clock,
            lease_s=lease_s,
            ageing_s=self.ageing_s,
            priority_levels=priority_levels,
        )
        self._loop: asyncio.AbstractEventLoop | None = None

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
            f"{TO_PENDING}, last_error = 'interrupted by restart' WHERE state = 'in_flight'"
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
        self._ledger.resync(opened.connection)
        return opened

    async def close(self) -> None:
        await self._worker.close()

    @property
    def commits(self) -> int:
        """Durable commits made so far; fewer than enqueues when commits are shared."""
        return self._worker.commits

    @property
    def used_bytes(self) -> int:
        return self._ledger.used

    def _committed(self) -> None:
        ended = self._ledger.take_ended()
        if ended and self.on_end is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                self._loop.call_soon_threadsafe(self.on_end, ended)

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
        check_enqueue(ticket, model, payload, priority, ttl_s, owner, self.priority_levels)
        return await self._admission.join(ticket, model, payload, priority, ttl_s, owner)

    # -- delivery -------------------------------------------------------------------------

    async def claim_batch(self, max_items: int, max_bytes: int) -> list[QueuedItem]:
        """Take the next items in order, up to `max_items` and `max_bytes` of payload (always at
        least one if any waits), and lease them for `lease_s`. Expires due items first."""
        if max_items < 1 or max_bytes < 1:
            raise ValueError(f"max_items and max_bytes: must be >= 1, got {max_items}, {max_bytes}")
        return await self._worker.call(lambda c: self._delivery.claim(c, max_items, max_bytes))

    async def mark_delivered(self, ticket: str, result: bytes) -> bool:
        """Record the cloud's answer; False if the item had already ended (e.g. delivered twice)."""
        return await self._worker.call(
            lambda c: self._delivery.end(c, ticket, ItemState.DELIVERED, result)
        )

    async def mark_rejected(self, ticket: str, error: str) -> bool:
        """End an item the cloud refused for good (4xx); False if it had already ended."""
        return await self._worker.call(
            lambda c: self._delivery.end(c, ticket, ItemState.REJECTED, None, error)
        )

    async def release(self, ticket: str, error: str, *, sent: bool = True) -> bool:
        """Put an in-flight item back to pending after a failed attempt; False if not in flight.
        `sent=False`: it was claimed but never sent, so its claim is not counted as an attempt."""
        return await self._worker.call(
            lambda c: self._delivery.release(c, ticket, error, sent=sent)
        )

    async def expire_due(self, now: float | None = None) -> list[str]:
        """End every pending item whose TTL has passed; return their tickets."""
        return await self._worker.call(lambda c: self._delivery.expire_due(c, now))

    async def purge(self, older_than_s: float) -> int:
        """Delete items that ended more than `older_than_s` ago; return how many."""
        return await self._worker.call(lambda c: self._delivery.purge(c, older_than_s))

    # -- reads ----------------------------------------------------------------------------

    async def get(self, ticket: str) -> ItemStatus:
        """The ticket's state (and result once delivered); TicketNotFound if unknown or purged."""

        def job(conn: sqlite3.Connection) -> ItemStatus:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM items WHERE ticket = ?", (ticket,)
            ).fetchone()
            if row is None:
                raise TicketNotFound(ticket)
            return self._ledger.status(row)

        return await self._worker.call(job)

    async def results_after(
        self, cursor: int, limit: int = 100, *, owner: str | None = None
    ) -> list[ItemStatus]:
        """Items that ended after `cursor` (an `end_seq`), in end order, of `owner` only if
        given; for resumable watchers."""

        def job(conn: sqlite3.Connection) -> list[ItemStatus]:
            mine = "" if owner is None else " AND owner = ?"
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM items WHERE end_seq > ?{mine} ORDER BY end_seq LIMIT ?",
                (cursor, *(() if owner is None else (owner,)), limit),
            )
            return [self._ledger.status(r) for r in rows]

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
                used_bytes=self._ledger.used,
                cap_bytes=self.cap_bytes,
                file_bytes=sum(os.path.getsize(f) for f in files if f.exists()),
                oldest_enqueued_at=oldest,
                oldest_pending_age_s=None if oldest is None else self.clock.wall() - oldest,
                ended={
                    s.value: self._ledger.counts.get(s.value, 0)
                    for s in ItemState
                    if s in END_STATES
                },
                admission_rejected=self._ledger.counts.get(REFUSED, 0),
                results_evicted=self._ledger.counts.get(EVICTED, 0),
                commits=self._worker.commits,
            )

        return await self._worker.call(job)
