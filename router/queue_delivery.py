"""Delivery from the durable queue: items claimed in order of effective priority under a lease,
then ended (delivered, rejected, expired), released back to pending, or purged once ended.

Each method is a job for the queue's SQLite thread: it takes the connection, and mirrors what it
changed in the ledger as its last step.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from router.clock import Clock
from router.errors import TicketNotFound
from router.queue_ledger import (
    COLUMNS,
    EVICTED,
    PAYLOAD_BYTES,
    ROW_OVERHEAD_BYTES,
    SEQ,
    TO_PENDING,
    Changes,
    QueueLedger,
    expired_reason,
    sealed_for,
)
from router.queue_schema import END_STATES, ItemState, QueuedItem


class Delivery:
    """The reading and leasing side of the queue, and every end of an item but a drop."""

    def __init__(
        self,
        ledger: QueueLedger,
        clock: Clock,
        *,
        lease_s: float,
        ageing_s: float | None,
        priority_levels: int,
    ) -> None:
        self._ledger = ledger
        self._clock = clock
        self.lease_s = lease_s
        self.ageing_s = ageing_s
        self.priority_levels = priority_levels

    def claim(self, conn: sqlite3.Connection, max_items: int, max_bytes: int) -> list[QueuedItem]:
        now = self._clock.wall()
        conn.execute(
            f"{TO_PENDING}, last_error = 'lease expired'"
            " WHERE state = 'in_flight' AND lease_until <= ?",
            (now,),
        )
        changes = Changes()
        self.expire(conn, now, changes)
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
            ticket = row[0]
            payload = self._ledger.keyring.open(row[2], sealed_for("payload", ticket))
            items.append(QueuedItem(ticket, row[1], payload, *row[3:]))
        self._ledger.apply(conn, changes)
        return items

    def _effective(self, priority: int, enqueued_at: float, now: float) -> int:
        """The level an item competes at: one more urgent per `ageing_s` waited."""
        if self.ageing_s is None:
            return priority
        return priority - int(max(0.0, now - enqueued_at) // self.ageing_s)

    def end(
        self,
        conn: sqlite3.Connection,
        ticket: str,
        state: ItemState,
        result: bytes | None,
        error: str | None = None,
    ) -> bool:
        """End an item as delivered or rejected; False if it had already ended."""
        row = conn.execute(f"SELECT {COLUMNS} FROM items WHERE ticket = ?", (ticket,)).fetchone()
        if row is None:
            raise TicketNotFound(ticket)
        if row[2] in END_STATES:
            return False
        changes = Changes()
        if result is not None and self._ledger.cap_bytes is not None:
            result, error = self._make_room(conn, row, result, changes)
        self._ledger.finish(conn, [row], state, self._clock.wall(), changes, result, error)
        self._ledger.apply(conn, changes)
        return True

    def _make_room(
        self, conn: sqlite3.Connection, row: Any, result: bytes, changes: Changes
    ) -> tuple[bytes | None, str | None]:
        """Room under the cap for an answer larger than its item's request: the oldest ended
        items are deleted early (their tickets read as unknown, as after `purge`). An answer
        that cannot fit even so is not kept, and the item says why."""
        ledger = self._ledger
        assert ledger.cap_bytes is not None
        over = (
            ledger.used + len(result) - row[PAYLOAD_BYTES] - ROW_OVERHEAD_BYTES - ledger.cap_bytes
        )
        if over <= 0:
            return result, None
        freed, gone = 0, []
        for seq, size in conn.execute(
            "SELECT seq, result_bytes FROM items WHERE finished_at IS NOT NULL AND seq != ?"
            " ORDER BY finished_at, seq",
            (row[SEQ],),
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
        changes.count(EVICTED, len(gone))
        return result, None

    def release(self, conn: sqlite3.Connection, ticket: str, error: str, *, sent: bool) -> bool:
        """Put an in-flight item back to pending; False if it was not in flight."""
        untried = "" if sent else ", attempts = attempts - 1"
        cur = conn.execute(
            f"{TO_PENDING}{untried}, last_error = ? WHERE ticket = ? AND state = 'in_flight'",
            (error[:500], ticket),
        )
        if (
            cur.rowcount == 0
            and not conn.execute("SELECT 1 FROM items WHERE ticket = ?", (ticket,)).fetchone()
        ):
            raise TicketNotFound(ticket)
        return cur.rowcount == 1

    def expire_due(self, conn: sqlite3.Connection, now: float | None) -> list[str]:
        changes = Changes()
        self.expire(conn, self._clock.wall() if now is None else now, changes)
        self._ledger.apply(conn, changes)
        return [s.ticket for s in changes.ended]

    def expire(self, conn: sqlite3.Connection, now: float, changes: Changes) -> None:
        rows = conn.execute(
            f"SELECT {COLUMNS} FROM items WHERE state = 'pending' AND expires_at <= ?", (now,)
        ).fetchall()
        for row in rows:
            self._ledger.finish(
                conn, [row], ItemState.EXPIRED, now, changes, error=expired_reason(row)
            )

    def purge(self, conn: sqlite3.Connection, older_than_s: float) -> int:
        cutoff = (self._clock.wall() - older_than_s,)
        where = "FROM items WHERE finished_at IS NOT NULL AND finished_at < ?"
        n, size = conn.execute(
            f"SELECT COUNT(*), COALESCE(SUM(result_bytes + payload_bytes), 0) {where}", cutoff
        ).fetchone()
        # The freed pages are reused by later items; the file keeps its high-water mark.
        conn.execute(f"DELETE {where}", cutoff)
        self._ledger.apply(conn, Changes(used=-size))
        return int(n)
