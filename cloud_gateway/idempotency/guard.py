"""IdempotencyGuard: run a request's work once per key, replay its answer to every repeat.

Duplicates in the same worker wait on the first one's future; duplicates in other workers or
replicas poll the shared store until the answer is stored or the first one's mark lapses.
Only answers are stored: a failure releases the mark, so the device's retry runs again.

The promise: the model runs once per key, unless a worker dies between the run and storing its
answer; then at most once more, after its mark lapses. A mark is renewed while its run is alive,
so a slow run is never taken for a dead one; a duplicate that waited runs only if its client is
still there to receive the answer.
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

from cloud_gateway.errors import (
    ClientGone,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    StoreFull,
    StoreUnavailable,
)
from cloud_gateway.idempotency.base import IdempotencyStore
from model_runtime.fault_points import FaultPlan

__all__ = [
    "AFTER_RUN_BEFORE_STORE",
    "ClientCheck",
    "IdempotencyGuard",
    "IdempotencyPolicy",
    "Outcome",
]

log = logging.getLogger(__name__)

AFTER_RUN_BEFORE_STORE = "gateway.after_run_before_store"
"""Fault point: the model has answered, the answer is not stored yet."""

ClientCheck = Callable[[], Awaitable[bool]]
"""True once the request's client has gone (closed its connection)."""


@dataclass(frozen=True, slots=True)
class IdempotencyPolicy:
    retention_s: float = 7 * 86_400.0
    pending_ttl_s: float = 3.0
    wait_s: float = 60.0
    poll_min_s: float = 0.005
    poll_max_s: float = 0.1


@dataclass(frozen=True, slots=True)
class Outcome:
    body: bytes
    replayed: bool
    stored: bool = True
    """False when the store failed to keep a fresh answer: a repeat of the key runs again."""


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
        faults: FaultPlan | None = None,
    ) -> None:
        self.store = store
        self.policy = policy or IdempotencyPolicy()
        self._faults = faults
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
        self,
        scope: str,
        fingerprint: str,
        work: Callable[[], Awaitable[bytes]],
        *,
        client_gone: ClientCheck | None = None,
    ) -> Outcome:
        """The answer for `scope`: from `work()` if this is the first request, else replayed.

        Raises IdempotencyKeyReused when `scope` was used with a different `fingerprint`,
        IdempotencyInProgress when the first request is still running after `wait_s`, and
        ClientGone when this request had to wait and `client_gone()` says nobody waits for it
        any more (then `work` is not run: its answer would reach nobody).
        """
        waited = False
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
                waited = True
                continue
        future = asyncio.get_running_loop().create_future()
        self._local[scope] = (fingerprint, future)
        try:
            outcome = await self._run_shared(scope, fingerprint, work, client_gone, waited)
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
        self,
        scope: str,
        fingerprint: str,
        work: Callable[[], Awaitable[bytes]],
        client_gone: ClientCheck | None,
        waited: bool,
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
            waited = True
            if client_gone is not None and await client_gone():
                raise ClientGone()
        # Only a request that waited can have lost its client meanwhile (a first one starts
        # at once), and only then is it worth asking: the check costs a turn of the loop.
        if waited and client_gone is not None and await client_gone():
            await self._release(scope, owner)
            raise ClientGone()

        self._hold(scope, owner)
        try:
            body = await work()
        except BaseException:
            del self._held[scope]
            await self._release(scope, owner)
            raise
        del self._held[scope]
        if self._faults is not None:
            self._faults.hit(AFTER_RUN_BEFORE_STORE)
        try:
            await self.store.complete(scope, owner, body, policy.retention_s)
        except (StoreUnavailable, StoreFull) as exc:
            # The model has run and the device is waiting for this answer: give it. Only a
            # repeat of the key (the device lost the answer) would run the model again.
            log.warning("an answer could not be stored for replay: %s", exc)
            await self._release(scope, owner)
            return Outcome(body, replayed=False, stored=False)
        return Outcome(body, replayed=False)

    def _hold(self, scope: str, owner: str) -> None:
        self._held[scope] = owner
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_held())

    async def _renew_held(self) -> None:
        # One task renews every mark this worker holds, four times per pending_ttl_s, so three
        # renewals in a row must fail (or the loop stall for most of the lapse) before a live
        # run's mark lapses; a dead worker renews nothing, and its marks lapse pending_ttl_s
        # later so a duplicate can take over.
        ttl = self.policy.pending_ttl_s
        while self._held:
            await self._sleep(ttl / 4)
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
