"""The Redis idempotency store keeps the same bounds as SQLite's, with Redis expiring records by
itself: answers admitted while there is room, the rest refused, room back as records expire."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from cloud_gateway.errors import StoreFull
from cloud_gateway.idempotency import RedisIdempotencyStore, StoreBounds, scope_id

pytestmark = pytest.mark.integration

KiB = 1024
BOUNDS = StoreBounds(max_bytes=2048 * KiB, max_answer_bytes=256 * KiB)
ANSWER = b"x" * (200 * KiB)
TOTAL = "cloud-gateway:idempotency-total-bytes"
# Answers admitted into an empty store: a new key needs room for one more maximum-size answer.
CAPACITY = (BOUNDS.max_bytes - BOUNDS.max_answer_bytes) // len(ANSWER) + 1


@pytest.fixture
def client(redis_client: aioredis.Redis) -> aioredis.Redis:
    return redis_client


async def total_bytes(client: aioredis.Redis) -> int:
    return int(await client.get(TOTAL) or 0)


async def fill(store: RedisIdempotencyStore, prefix: str, retention_s: float) -> int:
    for i in range(100):
        scope = scope_id("clinic-1", f"{prefix}-{i}")
        try:
            await store.claim(scope, "fp", f"o-{i}", 10.0)
        except StoreFull:
            return i
        await store.complete(scope, f"o-{i}", ANSWER, retention_s)
    pytest.fail("the store took 20 MB of answers")


async def test_answers_are_admitted_up_to_the_bytes_then_refused(client: aioredis.Redis) -> None:
    evicted: list[int] = []
    store = RedisIdempotencyStore(
        "", bounds=BOUNDS, client=client, on_evicted=lambda reason, n: evicted.append(n)
    )
    stored = await fill(store, "a", retention_s=3600.0)
    assert stored == CAPACITY
    assert await total_bytes(client) == stored * len(ANSWER)
    with pytest.raises(StoreFull) as full:
        await store.claim(scope_id("clinic-1", "more"), "fp", "o", 10.0)
    assert 3500 < full.value.retry_after_s <= 3600  # until the oldest answer expires
    # A repeat is answered however full the store is.
    again = await store.claim(scope_id("clinic-1", "a-0"), "fp", "o-again", 10.0)
    assert again is not None
    assert again.body == ANSWER
    assert evicted == []


async def test_expired_answers_and_lapsed_marks_give_their_room_back(
    client: aioredis.Redis,
) -> None:
    evicted: list[int] = []
    store = RedisIdempotencyStore(
        "", bounds=BOUNDS, client=client, on_evicted=lambda reason, n: evicted.append(n)
    )
    # A worker that died holding a mark: its answer's room is held until the mark lapses.
    await store.claim(scope_id("clinic-1", "dead"), "fp", "dead-owner", 0.05)
    assert await total_bytes(client) == BOUNDS.max_answer_bytes
    stored = await fill(store, "short", retention_s=0.05)
    assert stored >= 1
    # Redis's clock: wait for the expiries through the store itself, no sleeping.
    while await store.purge_expired() == 0:
        pass
    while await total_bytes(client) > 0:
        await store.purge_expired()
    assert sum(evicted) == stored + 1
    # All the room is back. (Under load the short-lived answers may expire while `fill` still
    # runs, so `stored` itself can exceed the capacity: compare with the capacity.)
    assert await fill(store, "later", retention_s=3600.0) == CAPACITY
