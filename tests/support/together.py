"""Several forked processes doing the same thing at the same instant, again and again: for
races between processes that start together (workers opening new files)."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

__all__ = ["run_together"]


def _run(job: Callable[[Path], None], where: Path, barrier: Barrier, problems: Queue[str]) -> None:
    barrier.wait()
    try:
        job(where)
    except Exception:
        problems.put(traceback.format_exc(limit=2))


def run_together(
    job: Callable[[Path], None], root: Path, *, processes: int, times: int
) -> list[str]:
    """`times` times, `job(dir)` in `processes` forked processes released at once, each time in
    a new directory below `root`; the tracebacks of the jobs that raised (forked: started in
    milliseconds, and `job` need not be picklable)."""
    fork = multiprocessing.get_context("fork")
    problems: Queue[str] = fork.Queue()
    for n in range(times):
        where = root / str(n)
        where.mkdir()
        barrier = fork.Barrier(processes)
        workers = [
            fork.Process(target=_run, args=(job, where, barrier, problems))
            for _ in range(processes)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert [w.exitcode for w in workers] == [0] * processes
    found = []
    while not problems.empty():
        found.append(problems.get())
    return found
