"""The durable queue's books: its totals mirrored in memory (bytes used against the cap, end-state
counts, the last end number), the one way an item ends, and the reading of a row as ItemStatus.

Everything here runs on the queue's SQLite thread, inside the job that changes the file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from model_runtime.encryption import Keyring
from router.queue_schema import ItemState, ItemStatus

ROW_OVERHEAD_BYTES = 256
# Column order of COLUMNS: the first eleven are ItemStatus's fields, then its owner.
COLUMNS = (
    "ticket, model, state, priority, enqueued_at, expires_at, attempts, finished_at, result,"
    " last_error, end_seq, seq, payload_bytes, owner"
)
SEQ, PAYLOAD_BYTES, OWNER = 11, 12, 13
# Attempts are counted when an item is claimed for delivery: a claim cut off by a restart or a
# lost lease may have reached the cloud, so it counts as a delivery tried.
TO_PENDING = "UPDATE items SET state = 'pending', lease_until = NULL"
REFUSED = "admission_rejected"
EVICTED = "results_evicted"


@dataclass
class Changes:
    """What a job did to the state mirrored in memory; applied only once its SQL succeeded."""

    used: int = 0
    ended: list[ItemStatus] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n


class QueueLedger:
    """The in-memory mirror of what is on disk; written only on the queue's SQLite thread."""

    def __init__(self, keyring: Keyring, cap_bytes: int | None) -> None:
        self.keyring = keyring
        self.cap_bytes = cap_bytes
        self.used = 0
        """Bytes accounted against cap_bytes (see DurableQueue's docstring)."""
        self.counts: dict[str, int] = {}
        self.end_seq = 0
        self._just_ended: list[ItemStatus] = []

    def finish(
        self,
        conn: sqlite3.Connection,
        rows: Sequence[Any],
        state: ItemState,
        now: float,
        changes: Changes,
        result: bytes | None = None,
        error: str | None = None,
    ) -> None:
        """End `rows` (selected as COLUMNS): free the payload, keep the result (sealed), number
        the end. The ItemStatus handed to `on_end` holds the result as given."""
        for r in rows:
            stored = (
                None if result is None else self.keyring.seal(result, sealed_for("result", r[0]))
            )
            # Numbers handed out by a job that is rolled back are skipped, never reused.
            self.end_seq += 1
            last_error = r[9] if error is None else error[:500]
            conn.execute(
                "UPDATE items SET state = ?, finished_at = ?, end_seq = ?, lease_until = NULL,"
                " payload = NULL, payload_bytes = 0, result = ?, result_bytes = ?, last_error = ?"
                " WHERE seq = ?",
                (state.value, now, self.end_seq, stored, len(stored or b""), last_error, r[SEQ]),
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
                    self.end_seq,
                    r[OWNER],
                )
            )
            changes.used += len(stored or b"") - r[PAYLOAD_BYTES] - ROW_OVERHEAD_BYTES
            changes.count(state.value)

    def apply(self, conn: sqlite3.Connection, changes: Changes) -> None:
        """Write the counters, then mirror the job's changes in memory (its last step)."""
        if changes.counts or changes.ended:
            conn.executemany(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                list(changes.counts.items()),
            )
            conn.execute("INSERT OR REPLACE INTO counters VALUES ('end_seq', ?)", (self.end_seq,))
        self.used += changes.used
        for name, n in changes.counts.items():
            self.counts[name] = self.counts.get(name, 0) + n
        self._just_ended += changes.ended

    def take_ended(self) -> list[ItemStatus]:
        """The items that ended in the transaction just committed (once)."""
        ended, self._just_ended = self._just_ended, []
        return ended

    def resync(self, conn: sqlite3.Connection) -> None:
        """Reload the mirror from disk (at open, and after a failed commit)."""
        self.used = int(
            conn.execute(
                "SELECT COALESCE(SUM(payload_bytes + result_bytes"
                " + CASE WHEN finished_at IS NULL THEN ? ELSE 0 END), 0) FROM items",
                (ROW_OVERHEAD_BYTES,),
            ).fetchone()[0]
        )
        counts = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        self.end_seq = max(self.end_seq, int(counts.pop("end_seq", 0)))
        self.counts = {name: int(n) for name, n in counts.items()}
        self._just_ended = []

    def status(self, r: Any) -> ItemStatus:
        """A row selected as COLUMNS, its result opened."""
        result = None if r[8] is None else self.keyring.open(r[8], sealed_for("result", r[0]))
        return ItemStatus(
            r[0], r[1], ItemState(r[2]), r[3], r[4], r[5], r[6], r[7], result, r[9], r[10], r[13]
        )


def sealed_for(column: str, ticket: str) -> bytes:
    """What a sealed blob is bound to: its column and its row's ticket."""
    return f"queue.{column}\x00{ticket}".encode()


def expired_reason(r: Any) -> str:
    """Why an item (a row of COLUMNS) expired, with what its last attempt met, if any."""
    ttl = r[5] - r[4]
    tried = f"{r[6]} attempt(s)" if r[6] else "no attempt"
    text = f"expired: its ttl of {ttl:.0f} s passed before it could be delivered ({tried}"
    return text + (f"; the last: {r[9]})" if r[9] else ")")
