"""The durable queue's schema (its migrations) and the records read from it.

Opening, migrating and quarantining the file is router.sqlite_files' work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from router.sqlite_files import Migration

__all__ = [
    "END_STATES",
    "QUEUE_MIGRATIONS",
    "ItemState",
    "ItemStatus",
    "QueueStats",
    "QueuedItem",
]

QUEUE_MIGRATIONS: Sequence[Migration] = (
    (
        # seq orders items of equal priority and age; ticket is the caller-facing id.
        """CREATE TABLE items (
            seq           INTEGER PRIMARY KEY,
            ticket        TEXT    NOT NULL UNIQUE,
            model         TEXT    NOT NULL,
            priority      INTEGER NOT NULL,
            enqueued_at   REAL    NOT NULL,
            expires_at    REAL    NOT NULL,
            attempts      INTEGER NOT NULL DEFAULT 0,
            state         TEXT    NOT NULL,
            lease_until   REAL,
            last_error    TEXT,
            payload       BLOB,
            payload_bytes INTEGER NOT NULL,
            result        BLOB,
            result_bytes  INTEGER NOT NULL DEFAULT 0,
            finished_at   REAL,
            end_seq       INTEGER
        )""",
        # Partial indexes: an insert pays only for the entries a pending item needs.
        "CREATE INDEX items_waiting ON items (state, priority, enqueued_at, seq)",
        "CREATE INDEX items_pending_expiry ON items (expires_at) WHERE state = 'pending'",
        "CREATE UNIQUE INDEX items_end_seq ON items (end_seq) WHERE end_seq IS NOT NULL",
        "CREATE INDEX items_finished ON items (finished_at) WHERE finished_at IS NOT NULL",
        # Totals outlive purged rows: end states, rejections, the last end_seq handed out.
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    ),
    (
        # Who queued the item (edge_agent.access: caller and client id): GetResult and
        # WatchResults show its result to that owner only. '' for items queued before.
        "ALTER TABLE items ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX items_owner_end ON items (owner, end_seq) WHERE end_seq IS NOT NULL",
    ),
    (
        # Priorities follow Triton's convention from version 3 on: 1 is the most urgent. Rows
        # written when 0-9 meant higher-first become 10 - p: the drain order is kept, and the
        # old default 5 is the new default 5.
        "UPDATE items SET priority = 10 - priority",
    ),
)


class ItemState(StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DELIVERED = "delivered"  # the cloud answered; the answer is kept as the result
    EXPIRED = "expired"  # its TTL passed while it waited
    DROPPED = "dropped"  # pushed out by the drop_oldest_lowest full policy
    REJECTED = "rejected"  # the cloud refused the request itself (4xx): it will never be answered


END_STATES = frozenset(
    {ItemState.DELIVERED, ItemState.EXPIRED, ItemState.DROPPED, ItemState.REJECTED}
)


@dataclass(frozen=True, slots=True)
class QueuedItem:
    """A claimed item, to be sent with `ticket` as its Idempotency-Key."""

    ticket: str
    model: str
    payload: bytes
    priority: int
    enqueued_at: float
    expires_at: float
    attempts: int
    """Deliveries tried, this one included (a claim cut off by a restart counts)."""


@dataclass(frozen=True, slots=True)
class ItemStatus:
    """What GetResult can tell of a ticket. `end_seq` orders end states, for resumable watchers."""

    ticket: str
    model: str
    state: ItemState
    priority: int
    enqueued_at: float
    expires_at: float
    attempts: int
    finished_at: float | None
    result: bytes | None
    last_error: str | None
    end_seq: int | None
    owner: str = ""
    """Who queued it (an opaque string from the caller's identity); results go to them only."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    depth_by_priority: dict[int, int]
    """Items waiting or in flight, per priority."""
    in_flight: int
    waiting_payload_bytes: int
    used_bytes: int
    """Accounted bytes (see the module docstring), compared with `cap_bytes`."""
    cap_bytes: int | None
    file_bytes: int
    """The database file plus its WAL, as on disk."""
    oldest_enqueued_at: float | None
    """Wall time the oldest waiting (pending) item was enqueued."""
    oldest_pending_age_s: float | None
    ended: dict[str, int]
    """Items that reached each end state since the queue file was created."""
    admission_rejected: int
    """Enqueues refused at the disk cap (QueueFull) since the queue file was created."""
    commits: int
    results_evicted: int = 0
    """Ended items deleted before their retention to keep a larger answer under the cap."""
