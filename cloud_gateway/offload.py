"""Parsing and encoding of large bodies off the event loop, one worker thread at a time.

orjson and numpy hold the GIL for the whole of one call, so a worker thread frees the loop only
between calls, not during one. With a single heavy thread the loop waits for the GIL at most one
such call, which the body and answer limits bound (tens of milliseconds at the defaults); with
many, it would also queue behind every other thread. Small bodies, nearly all of the traffic,
stay on the loop: the hop to a thread costs more than their parse.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from cloud_gateway.worker_threads import run_blocking

__all__ = ["INLINE_MAX_BYTES", "JSON_BYTES_PER_VALUE", "Offloader"]

T = TypeVar("T")

INLINE_MAX_BYTES = 64 * 1024
JSON_BYTES_PER_VALUE = 10
"""A typical value's JSON text, to guess an encoding's bytes from a tensor's values."""


class Offloader:
    """Heavy work on one of the worker's threads (worker_threads.py), one job at a time."""

    def __init__(self, *, inline_max_bytes: int = INLINE_MAX_BYTES, threads: int = 1) -> None:
        self._inline_max_bytes = inline_max_bytes
        self._limiter = asyncio.Semaphore(threads)

    async def run(self, size_bytes: int, work: Callable[[], T]) -> T:
        """`work()`, on the loop when the bytes it handles are few, else on a worker thread
        once no other heavy job runs."""
        if size_bytes <= self._inline_max_bytes:
            return work()
        async with self._limiter:
            return await run_blocking(work)
