"""The worker's fixed thread pool: all its threads from the start, never more, jobs beyond
them wait; a cancelled caller waits for its job; SQLite pools hold a connection per thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from cloud_gateway.metrics import GatewayMetrics
from cloud_gateway.sqlite_pool import ConnectionPool
from cloud_gateway.worker_threads import ThreadMetrics, run_blocking, start_worker_threads

THREADS = 3


def signal_from_thread(event: asyncio.Event) -> Callable[[], None]:
    """A function a thread calls to set `event` on its loop's thread."""
    loop = asyncio.get_running_loop()
    return lambda: loop.call_soon_threadsafe(event.set)


def test_every_thread_starts_with_the_pool_and_jobs_beyond_them_wait_for_one() -> None:
    release = threading.Event()
    running: list[str] = []
    lock = threading.Lock()

    async def main() -> None:
        all_busy = asyncio.Event()
        signal_all_busy = signal_from_thread(all_busy)

        def held() -> str:
            with lock:
                running.append(threading.current_thread().name)
                if len(running) == THREADS:
                    signal_all_busy()
            release.wait(30)
            return threading.current_thread().name

        before = threading.active_count()
        metrics = GatewayMetrics(registry)
        pool = start_worker_threads(
            asyncio.get_running_loop(),
            THREADS,
            ThreadMetrics(
                metrics.blocking_threads,
                metrics.blocking_busy_seconds,
                metrics.blocking_wait_seconds,
            ),
        )
        try:
            assert threading.active_count() == before + THREADS
            jobs = [asyncio.ensure_future(run_blocking(held)) for _ in range(4 * THREADS)]
            async with asyncio.timeout(30):
                await all_busy.wait()
            # Nothing finishes until released: a job beyond the threads can only wait.
            assert len(running) == THREADS
            assert threading.active_count() == before + THREADS
            assert registry.get_sample_value("cloud_gateway_blocking_threads") == THREADS
            assert registry.get_sample_value("cloud_gateway_blocking_busy_seconds_total") == 0
            release.set()
            names = await asyncio.gather(*jobs)
            assert len(set(names)) == THREADS
            assert threading.active_count() == before + THREADS
            # asyncio's own thread use goes to the same pool.
            assert (await asyncio.to_thread(threading.current_thread)).name in names
        finally:
            pool.shutdown(wait=True)
        assert threading.active_count() == before

    registry = CollectorRegistry()
    asyncio.run(main())
    # The jobs beyond the threads waited for the held ones, which ran until released.
    assert registry.get_sample_value("cloud_gateway_blocking_wait_seconds_total") > 0
    assert registry.get_sample_value("cloud_gateway_blocking_busy_seconds_total") > 0


def test_a_cancelled_caller_sees_the_cancellation_only_once_its_job_has_ended() -> None:
    release = threading.Event()
    ended = threading.Event()

    async def main() -> None:
        started = asyncio.Event()
        signal_started = signal_from_thread(started)

        def job() -> None:
            signal_started()
            release.wait(30)
            ended.set()

        pool = start_worker_threads(asyncio.get_running_loop(), 1)
        try:
            caller = asyncio.ensure_future(run_blocking(job))
            async with asyncio.timeout(30):
                await started.wait()
            caller.cancel()
            done, _ = await asyncio.wait([caller], timeout=0.2)
            assert not done  # still waiting for its job
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await caller
            assert ended.is_set()
        finally:
            release.set()
            pool.shutdown(wait=True)

    asyncio.run(main())


def test_a_sqlite_pool_holds_a_connection_per_thread_however_many_jobs_use_it(
    tmp_path: Path,
) -> None:
    opened: list[sqlite3.Connection] = []

    def connect() -> sqlite3.Connection:
        db = sqlite3.connect(tmp_path / "x.sqlite3", check_same_thread=False)
        opened.append(db)
        return db

    connections = ConnectionPool(connect, THREADS)
    assert connections.size == len(opened) == THREADS  # all at once, at start

    def query() -> int:
        with connections.connection() as db:
            db.execute("SELECT 1").fetchone()
        return id(db)

    async def main() -> set[int]:
        pool = start_worker_threads(asyncio.get_running_loop(), THREADS)
        try:
            return set(await asyncio.gather(*(run_blocking(query) for _ in range(200))))
        finally:
            pool.shutdown(wait=True)

    used = asyncio.run(main())
    assert used <= {id(db) for db in opened}
    assert len(opened) == THREADS
    connections.close()
    with pytest.raises(sqlite3.ProgrammingError), connections.connection():
        pass
