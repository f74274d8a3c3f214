"""The idempotency store for several replicas: one Redis hash per key, changed by Lua scripts.

Each script runs atomically in Redis, so claim-or-read and owner-checked updates need no locks.
Pending marks and answers both lapse through Redis key expiry; there is nothing to purge.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from cloud_gateway.errors import StoreUnavailable
from cloud_gateway.idempotency.base import Existing

__all__ = ["RedisIdempotencyStore"]

_PREFIX = "cloud-gateway:idempotency:"

# KEYS[1] scope; ARGV fingerprint, owner, pending ttl in ms.
_CLAIM = """
local found = redis.call('HMGET', KEYS[1], 'fp', 'owner', 'body')
if found[1] then
  if found[2] then return {found[1], false} end
  return {found[1], found[3]}
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'owner', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return false
"""
# KEYS[1] scope; ARGV owner, ttl in ms.
_RENEW = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] scope; ARGV owner, body, retention in ms.
_COMPLETE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'owner')
  redis.call('HSET', KEYS[1], 'body', ARGV[2])
  return redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 0
"""
# KEYS[1] scope; ARGV owner.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisIdempotencyStore:
    name = "redis"

    def __init__(
        self, url: str, *, retry_after_s: float = 5.0, client: aioredis.Redis | None = None
    ) -> None:
        self._retry_after_s = retry_after_s
        self._redis = client or aioredis.Redis.from_url(
            url, socket_timeout=5.0, socket_connect_timeout=5.0
        )
        self._claim = self._redis.register_script(_CLAIM)
        self._renew = self._redis.register_script(_RENEW)
        self._complete = self._redis.register_script(_COMPLETE)
        self._release = self._redis.register_script(_RELEASE)

    async def _call(self, result: Awaitable[Any]) -> Any:
        try:
            return await result
        except (RedisError, OSError) as exc:
            problem = str(exc) or type(exc).__name__
            raise StoreUnavailable(self.name, problem, self._retry_after_s) from exc

    async def claim(
        self, scope: str, fingerprint: str, owner: str, pending_ttl_s: float
    ) -> Existing | None:
        found = await self._call(
            self._claim(keys=[_PREFIX + scope], args=[fingerprint, owner, _ms(pending_ttl_s)])
        )
        if not found:
            return None
        fp, body = found[0], found[1] if len(found) > 1 else None
        return Existing(fp.decode(), None if body is None else bytes(body))

    async def renew(self, scope: str, owner: str, pending_ttl_s: float) -> None:
        await self._call(self._renew(keys=[_PREFIX + scope], args=[owner, _ms(pending_ttl_s)]))

    async def complete(self, scope: str, owner: str, body: bytes, retention_s: float) -> None:
        await self._call(
            self._complete(keys=[_PREFIX + scope], args=[owner, body, _ms(retention_s)])
        )

    async def release(self, scope: str, owner: str) -> None:
        await self._call(self._release(keys=[_PREFIX + scope], args=[owner]))

    async def purge_expired(self) -> int:
        return 0

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def aclose(self) -> None:
        await self._redis.aclose()
