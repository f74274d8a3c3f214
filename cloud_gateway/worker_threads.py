"""The fixed pool of threads each gateway worker runs its blocking work on, and the one way in.

Key lookups, model runs, SQLite waits and large bodies' parsing all go through `run_blocking`.
anyio's pool, used before, started threads on demand (up to 40) and ended those idle for 10 s,
so a worker's threads swung between a dozen and ninety under steady load and its SQLite pools
grew to the most jobs ever run at once. Here every thread is started with the worker and kept
until it stops, the way servers for fixed machines size their pools: a job waits for a thread
rather than adding one. The pool is the event loop's default executor, so asyncio's own thread
use (`asyncio.to_thread`, name lookups of upstream and Redis connections) shares the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from prometheus_client import Counter, Gauge

__all__ = ["ThreadMetrics", "run_blocking", "start_worker_threads"]

T = TypeVar("T")
P = ParamSpec("P")

_START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ThreadMetrics:
    """Where the pool counts itself (GatewayMetrics): its size, and seconds busy and waited."""

    threads: Gauge
    busy_seconds: Counter
    wait_seconds: Counter


class _MeteredPool(ThreadPoolExecutor):
    def __init__(self, threads: int, metrics: ThreadMetrics | None) -> None:
        super().__init__(max_workers=threads, thread_name_prefix="cloud-gateway-blocking")
        self._metrics = metrics

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        if self._metrics is None:
            return super().submit(fn, *args, **kwargs)
        return super().submit(_metered, self._metrics, time.perf_counter(), fn, args, kwargs)


def _metered(
    metrics: ThreadMetrics,
    submitted: float,
    fn: Callable[..., T],
    args: tuple[object, ...],
    kwargs: dict[str, object],
) -> T:
    started = time.perf_counter()
    metrics.wait_seconds.inc(started - submitted)
    try:
        return fn(*args, **kwargs)
    finally:
        metrics.busy_seconds.inc(time.perf_counter() - started)


def start_worker_threads(
    loop: asyncio.AbstractEventLoop, threads: int, metrics: ThreadMetrics | None = None
) -> ThreadPoolExecutor:
    """Start `threads` threads now and make them `loop`'s default executor; shut it down with
    `shutdown(wait=True)` once nothing runs on it."""
    pool = _MeteredPool(threads, metrics)
    # ThreadPoolExecutor adds a thread per job while none is idle: jobs that all wait for each
    # other hold every thread until the last one has started. (Not metered: they are not work.)
    everyone = threading.Barrier(threads)
    started = [
        ThreadPoolExecutor.submit(pool, everyone.wait, _START_TIMEOUT_S) for _ in range(threads)
    ]
    for job in started:
        job.result()
    if metrics is not None:
        metrics.threads.set(threads)
    loop.set_default_executor(pool)
    return pool


async def run_blocking(func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`func(*args, **kwargs)` on a thread of the loop's default executor (the worker's pool).

    A caller cancelled meanwhile still waits for the job to end before it sees the
    cancellation: the job may hold a pooled SQLite connection that the caller's cleanup closes.
    """
    job = asyncio.get_running_loop().run_in_executor(None, functools.partial(func, *args, **kwargs))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        while not job.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([job])
        raise
