"""What each delivery attempt's outcome does to its items (answer stored, released, rejected)
and to the forwarder's pace (the holds and backoffs that follow a failure).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from model_runtime.errors import InvalidInput
from model_runtime.fault_points import FaultPlan
from model_runtime.infer_group import GroupItemAnswer
from router.clock import Clock
from router.config import AFTER_SEND_BEFORE_MARK, RouterConfig
from router.durable_queue import DurableQueue, QueuedItem
from router.errors import (
    BudgetExhausted,
    CircuitOpen,
    CloudRejected,
    CloudUnavailable,
    StorageError,
)
from router.grouping import GroupPlanner
from router.metrics import RouterMetrics
from router.retrying import LinkBackoff

__all__ = ["SETUP_STATUSES", "DeliveryOutcomes"]

log = logging.getLogger(__name__)

SETUP_STATUSES = frozenset({401, 403, 404, 407})
"""The device's key or the model name is wrong: no item's fault, so items wait (released)."""
_LATER_STATUSES = frozenset({408, 409, 425})
"""Timeout, an earlier delivery of the same key still running, too early: try again later."""
# Any other 4xx (400, 413, 415, 422...) refuses the request itself: the item ends rejected.
_STORAGE_RETRY_CAP_S = 5.0


class DeliveryOutcomes:
    """The forwarder's bookkeeping: settles claimed items in the queue as their call's outcome
    says, and keeps `hold_until`, the monotonic time before which nothing is sent."""

    def __init__(
        self,
        queue: DurableQueue,
        groups: GroupPlanner,
        metrics: RouterMetrics,
        config: RouterConfig,
        clock: Clock,
        *,
        faults: FaultPlan | None = None,
    ) -> None:
        self._queue = queue
        self._groups = groups
        self._metrics = metrics
        self._config = config
        self._clock = clock
        self._faults = faults
        self.hold_until = 0.0
        self._failures = 0
        self._backoff = LinkBackoff(
            initial_s=config.failure_backoff_s,
            cap_s=max(config.failure_backoff_cap_s, config.failure_backoff_s),
        )
        self._storage_failures = 0
        self._storage_backoff = LinkBackoff(
            initial_s=config.failure_backoff_s,
            cap_s=max(_STORAGE_RETRY_CAP_S, config.failure_backoff_s),
        )

    # -- the pace -------------------------------------------------------------------------------

    def held(self) -> bool:
        return self.hold_until > self._clock.monotonic()

    def hold(self, seconds: float, reason: str) -> None:
        self.hold_until = max(self.hold_until, self._clock.monotonic() + seconds)
        self._metrics.holds.labels(reason).inc()

    def failed(self) -> None:
        self._failures += 1
        self.hold(self._backoff(self._failures), "failure")

    def succeeded(self) -> None:
        self._failures = 0

    def storage_pause(self) -> float:
        """How long to wait before writing to the queue file again: growing, but never past
        a few seconds, so delivery resumes soon after the disk has room again."""
        self._storage_failures += 1
        return self._storage_backoff(self._storage_failures)

    def storage_works(self) -> None:
        self._storage_failures = 0

    # -- the items ------------------------------------------------------------------------------

    async def release(self, items: Sequence[QueuedItem], error: str, *, sent: bool = True) -> None:
        """Back to pending; `sent=False` when they never left: not counted as attempts."""
        await asyncio.gather(
            *(self._queue.release(item.ticket, error, sent=sent) for item in items)
        )

    async def call_failed(
        self,
        items: Sequence[QueuedItem],
        error: BudgetExhausted | CloudUnavailable | InvalidInput,
        expected: str,
    ) -> None:
        """A call for `items` that brought no answer to settle them by: not sent for the data
        budget, the cloud or link unavailable, or an answer that is not `expected`. They go
        back to pending, and sending pauses as the error says."""
        if isinstance(error, BudgetExhausted):
            await self.release(items, f"not sent: {error}", sent=False)
            self.hold(self._config.idle_poll_s, "budget")
        elif isinstance(error, CloudUnavailable):
            await self.release(items, str(error))
            if error.retry_after is not None:
                self.hold(error.retry_after, "retry_after")
            elif not isinstance(error, CircuitOpen):
                self.failed()
        else:
            await self.release(items, f"cloud answer is not {expected}: {error}")
            self.failed()

    async def unbuildable(
        self, group: Sequence[QueuedItem], problems: Sequence[Exception | None]
    ) -> None:
        """No request could be built for `group`: the items with a problem of their own are
        rejected, the others go back to pending to be grouped without them."""
        try:
            for item, problem in zip(group, problems, strict=True):
                if problem is None:
                    await self._queue.release(item.ticket, "regrouped", sent=False)
                else:
                    log.error("cannot build a request for ticket %s: %s", item.ticket, problem)
                    await self._queue.mark_rejected(item.ticket, f"cannot be sent: {problem}")
        except StorageError as failure:  # still claimed: the lease brings them back
            log.warning("could not settle unbuildable tickets: %s", failure)

    async def answered(self, item: QueuedItem, stored: bytes) -> None:
        """The cloud answered `item`; `stored` is what its ticket keeps of the answer."""
        if self._faults is not None:
            self._faults.hit(AFTER_SEND_BEFORE_MARK)
        await self._store_answer(item, stored)

    async def settle_item(
        self, item: QueuedItem, result: GroupItemAnswer, stored: bytes | InvalidInput | None
    ) -> bool:
        """Store or refuse one item of a group as its own answer says (`stored`: what
        `stored_answers` made of it); False if it failed."""
        if isinstance(stored, InvalidInput):
            await self._queue.release(item.ticket, f"cloud answer is not a v2 response: {stored}")
            self.failed()
            return False
        if stored is not None:
            await self.answered(item, stored)
            return True
        message = f"cloud answered {result.status} for this item: {result.error[:200]}"
        if 400 <= result.status < 500 and result.status != 429:
            await self.refused(item, CloudRejected(message, result.status, result.retry_after))
            return False
        await self._queue.release(item.ticket, message)
        if result.retry_after is not None:
            self.hold(result.retry_after, "retry_after")
        else:
            self.failed()
        return False

    async def group_refused(self, group: list[QueuedItem], error: CloudRejected) -> None:
        """A 4xx for the group as a whole is not the items' fault, unless it would be theirs
        alone too (a setup problem: device key, model name)."""
        if error.status == 413:  # too large as a group: smaller groups, the items stay
            self._groups.shrink(len(group))
            await self.release(group, f"group of {len(group)} too large: {error}")
        elif error.status in (400, 405):  # the cloud does not read groups (any more)
            self._groups.forget()
            await self.release(group, f"group refused: {error}")
            self.failed()
        else:
            if error.status == 404:  # no such model, or no such endpoint: ask again first
                self._groups.forget()
            for item in group:
                await self.refused(item, error)

    async def refused(self, item: QueuedItem, error: CloudRejected) -> None:
        status = error.status
        if status in SETUP_STATUSES:
            await self._queue.release(item.ticket, str(error))
            if not self.held():
                log.error(
                    "the cloud refused this device or model (%s); pausing delivery for %.0f s: %s",
                    status,
                    self._config.setup_backoff_s,
                    error,
                )
            self.hold(self._config.setup_backoff_s, "setup")
        elif status in _LATER_STATUSES:
            await self._queue.release(item.ticket, str(error))
            if error.retry_after is not None:
                self.hold(error.retry_after, "retry_after")
            else:
                self.failed()
        else:
            log.warning("the cloud rejected ticket %s: %s", item.ticket, error)
            await self._queue.mark_rejected(item.ticket, f"rejected by the cloud: {error}")

    async def _store_answer(self, item: QueuedItem, result: bytes) -> None:
        """Store the cloud's answer under the item's ticket, trying again after a pause while
        the queue file cannot be written: the answer in hand is worth keeping, and if the
        process dies meanwhile the item is sent again and the cloud replays the answer."""
        while True:
            try:
                await self._queue.mark_delivered(item.ticket, result)
                return
            except StorageError as error:
                log.warning("could not store the answer to ticket %s: %s", item.ticket, error)
                self._metrics.holds.labels("storage").inc()
                await self._clock.sleep(self.storage_pause())
