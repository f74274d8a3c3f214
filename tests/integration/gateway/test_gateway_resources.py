"""A gateway worker's threads and open files stay where start-up left them: bursts of more
concurrent requests than it has threads neither add threads nor open more SQLite connections
(issue 13's soak: threads swung 14-92 and fds crept up while nothing leaked)."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.gateway.helpers import (
    UNLIMITED_RATE,
    Gateway,
    infer_body,
    module_gateway,
    serving_pid,
)
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration

THREADS = 2
INFER = "/v2/models/digits-large/infer"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    env = {
        **UNLIMITED_RATE,
        "CLOUD_GATEWAY_BLOCKING_THREADS": str(THREADS),
        # Every request's key lookup and model run goes to a thread.
        "CLOUD_GATEWAY_KEY_CACHE_S": "0",
        "CLOUD_GATEWAY_INLINE_RUN_BUDGET_US": "0",
        "CLOUD_GATEWAY_MAX_IN_FLIGHT_PER_DEVICE": "64",
    }
    yield from module_gateway(tmp_path_factory, "resources", workers=2, env=env)


def warm_up(gateway: Gateway, x: np.ndarray) -> None:
    """An inference on a new connection until every worker has served one: each has then
    finished starting and opened what serving opens (its metrics files among them)."""
    pids = set(gateway.worker_pids())
    served: set[int] = set()

    def one_more() -> bool:
        with gateway.client() as c:
            response = c.post(INFER, content=infer_body(x))
            assert response.status_code == 200, response.text
            served.add(serving_pid(gateway, response))
        return served == pids

    wait_until(one_more, 60.0, interval=0, what="an inference served by every worker")


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def open_files(pid: int) -> Counter[str]:
    """What the worker's descriptors point to: a path, or a kind (`socket`, `pipe`)."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        kinds[target if target.startswith("/") else target.split(":")[0]] += 1
    return kinds


def burst(gateway: Gateway, x: np.ndarray, requests: int, tag: str) -> Counter[int]:
    """`requests` inference requests at once, each on its own connection and key."""

    async def send() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {gateway.key}"}
        async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=60) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        INFER,
                        content=infer_body(x, f"{tag}-{i}"),
                        headers={"Idempotency-Key": f"{tag}-{i}"},
                    )
                    for i in range(requests)
                )
            )

    return Counter(r.status_code for r in asyncio.run(send()))


def test_bursts_leave_a_workers_threads_and_open_files_where_start_up_left_them(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    warm_up(gateway, heldout[0][:1])
    pids = gateway.worker_pids()
    at_start = {pid: threads(pid) for pid in pids}
    idle_sockets = {pid: open_files(pid)["socket"] for pid in pids}

    def settled() -> dict[int, Counter[str]]:
        # The burst's connections are closed by the client; each worker closes its side when
        # it reads the end of them.
        wait_until(
            lambda: all(open_files(pid)["socket"] <= idle_sockets[pid] for pid in pids),
            30.0,
            what="the bursts' connections to close",
        )
        return {pid: open_files(pid) for pid in pids}

    assert burst(gateway, heldout[0][:4], 8 * THREADS, "first") == {200: 8 * THREADS}
    after_first = settled()
    assert {pid: threads(pid) for pid in pids} == at_start
    for pid in pids:
        state = {Path(p).name: n for p, n in after_first[pid].items() if "/state/" in p}
        # A connection per thread in each SQLite pool, never more; the idempotency store also
        # keeps its event loop's connection and its checkpoints' (each file with its WAL).
        assert state["keys.sqlite3"] == state["keys.sqlite3-wal"] == THREADS, state
        assert state["idempotency.sqlite3"] == THREADS + 2, state

    assert burst(gateway, heldout[0][:4], 32 * THREADS, "second") == {200: 32 * THREADS}
    assert settled() == after_first
    assert {pid: threads(pid) for pid in pids} == at_start
    assert gateway.metric("cloud_gateway_blocking_threads") == 2 * THREADS
    assert gateway.metric("cloud_gateway_blocking_busy_seconds_total") > 0
