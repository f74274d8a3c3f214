"""The shared rate limiter against a real redis-server: RateLimiter's bucket, one for all workers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from cloud_gateway.errors import RateLimited
from cloud_gateway.metrics import GatewayMetrics
from cloud_gateway.rate_limit import RedisRateLimiter
from tests.integration.gateway.helpers import Redis

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_client: aioredis.Redis) -> aioredis.Redis:
    return redis_client


def limiter(
    client: aioredis.Redis, rate: float, burst: int, registry: CollectorRegistry | None = None
) -> RedisRateLimiter:
    metrics = GatewayMetrics(registry or CollectorRegistry())
    return RedisRateLimiter(client, rate, burst, errors=metrics.rate_limit_errors)


async def refused(limit: RedisRateLimiter, device: str = "clinic-1") -> float:
    with pytest.raises(RateLimited) as err:
        await limit.acquire(device)
    return err.value.retry_after_s


async def test_a_burst_then_refusals_with_the_wait_for_the_next_token(
    client: aioredis.Redis,
) -> None:
    limit = limiter(client, rate=2.0, burst=3)
    for _ in range(3):
        await limit.acquire("clinic-1")
    wait = await refused(limit)
    assert 0.45 < wait <= 0.5  # one token every 0.5 s, less the little refilled meanwhile
    assert wait == round(wait, 3)  # whole milliseconds, rounded up, as RateLimiter's
    await limit.acquire("clinic-2")  # buckets are per device
    # Idle buckets expire once they would be full again (1.5 s here), apart from other keys.
    keys = sorted(k.decode() for k in await client.keys("*"))
    assert keys == ["cloud-gateway:rate:clinic-1", "cloud-gateway:rate:clinic-2"]
    assert 0 < await client.pttl("cloud-gateway:rate:clinic-1") <= 1501


async def test_the_bucket_refills_at_the_rate_up_to_the_burst(client: aioredis.Redis) -> None:
    # A token every 0.25 s: each check below is a few Redis round trips, far shorter than that
    # even on a busy machine, so no token can slip in between them.
    limit = limiter(client, rate=4.0, burst=3)
    for _ in range(3):
        await limit.acquire("clinic-1")
    wait = await refused(limit)
    assert 0 < wait <= 0.25
    await asyncio.sleep(wait)  # the wait it gave is enough, and no more than one token comes
    await limit.acquire("clinic-1")
    await refused(limit)
    await asyncio.sleep(2.5)  # ten tokens' worth: the bucket holds only the burst
    for _ in range(3):
        await limit.acquire("clinic-1")
    await refused(limit)


async def test_two_workers_share_one_budget(redis_server: Redis, client: aioredis.Redis) -> None:
    other = aioredis.Redis.from_url(redis_server.url)  # another worker's own connection pool
    try:
        workers = [limiter(client, rate=0.01, burst=4), limiter(other, rate=0.01, burst=4)]
        outcomes = []
        for i in range(8):
            try:
                await workers[i % 2].acquire("clinic-1")
                outcomes.append("ok")
            except RateLimited:
                outcomes.append("429")
        assert outcomes == ["ok"] * 4 + ["429"] * 4
    finally:
        await other.aclose()


async def test_concurrent_checks_take_exactly_the_burst(
    redis_server: Redis, client: aioredis.Redis
) -> None:
    other = aioredis.Redis.from_url(redis_server.url)
    try:
        workers = [limiter(client, rate=0.01, burst=10), limiter(other, rate=0.01, burst=10)]

        async def one(i: int) -> bool:
            try:
                await workers[i % 2].acquire("clinic-1")
                return True
            except RateLimited:
                return False

        assert sum(await asyncio.gather(*(one(i) for i in range(50)))) == 10
    finally:
        await other.aclose()


async def test_the_script_is_loaded_again_after_a_script_flush(client: aioredis.Redis) -> None:
    limit = limiter(client, rate=1.0, burst=2)
    await limit.acquire("clinic-1")
    await client.script_flush()  # as after a Redis restart or failover: EVALSHA gets NOSCRIPT
    await limit.acquire("clinic-1")
    await refused(limit)


async def test_without_redis_the_workers_own_bucket_decides_and_is_counted(
    tmp_path: Path,
) -> None:
    gone = aioredis.Redis.from_url(f"unix://{tmp_path / 'no-redis.sock'}")
    registry = CollectorRegistry()
    limit = limiter(gone, rate=0.01, burst=2, registry=registry)
    try:
        await limit.acquire("clinic-1")  # not refused for Redis being away...
        await limit.acquire("clinic-1")
        assert 99 < await refused(limit) <= 100  # ...but still limited, by this worker
    finally:
        await gone.aclose()
    assert registry.get_sample_value("cloud_gateway_rate_limit_errors_total") == 3
