"""With Redis, a device's rate limit holds across workers and replicas: one budget, not one each."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.integration.gateway.helpers import Gateway, Redis, add_key, start_gateway

pytestmark = pytest.mark.integration

BURST = 5
# One token every 5 s: none comes back while the test runs, however slow the machine.
LIMIT = {"CLOUD_GATEWAY_RATE_LIMIT_PER_S": "0.2", "CLOUD_GATEWAY_RATE_LIMIT_BURST": str(BURST)}


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, redis_server: Redis
) -> Iterator[tuple[Gateway, Gateway]]:
    root = tmp_path_factory.mktemp("shared-limit")
    key_db = root / "keys.sqlite3"
    store = ("--idempotency-store", redis_server.url)
    a = start_gateway(root / "a", *store, "--workers", "2", key_db=key_db, env=LIMIT)
    try:
        b = start_gateway(root / "b", *store, key_db=key_db, env=LIMIT)
    except Exception:
        a.daemon.stop()
        raise
    yield a, b
    for gw in (a, b):
        gw.daemon.stop()


def get(gateway: Gateway, key: str) -> httpx.Response:
    # A new connection each time, so the requests spread over the workers too.
    with gateway.client(key) as c:
        return c.get("/v2")


def rate_limited(*gateways: Gateway) -> float:
    return sum(g.metric("cloud_gateway_rate_limited_total") for g in gateways)


def test_a_device_gets_its_burst_in_total_across_workers_and_replicas(
    replicas: tuple[Gateway, Gateway],
) -> None:
    a, b = replicas
    answers = [get(replicas[i % 2], a.key) for i in range(3 * BURST)]
    assert [r.status_code for r in answers] == [200] * BURST + [429] * (2 * BURST)
    assert all(1 <= int(r.headers["Retry-After"]) <= 5 for r in answers[BURST:])
    assert rate_limited(a, b) == 2 * BURST
    assert get(b, add_key(a.key_db, "another-site")).status_code == 200  # budgets are per device


def test_without_redis_each_worker_limits_on_its_own_and_counts_it(
    replicas: tuple[Gateway, Gateway], redis_server: Redis
) -> None:
    a, b = replicas
    key = add_key(a.key_db, "site-while-redis-is-down")
    redis_server.stop()
    try:
        # Not refused for Redis being away (inference would get the idempotency store's 503).
        assert get(b, key).status_code == 200
        assert b.metric("cloud_gateway_rate_limit_errors_total") == 1
        assert "rate limit kept per worker: Redis is unreachable" in b.daemon.log()
    finally:
        redis_server.start()
    # Back: one budget again (the restarted Redis starts with empty buckets).
    after = add_key(a.key_db, "site-after-redis-is-back")
    codes = [get(replicas[i % 2], after).status_code for i in range(BURST + 1)]
    assert codes == [200] * BURST + [429]
    assert b.metric("cloud_gateway_rate_limit_errors_total") == 1
