"""Queue housekeeping: items past their TTL expired, old ends and budget periods purged, the
figures refreshed; with or without a cloud.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from router.budget import DataBudget
from router.clock import Clock
from router.config import RouterConfig
from router.durable_queue import DurableQueue

__all__ = ["housekeep"]

log = logging.getLogger(__name__)


async def housekeep(
    queue: DurableQueue,
    budget: DataBudget,
    config: RouterConfig,
    clock: Clock,
    refresh: Callable[[], Awaitable[None]],
) -> None:
    """Until cancelled: expire due items and `refresh` the figures every `expire_interval_s`;
    purge items ended more than `results_retention_s` ago every `purge_interval_s`. Runs with
    or without a cloud, so TTLs hold while the link is down."""
    next_purge = clock.monotonic()
    while True:
        try:
            await queue.expire_due()
            if clock.monotonic() >= next_purge:
                await queue.purge(config.results_retention_s)
                await budget.forget_before()
                next_purge = clock.monotonic() + config.purge_interval_s
            await refresh()
        except Exception:  # a full disk now is no reason to stop expiring later
            log.exception("queue housekeeping failed; trying again later")
        await clock.sleep(config.expire_interval_s)
