"""Two gateway replicas sharing one real redis-server as their idempotency store."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.integration.gateway.helpers import Gateway, Redis, infer_body, start_gateway

pytestmark = pytest.mark.integration

INFER = "/v2/models/digits-large/infer"


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, redis_server: Redis
) -> Iterator[tuple[Gateway, Gateway]]:
    root = tmp_path_factory.mktemp("replicas")
    key_db = root / "keys.sqlite3"  # the device keys, distributed to every replica
    # 20 concurrent duplicates from one device below: more than a device has in flight at once
    # by default (an agent keeps at most 4 connections).
    env = {"CLOUD_GATEWAY_MAX_IN_FLIGHT_PER_DEVICE": "32"}
    a = start_gateway(root / "a", "--idempotency-store", redis_server.url, key_db=key_db, env=env)
    try:
        b = start_gateway(
            root / "b", "--idempotency-store", redis_server.url, key_db=key_db, env=env
        )
    except BaseException:
        a.daemon.stop()
        raise
    yield a, b
    for gw in (a, b):
        gw.daemon.stop()


def runs(*gateways: Gateway) -> float:
    return sum(g.metric("cloud_gateway_model_runs_total") for g in gateways)


def test_a_replica_replays_what_the_other_ran(
    replicas: tuple[Gateway, Gateway], heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    a, b = replicas
    body = infer_body(heldout[0][:4], "site-3/q-17")
    headers = {"Idempotency-Key": "site-3/q-17"}
    before = runs(a, b)
    with a.client() as c:
        first = c.post(INFER, content=body, headers=headers)
    with b.client(a.key) as c:
        again = c.post(INFER, content=body, headers=headers)
        other = c.post(INFER, content=infer_body(heldout[0][4:5]), headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.headers["Idempotency-Replayed"] == "true"
    assert again.json()["outputs"] == first.json()["outputs"]
    assert other.status_code == 422
    assert runs(a, b) == before + 1
    assert b.metric("cloud_gateway_idempotent_replays_total") == 1


async def _duplicates(gateways: tuple[Gateway, Gateway], body: bytes, n: int) -> list[int]:
    async def one(gw: Gateway, c: httpx.AsyncClient) -> int:
        r = await c.post(gw.url + INFER, content=body, headers={"Idempotency-Key": "dup-r"})
        assert r.status_code == 200
        return 0 if "Idempotency-Replayed" in r.headers else 1

    headers = {"Authorization": f"Bearer {gateways[0].key}"}
    limits = httpx.Limits(max_connections=2 * n)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=30.0) as c:
        return await asyncio.gather(*(one(gateways[i % 2], c) for i in range(n)))


def test_concurrent_duplicates_across_replicas_run_once(
    replicas: tuple[Gateway, Gateway], heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    before = runs(*replicas)
    fresh = asyncio.run(_duplicates(replicas, infer_body(heldout[0], "dup-r"), 20))
    assert sum(fresh) == 1
    assert runs(*replicas) == before + 1


def test_redis_down_gets_503_then_recovers(
    replicas: tuple[Gateway, Gateway],
    redis_server: Redis,
    heldout: tuple[np.ndarray, np.ndarray],
) -> None:
    a, _ = replicas
    body = infer_body(heldout[0][:1], "while-down")
    headers = {"Idempotency-Key": "while-down"}
    redis_server.stop()
    try:
        with a.client() as c:
            down = c.post(INFER, content=body, headers=headers)
            assert down.status_code == 503
            assert int(down.headers["Retry-After"]) >= 1
            assert "idempotency store (redis) is unavailable" in down.json()["error"]
            assert httpx.get(a.url + "/v2/health/ready").status_code == 503
    finally:
        redis_server.start()
    with a.client() as c:
        back = c.post(INFER, content=body, headers=headers)
    assert back.status_code == 200
    assert "Idempotency-Replayed" not in back.headers
