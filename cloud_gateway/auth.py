"""Bearer authentication of devices: parse the header, check the key, cache the lookup briefly.

The cache holds key ids and secret hashes, never a key, and only for `cache_s` seconds, so a
revoked key stops working within that time while most requests skip the database.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cloud_gateway.errors import AuthenticationFailed
from cloud_gateway.keys import KeyStore, check_secret, split_token
from cloud_gateway.worker_threads import run_blocking

__all__ = ["Authenticator"]

_Found = tuple[str, bytes, bool] | None


class Authenticator:
    """Turns an `Authorization` header into a device name, or raises AuthenticationFailed."""

    def __init__(
        self,
        keys: KeyStore,
        *,
        cache_s: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
        max_cached: int = 100_000,
    ) -> None:
        self._keys = keys
        self._cache_s = cache_s
        self._monotonic = monotonic
        self._max_cached = max_cached
        self._cache: dict[str, tuple[float, _Found]] = {}

    async def device(self, authorization: str | None) -> str:
        if not authorization:
            raise AuthenticationFailed("missing")
        scheme, _, token = authorization.partition(" ")
        # RFC 9110 §11.1: the auth scheme is case-insensitive.
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed("malformed")
        key_id, secret = split_token(token.strip())
        return check_secret(await self._lookup(key_id), secret)

    async def _lookup(self, key_id: str) -> _Found:
        now = self._monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await run_blocking(self._keys.lookup, key_id)
        if self._cache_s > 0:
            if len(self._cache) >= self._max_cached:
                # Guessed ids could fill memory; dropping everything is rare and only costs lookups.
                self._cache.clear()
            self._cache[key_id] = (now + self._cache_s, found)
        return found
