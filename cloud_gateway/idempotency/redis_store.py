"""The idempotency store for several replicas: one Redis hash per key, changed by Lua scripts.

Each script runs atomically in Redis, so claim-or-read and owner-checked updates need no locks.
Pending marks and answers both lapse through Redis key expiry. Their bytes are accounted beside
them (an expiry index, sizes, a total), so that a claim is admitted only with room for its answer
under `StoreBounds.max_bytes`: a pending mark holds `max_answer_bytes` until its answer replaces
that with its own size. Expired entries leave the accounting at the next claims and purges.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from cloud_gateway.errors import StoreFull, StoreUnavailable
from cloud_gateway.idempotency.base import Existing, StoreBounds

__all__ = ["RedisIdempotencyStore"]

_PREFIX = "cloud-gateway:idempotency:"
# Beside the records: every record's expiry (a sorted set) and bytes (a hash), and their sum,
# so that the store's bytes are known and bounded though Redis expires records by itself.
_INDEX = "cloud-gateway:idempotency-expiry"
_SIZES = "cloud-gateway:idempotency-bytes"
_TOTAL = "cloud-gateway:idempotency-total-bytes"
_KEYS = [_INDEX, _SIZES, _TOTAL]

# Shared by the scripts: Redis's clock in ms, and the removal of up to `limit` records whose
# expiry has passed from the accounting (and of the record, if Redis has not expired it yet).
# KEYS[1] index, KEYS[2] sizes, KEYS[3] total; ARGV[1] the records' key prefix.
_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function forget(scope)
  local size = tonumber(redis.call('HGET', KEYS[2], scope)) or 0
  redis.call('HDEL', KEYS[2], scope)
  redis.call('ZREM', KEYS[1], scope)
  if size ~= 0 then redis.call('DECRBY', KEYS[3], size) end
end
local function evict(now, limit)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
  for _, scope in ipairs(gone) do
    forget(scope)
    redis.call('DEL', ARGV[1] .. scope)
  end
  return #gone
end
"""
# ARGV prefix, scope, fingerprint, owner, pending ttl ms, room (bytes), max bytes, evict limit.
# Returns {kind, fingerprint or oldest expiry, body, evicted}: kind new, existing or full.
_CLAIM = (
    _COMMON
    + """
local key = ARGV[1] .. ARGV[2]
local now = now_ms()
local evicted = evict(now, tonumber(ARGV[8]))
local found = redis.call('HMGET', key, 'fp', 'owner', 'body')
if found[1] then
  if found[2] then return {'existing', found[1], false, evicted} end
  return {'existing', found[1], found[3], evicted}
end
local room = tonumber(ARGV[6])
local held = tonumber(redis.call('HGET', KEYS[2], ARGV[2])) or 0
local total = (tonumber(redis.call('GET', KEYS[3])) or 0) - held
if total + room > tonumber(ARGV[7]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {'full', oldest[2] or tostring(now), false, evicted}
end
redis.call('HSET', key, 'fp', ARGV[3], 'owner', ARGV[4])
redis.call('PEXPIRE', key, ARGV[5])
-- A pending mark holds room for its answer until the answer or its lapse.
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], room)
redis.call('INCRBY', KEYS[3], room - held)
return {'new', false, false, evicted}
"""
)
# ARGV prefix, scope, owner, ttl in ms.
_RENEW = (
    _COMMON
    + """
local key = ARGV[1] .. ARGV[2]
if redis.call('HGET', key, 'owner') == ARGV[3] then
  redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[4]), ARGV[2])
  return redis.call('PEXPIRE', key, ARGV[4])
end
return 0
"""
)
# ARGV prefix, scope, owner, body, retention in ms.
_COMPLETE = (
    _COMMON
    + """
local key = ARGV[1] .. ARGV[2]
if redis.call('HGET', key, 'owner') == ARGV[3] then
  redis.call('HDEL', key, 'owner')
  redis.call('HSET', key, 'body', ARGV[4])
  redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[5]), ARGV[2])
  local held = tonumber(redis.call('HGET', KEYS[2], ARGV[2])) or 0
  redis.call('HSET', KEYS[2], ARGV[2], #ARGV[4])
  redis.call('INCRBY', KEYS[3], #ARGV[4] - held)
  return redis.call('PEXPIRE', key, ARGV[5])
end
return 0
"""
)
# ARGV prefix, scope, owner.
_RELEASE = (
    _COMMON
    + """
local key = ARGV[1] .. ARGV[2]
if redis.call('HGET', key, 'owner') == ARGV[3] then
  forget(ARGV[2])
  return redis.call('DEL', key)
end
return 0
"""
)
# ARGV prefix, evict limit. Returns how many records it forgot.
_PURGE = (
    _COMMON
    + """
return evict(now_ms(), tonumber(ARGV[2]))
"""
)


_EVICT_BATCH = 64  # expired records a claim takes out of the accounting, at most


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisIdempotencyStore:
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        bounds: StoreBounds | None = None,
        on_evicted: Callable[[str, int], None] | None = None,
        retry_after_s: float = 5.0,
        client: aioredis.Redis | None = None,
    ) -> None:
        """`on_evicted("expired", n)` counts records whose expiry left the accounting."""
        self.bounds = bounds or StoreBounds()
        self._on_evicted = on_evicted or (lambda reason, n: None)
        self._retry_after_s = retry_after_s
        self._redis = client or aioredis.Redis.from_url(
            url, socket_timeout=5.0, socket_connect_timeout=5.0
        )
        self._claim = self._redis.register_script(_CLAIM)
        self._renew = self._redis.register_script(_RENEW)
        self._complete = self._redis.register_script(_COMPLETE)
        self._release = self._redis.register_script(_RELEASE)
        self._purge = self._redis.register_script(_PURGE)

    async def _call(self, result: Awaitable[Any]) -> Any:
        try:
            return await result
        except (RedisError, OSError) as exc:
            problem = str(exc) or type(exc).__name__
            raise StoreUnavailable(self.name, problem, self._retry_after_s) from exc

    async def claim(
        self, scope: str, fingerprint: str, owner: str, pending_ttl_s: float
    ) -> Existing | None:
        args: list[str | int | bytes] = [
            _PREFIX,
            scope,
            fingerprint,
            owner,
            _ms(pending_ttl_s),
            self.bounds.max_answer_bytes,
            self.bounds.max_bytes,
            _EVICT_BATCH,
        ]
        kind, found, body, evicted = await self._call(self._claim(keys=_KEYS, args=args))
        if evicted:
            self._on_evicted("expired", int(evicted))
        if kind == b"new":
            return None
        if kind == b"full":
            wait_s = (float(found) - time.time() * 1000) / 1000
            raise StoreFull(self.bounds.max_bytes, min(3600.0, max(1.0, wait_s)))
        return Existing(found.decode(), None if body is None else bytes(body))

    async def renew(self, scope: str, owner: str, pending_ttl_s: float) -> None:
        args: list[str | int | bytes] = [_PREFIX, scope, owner, _ms(pending_ttl_s)]
        await self._call(self._renew(keys=_KEYS, args=args))

    async def complete(self, scope: str, owner: str, body: bytes, retention_s: float) -> None:
        args: list[str | int | bytes] = [_PREFIX, scope, owner, body, _ms(retention_s)]
        await self._call(self._complete(keys=_KEYS, args=args))

    async def release(self, scope: str, owner: str) -> None:
        await self._call(self._release(keys=_KEYS, args=[_PREFIX, scope, owner]))

    async def purge_expired(self) -> int:
        """Takes expired records out of the accounting (Redis deletes them by itself)."""
        total = 0
        while True:
            evicted = int(await self._call(self._purge(keys=_KEYS, args=[_PREFIX, 1000])))
            total += evicted
            if evicted < 1000:
                break
        if total:
            self._on_evicted("expired", total)
        return total

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def aclose(self) -> None:
        await self._redis.aclose()
