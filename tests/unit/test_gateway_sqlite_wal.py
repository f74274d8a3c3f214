"""The SQLite idempotency store under steady writes: checkpoints let the WAL start over."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from cloud_gateway.idempotency import SqliteIdempotencyStore, scope_id, sqlite_store


def wal_restarts(db: Path) -> int:
    """The WAL header's checkpoint sequence number: SQLite adds one each time the WAL starts over."""
    with db.with_name(db.name + "-wal").open("rb") as wal:
        header = wal.read(16)
    return int(struct.unpack(">I", header[12:16])[0])


async def test_the_wal_starts_over_while_writes_keep_coming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "_CHECKPOINT_EVERY", 10)
    path = tmp_path / "idem.sqlite3"
    store = SqliteIdempotencyStore(path)

    async def request(i: int) -> None:
        scope = scope_id("clinic-1", f"req-{i}")
        assert await store.claim(scope, "fp", f"owner-{i}", 10.0) is None
        await store.complete(scope, f"owner-{i}", b'{"outputs":[]}', 3600.0)

    try:
        await request(-1)
        before = wal_restarts(path)
        # Eight requests in flight at a time, and no pause for a checkpoint to catch up in:
        # with passive checkpoints alone the WAL never started over here, and grew to 18 MB.
        for batch in range(300):
            await asyncio.gather(*(request(batch * 8 + k) for k in range(8)))
        assert store.commits >= 600
        assert wal_restarts(path) - before >= 5
        assert store.record(scope_id("clinic-1", "req-2399")) is not None
    finally:
        await store.aclose()
