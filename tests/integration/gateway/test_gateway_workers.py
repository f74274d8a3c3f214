"""Several worker processes behind one socket: replays across workers, one model run for 50
concurrent duplicates, metrics summed over the workers, a dead worker replaced."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.integration.gateway.helpers import Gateway, infer_body, module_gateway, serving_pid
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration

WORKERS = 3
INFER = "/v2/models/digits-large/infer"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # 50 concurrent duplicates from one device below, more than it may have in flight at
    # once by default (an agent keeps at most 4 connections).
    env = {"CLOUD_GATEWAY_MAX_IN_FLIGHT_PER_DEVICE": "64"}
    yield from module_gateway(tmp_path_factory, "workers", workers=WORKERS, env=env)


def test_a_replay_is_served_by_another_worker(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    body = infer_body(heldout[0][:2], "cross-1")
    headers = {"Idempotency-Key": "cross-1"}
    runs = gateway.metric("cloud_gateway_model_runs_total")
    with gateway.client() as first_client:
        first = first_client.post(INFER, content=body, headers=headers)
        first_worker = serving_pid(gateway, first)
    assert first.status_code == 200
    # New connections until the kernel hands one to a different worker.
    for _ in range(100):
        with gateway.client() as c:
            probe = c.get("/v2/health/live")
            worker = serving_pid(gateway, probe)
            if worker == first_worker:
                continue
            again = c.post(INFER, content=body, headers=headers)
            assert serving_pid(gateway, again) == worker
            break
    else:
        pytest.fail("every connection went to the same worker")
    assert again.headers["Idempotency-Replayed"] == "true"
    assert again.json()["outputs"] == first.json()["outputs"]
    assert gateway.metric("cloud_gateway_model_runs_total") == runs + 1


async def _burst(gateway: Gateway, body: bytes, key: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    headers = {"Authorization": f"Bearer {gateway.key}"}
    async with httpx.AsyncClient(
        base_url=gateway.url, headers=headers, limits=limits, timeout=30.0
    ) as c:
        # Open the n connections first, so the n duplicates leave together.
        await asyncio.gather(*(c.get("/v2/health/live") for _ in range(n)))
        return await asyncio.gather(
            *(c.post(INFER, content=body, headers={"Idempotency-Key": key}) for _ in range(n))
        )


def test_fifty_concurrent_duplicates_run_the_model_once(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    body = infer_body(heldout[0][:100], "dup-50")  # 100 images: a run long enough to overlap
    runs = gateway.metric("cloud_gateway_model_runs_total")
    replays = gateway.metric("cloud_gateway_idempotent_replays_total")
    responses = asyncio.run(_burst(gateway, body, "dup-50", 50))
    assert [r.status_code for r in responses] == [200] * 50
    assert sum("Idempotency-Replayed" not in r.headers for r in responses) == 1
    assert len({json.dumps(r.json()["outputs"]) for r in responses}) == 1
    assert gateway.metric("cloud_gateway_model_runs_total") == runs + 1
    assert gateway.metric("cloud_gateway_idempotent_replays_total") == replays + 49


def test_metrics_add_up_over_the_workers(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    before = gateway.metric("cloud_gateway_requests_total", endpoint="infer", code="200")
    seen: set[int] = set()
    for i in range(30):
        with gateway.client() as c:  # a new connection each time: spread over the workers
            response = c.post(INFER, content=infer_body(heldout[0][i : i + 1]))
            assert response.status_code == 200
            seen.add(serving_pid(gateway, response))
    assert len(seen) > 1
    after = gateway.metric("cloud_gateway_requests_total", endpoint="infer", code="200")
    assert after - before == 30


def test_a_killed_worker_is_replaced(gateway: Gateway) -> None:
    # A worker that has served; test_gateway_worker_start.py kills ones that are starting.
    replaced = gateway.metric("cloud_gateway_worker_replacements_total")
    with httpx.Client() as c:
        victim = serving_pid(gateway, c.get(gateway.url + "/v2/health/ready"))
    os.kill(victim, signal.SIGKILL)
    try:
        wait_until(
            lambda: victim not in gateway.worker_pids() and len(gateway.worker_pids()) == WORKERS,
            30.0,
            what="a new worker",
        )
    except TimeoutError:
        raise AssertionError(gateway.daemon.log()[-4000:]) from None
    for _ in range(10):
        assert httpx.get(gateway.url + "/v2/health/ready").status_code == 200
    assert gateway.metric("cloud_gateway_worker_replacements_total") == replaced + 1
