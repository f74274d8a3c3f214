"""The contract of an idempotency store: claim a key, renew, complete or release the claim.

A record is either pending (claimed by one worker, lapsing unless renewed) or done (holding the
answer until the retention ends). Stores only keep records; the rules live in `guard.py`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Existing", "IdempotencyStore", "scope_id"]


def scope_id(device: str, key: str) -> str:
    """The store's id of a device's key: keys are per device, and no raw key is stored."""
    return hashlib.sha256(f"{device}\n{key}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Existing:
    """A record that was already there when a claim was tried; `body` is None while pending."""

    fingerprint: str
    body: bytes | None


class IdempotencyStore(Protocol):
    name: str

    async def claim(
        self, scope: str, fingerprint: str, owner: str, pending_ttl_s: float
    ) -> Existing | None:
        """Atomically mark `scope` pending for `owner` and return None, or return what is there.

        A pending record whose mark has lapsed counts as absent.
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
