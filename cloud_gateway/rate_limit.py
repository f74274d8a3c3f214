"""Per-device rate limits shared by every worker and replica: a token bucket per device in Redis,
taken from by one Lua script, with the worker's own bucket as the fallback while Redis is away.
"""

from __future__ import annotations

import logging
from typing import Protocol

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from cloud_gateway.errors import RateLimited
from cloud_gateway.limits import RateLimiter

__all__ = ["DeviceRateLimiter", "RedisRateLimiter"]

log = logging.getLogger("cloud_gateway")

# Apart from the idempotency store's `cloud-gateway:idempotency:<sha256>` keys.
_PREFIX = "cloud-gateway:rate:"

# KEYS[1] bucket; ARGV rate per s, burst. Returns 0, or the wait for the next token in whole ms
# (rounded up, as RateLimited's is). Redis's clock, not the workers': replicas may disagree.
_TAKE = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local found = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(found[1]) or burst
local stamp = tonumber(found[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens < 1 then
  wait = math.ceil((1 - tokens) / rate * 1000)
else
  tokens = tokens - 1
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'stamp', now)
-- Gone once full again: an absent bucket is a full one, so idle devices leave no keys.
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1)
return wait
"""


class DeviceRateLimiter(Protocol):
    async def acquire(self, device: str) -> None:
        """Take one token for `device`, or raise RateLimited with the wait until the next."""


class RedisRateLimiter:
    """RateLimiter's token bucket, kept in Redis so that the rate holds across every process.

    If Redis cannot be reached, the worker's own bucket decides and `errors` counts the check:
    the limit then holds per worker, as in SQLite mode, rather than refusing every device.
    """

    def __init__(
        self, client: aioredis.Redis, rate_per_s: float, burst: int, *, errors: Counter
    ) -> None:
        self._args = (rate_per_s, burst)
        self._take = client.register_script(_TAKE)  # EVALSHA, loading the script on NOSCRIPT
        self._local = RateLimiter(rate_per_s, burst)
        self._errors = errors
        self._failing = False

    async def acquire(self, device: str) -> None:
        try:
            wait_ms = await self._take(keys=[_PREFIX + device], args=self._args)
        except (RedisError, OSError) as exc:
            self._errors.inc()
            if not self._failing:
                self._failing = True
                log.warning("rate limit kept per worker: Redis is unreachable (%s)", exc)
            await self._local.acquire(device)
            return
        if self._failing:
            self._failing = False
            log.info("rate limit shared through Redis again")
        if wait_ms:
            raise RateLimited(int(wait_ms) / 1000)
