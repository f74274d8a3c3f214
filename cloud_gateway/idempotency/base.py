"""The contract of an idempotency store: claim a key, renew, complete or release the claim.

A record is either pending (claimed by one worker, lapsing unless renewed) or done (holding the
answer until the retention ends). Stores only keep records; the rules live in `guard.py`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Existing", "IdempotencyStore", "StoreBounds", "scope_id"]

MiB = 1024 * 1024


def scope_id(device: str, key: str) -> str:
    """The store's id of a device's key: keys are per device, and no raw key is stored."""
    return hashlib.sha256(f"{device}\n{key}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Existing:
    """A record that was already there when a claim was tried; `body` is None while pending."""

    fingerprint: str
    body: bytes | None


@dataclass(frozen=True, slots=True)
class StoreBounds:
    """What a store may hold. A claim is refused (StoreFull) unless there is room for one more
    answer of `max_answer_bytes` beside those stored and those being computed; expired
    records, oldest first, are deleted to make room before that."""

    max_bytes: int = 1024 * MiB
    """All the store's bytes: for SQLite its files (database, WAL, shared memory), for Redis
    the answers' bytes."""
    max_answer_bytes: int = MiB

    @property
    def wal_bytes(self) -> int:
        """SQLite: the WAL's share of `max_bytes` (an eighth, 1-64 MiB); the database file gets
        the rest, less twice this share and the shared-memory file."""
        return min(64 * MiB, max(MiB, self.max_bytes // 8))


class IdempotencyStore(Protocol):
    name: str

    async def claim(
        self, scope: str, fingerprint: str, owner: str, pending_ttl_s: float
    ) -> Existing | None:
        """Atomically mark `scope` pending for `owner` and return None, or return what is there.

        A pending record whose mark has lapsed counts as absent. Raises StoreFull when a new
        mark would leave no room for its answer (StoreBounds), and nothing has expired.
        """

    async def renew(self, scope: str, owner: str, pending_ttl_s: float) -> None:
        """Push the lapse of `owner`'s pending mark `pending_ttl_s` into the future."""

    async def complete(self, scope: str, owner: str, body: bytes, retention_s: float) -> None:
        """Store the answer under `owner`'s mark, kept for `retention_s`."""

    async def release(self, scope: str, owner: str) -> None:
        """Drop `owner`'s pending mark, so the request's retry runs again."""

    async def purge_expired(self) -> int:
        """Delete lapsed marks and answers past their retention; returns how many."""

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    async def aclose(self) -> None: ...
