"""The SQLite idempotency store stays within its bytes: answers are admitted while there is room,
expired ones are evicted oldest first to make more, and the rest are refused (issue 12: 48 large
answers made an 862 MB WAL)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cloud_gateway.errors import StoreFull
from cloud_gateway.idempotency import SqliteIdempotencyStore, StoreBounds, scope_id

MiB = 1024 * 1024
BOUNDS = StoreBounds(max_bytes=8 * MiB, max_answer_bytes=256 * 1024)
ANSWER = b"x" * (200 * 1024)


def files_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))


async def test_answers_fill_the_store_up_to_its_bytes_then_are_refused(tmp_path: Path) -> None:
    now = [1000.0]
    evicted: list[tuple[str, int]] = []
    db = tmp_path / "idem.sqlite3"
    store = SqliteIdempotencyStore(
        db, bounds=BOUNDS, now=lambda: now[0], on_evicted=lambda r, n: evicted.append((r, n))
    )
    try:
        stored = 0
        while stored < 200:  # up to 40 MB of answers offered to an 8 MiB store
            scope = scope_id("clinic-1", f"r-{stored}")
            try:
                await store.claim(scope, "fp", f"o-{stored}", 10.0)
            except StoreFull:
                break
            await store.complete(scope, f"o-{stored}", ANSWER, 3600.0)
            stored += 1
            now[0] += 1.0
            assert files_bytes(db) <= BOUNDS.max_bytes
        assert 20 <= stored < 40  # most of the 8 MiB holds answers, and no more
        # Refused before any work, with the wait until the oldest answer expires.
        with pytest.raises(StoreFull) as full:
            await store.claim(scope_id("clinic-1", "one-more"), "fp", "o-more", 10.0)
        assert full.value.retry_after_s == pytest.approx(3600.0 - stored)
        assert "idempotency_max_bytes" in str(full.value)
        # A repeat is still answered from the full store.
        again = await store.claim(scope_id("clinic-1", "r-0"), "fp", "o-again", 10.0)
        assert again is not None
        assert again.body == ANSWER
        # Once the oldest answers expire, they make room for new ones: evicted, and counted.
        now[0] += 3600.0 - stored + 5
        scope = scope_id("clinic-1", "late")
        assert await store.claim(scope, "fp", "o-late", 10.0) is None
        await store.complete(scope, "o-late", ANSWER, 3600.0)
        assert evicted[0][0] == "full"
        assert files_bytes(db) <= BOUNDS.max_bytes
        # The periodic purge counts what it deletes too.
        now[0] += 4000.0
        assert await store.purge_expired() >= 1
        assert evicted[-1][0] == "expired"
    finally:
        await store.aclose()


async def test_two_workers_cannot_both_take_the_last_room(tmp_path: Path) -> None:
    """Two stores on one file, as two gateway workers. Each pending mark holds room for an
    answer, whichever worker holds it: counted in the claim's own write transaction, so when
    the file has room for one more answer, one worker's claim takes it and the other's is
    refused before its model runs (each used to count only its own marks, and both got in)."""
    db = tmp_path / "idem.sqlite3"
    first, second = (SqliteIdempotencyStore(db, bounds=BOUNDS) for _ in range(2))
    try:
        # Bring the file to room for two answers, less a little: small answers, stored while
        # one more mark is pending, until a claim no longer finds room for both.
        assert await first.claim(scope_id("clinic-1", "held"), "fp", "o-held", 60.0) is None
        small = 0
        while True:
            scope = scope_id("clinic-1", f"small-{small}")
            try:
                await first.claim(scope, "fp", f"o-{small}", 60.0)
            except StoreFull:
                break
            await first.complete(scope, f"o-{small}", b"s" * 1024, 3600.0)
            small += 1
        await first.release(scope_id("clinic-1", "held"), "o-held")
        # Room for one answer, and both workers claim at once: one claim takes it, the
        # other finds none left (either may win).
        claims = {
            "a": first.claim(scope_id("clinic-1", "a"), "fp", "o-a", 60.0),
            "b": second.claim(scope_id("clinic-2", "b"), "fp", "o-b", 60.0),
        }
        results = dict(
            zip(claims, await asyncio.gather(*claims.values(), return_exceptions=True), strict=True)
        )
        admitted = [name for name, result in results.items() if result is None]
        refused = [name for name, result in results.items() if isinstance(result, StoreFull)]
        assert (len(admitted), len(refused)) == (1, 1), results
        # The admitted answer, as large as answers get (less SQLite's page overhead), fits.
        (name,) = admitted
        store = first if name == "a" else second
        scope = scope_id("clinic-1" if name == "a" else "clinic-2", name)
        await store.complete(scope, f"o-{name}", b"a" * (240 * 1024), 3600.0)
        assert files_bytes(db) <= BOUNDS.max_bytes
    finally:
        await first.aclose()
        await second.aclose()
