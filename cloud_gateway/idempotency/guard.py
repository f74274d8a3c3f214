"""IdempotencyGuard: run a request's work once per key, replay its answer to every repeat.

Duplicates in the same worker wait on the first one's future; duplicates in other workers or
replicas poll the shared store until the answer is stored or the first one's mark lapses.
Only answers are stored: a failure releases the mark, so the device's retry runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cloud_gateway.errors import IdempotencyInProgress, IdempotencyKeyReused
from cloud_gateway.idempotency.base import IdempotencyStore

__all__ = ["IdempotencyGuard", "IdempotencyPolicy", "Outcome"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IdempotencyPolicy:
    retention_s: float = 7 * 86_400.0
    pending_ttl_s: float = 10.0
    wait_s: float = 60.0
    poll_min_s: float = 0.005
    poll_max_s: float = 0.1


@dataclass(frozen=True, slots=True)
class Outcome:
    body: bytes
    replayed: bool


class _LeaderGone(Exception):
    """The first request of this worker was cancelled; its duplicates start over."""


class IdempotencyGuard:
    def __init__(
        self,
        store: IdempotencyStore,
        policy: IdempotencyPolicy | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.policy = policy or IdempotencyPolicy()
        self._monotonic = monotonic
        self._sleep = sleep
        self._local: dict[str, tuple[str, asyncio.Future[bytes]]] = {}
        # Owner ids only need to be unique: a random prefix per guard, then a counter.
        self._owner_prefix = uuid.uuid4().hex[:16]
        self._owners = itertools.count()
        self._held: dict[str, str] = {}  # scope -> owner, for every mark this guard holds
        self._renewer: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        if self._renewer is not None:
            await _stop(self._renewer)

    async def run(
        self, scope: str, fingerprint: str, work: Callable[[], Awaitable[bytes]]
    ) -> Outcome:
        """The answer for `scope`: from `work()` if this is the first request, else replayed.

        Raises IdempotencyKeyReused when `scope` was used with a different `fingerprint`, and
        IdempotencyInProgress when the first request is still running after `wait_s`.
        """
        while True:
            local = self._local.get(scope)
            if local is None:
                break
            their_fingerprint, future = local
            if their_fingerprint != fingerprint:
                raise IdempotencyKeyReused()
            try:
                return Outcome(await asyncio.shield(future), replayed=True)
            except _LeaderGone:
                continue
        future = asyncio.get_running_loop().create_future()
        self._local[scope] = (fingerprint, future)
        try:
            outcome = await self._run_shared(scope, fingerprint, work)
        except asyncio.CancelledError:
            _fail(future, _LeaderGone())
            raise
        except BaseException as exc:
            # Duplicates in this worker share the first one's failure, as they would its answer.
            _fail(future, exc)
            raise
        else:
            future.set_result(outcome.body)
            return outcome
        finally:
            del self._local[scope]

    async def _run_shared(
        self, scope: str, fingerprint: str, work: Callable[[], Awaitable[bytes]]
    ) -> Outcome:
        policy = self.policy
        owner = f"{self._owner_prefix}-{next(self._owners)}"
        deadline = self._monotonic() + policy.wait_s
        delay = policy.poll_min_s
        while True:
            existing = await self.store.claim(scope, fingerprint, owner, policy.pending_ttl_s)
            if existing is None:
                break
            if existing.fingerprint != fingerprint:
                raise IdempotencyKeyReused()
            if existing.body is not None:
                return Outcome(existing.body, replayed=True)
            if self._monotonic() >= deadline:
                raise IdempotencyInProgress(retry_after_s=policy.pending_ttl_s)
            await self._sleep(delay)
            delay = min(delay * 2, policy.poll_max_s)

        self._hold(scope, owner)
        try:
            body = await work()
        except BaseException:
            del self._held[scope]
            await self._release(scope, owner)
            raise
        del self._held[scope]
        await self.store.complete(scope, owner, body, policy.retention_s)
        return Outcome(body, replayed=False)

    def _hold(self, scope: str, owner: str) -> None:
        self._held[scope] = owner
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_held())

    async def _renew_held(self) -> None:
        # One task renews every mark this worker holds, well before they lapse; a dead worker
        # renews nothing, and its marks lapse pending_ttl_s later so a duplicate can take over.
        ttl = self.policy.pending_ttl_s
        while self._held:
            await self._sleep(ttl / 3)
            renewals = [self.store.renew(s, o, ttl) for s, o in list(self._held.items())]
            for result in await asyncio.gather(*renewals, return_exceptions=True):
                if isinstance(result, Exception):
                    log.warning("could not renew an idempotency mark: %s", result)

    async def _release(self, scope: str, owner: str) -> None:
        # Shielded: the release must happen even when the request itself was cancelled. If it
        # fails, the mark still lapses after pending_ttl_s.
        try:
            await asyncio.shield(self.store.release(scope, owner))
        except Exception as exc:
            log.warning("could not release an idempotency mark: %s", exc)


def _fail(future: asyncio.Future[bytes], exc: BaseException) -> None:
    future.set_exception(exc)
    # Mark it retrieved: with no duplicate waiting, asyncio would log it as never retrieved.
    future.exception()


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
