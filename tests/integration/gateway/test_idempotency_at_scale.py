"""Idempotency at scale, with the SQLite store and with Redis, on gateways of two workers:

- 50 concurrent requests with one key, trial after trial, run the model once per key and all
  get that answer, while another device sends the same key with its own request at the same
  moment and gets its own answer (keys belong to a device);
- the workers of a gateway killed between claiming a key and storing its answer hold it only
  until its mark lapses: another gateway on the same store then runs it, once.

IDEMPOTENCY_TRIALS (default 10) trials per store; RELIABILITY.md has a run of 100.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.gateway.helpers import (
    UNLIMITED_RATE,
    Gateway,
    Redis,
    StallingUpstream,
    add_key,
    infer_body,
    start_gateway,
)
from tests.support.processes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

TRIALS = int(os.environ.get("IDEMPOTENCY_TRIALS", "10"))
CONCURRENT = 50
INFER = "/v2/models/digits-large/infer"
PENDING_TTL_S = 1.0


def _env(**settings: str) -> dict[str, str]:
    return {
        # One client sends 50 at once: the per-device limits are not what is tested.
        "CLOUD_GATEWAY_MAX_IN_FLIGHT_PER_DEVICE": "64",
        **UNLIMITED_RATE,
        "CLOUD_GATEWAY_IDEMPOTENCY_PENDING_TTL_S": str(PENDING_TTL_S),
        **{f"CLOUD_GATEWAY_{k.upper()}": v for k, v in settings.items()},
    }


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Where two gateways keep their idempotency records: one SQLite file, or one Redis."""
    shared = tmp_path_factory.mktemp(f"scale-{request.param}")
    if request.param == "sqlite":
        yield {"idempotency_db": str(shared / "idempotency.sqlite3")}
        return
    redis = request.getfixturevalue("redis_server")
    assert isinstance(redis, Redis)
    yield {"idempotency_store": redis.url}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys") / "keys.sqlite3"


@pytest.fixture(scope="module")
def two_workers(
    store: dict[str, str], keys: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = start_gateway(
        tmp_path_factory.mktemp("runner"), "--workers", "2", key_db=keys, env=_env(**store)
    )
    wait_until(lambda: len(gw.worker_pids()) == 2, 30.0, what="both workers")
    yield gw
    gw.daemon.stop()


async def _trial(
    gateway: Gateway, other_key: str, body: bytes, other_body: bytes, key: str
) -> tuple[list[httpx.Response], httpx.Response]:
    limits = httpx.Limits(max_connections=CONCURRENT, max_keepalive_connections=CONCURRENT)
    a = httpx.AsyncClient(
        base_url=gateway.url,
        headers={"Authorization": f"Bearer {gateway.key}"},
        limits=limits,
        timeout=60.0,
    )
    b = httpx.AsyncClient(
        base_url=gateway.url, headers={"Authorization": f"Bearer {other_key}"}, timeout=60.0
    )
    async with a, b:
        # The connections open first (spread over the workers), so the requests leave together.
        await asyncio.gather(*(a.get("/v2/health/live") for _ in range(CONCURRENT)))
        await b.get("/v2/health/live")
        headers = {"Idempotency-Key": key}
        *same, other = await asyncio.gather(
            *(a.post(INFER, content=body, headers=headers) for _ in range(CONCURRENT)),
            b.post(INFER, content=other_body, headers=headers),
        )
    return same, other


def test_fifty_concurrent_duplicates_run_once_per_key_and_devices_stay_apart(
    two_workers: Gateway, keys: Path
) -> None:
    images = np.load(Path(__file__).resolve().parents[3] / "model_runtime/demo/heldout.npz")["X"]
    other_key = add_key(keys, "clinic-2")
    runs = two_workers.metric("cloud_gateway_model_runs_total", outcome="ok")
    replays = two_workers.metric("cloud_gateway_idempotent_replays_total")
    started = time.monotonic()
    for trial in range(TRIALS):
        key = f"scale-{trial}"
        mine, theirs = images[trial : trial + 1], images[trial + 1 : trial + 2]
        same, other = asyncio.run(
            _trial(two_workers, other_key, infer_body(mine), infer_body(theirs), key)
        )
        assert [r.status_code for r in same] == [200] * CONCURRENT, trial
        assert sum("Idempotency-Replayed" not in r.headers for r in same) == 1, trial
        assert len({json.dumps(r.json()["outputs"]) for r in same}) == 1, trial
        # the other device's request with the same key is its own: run, not refused, not A's
        assert other.status_code == 200, other.text
        assert "Idempotency-Replayed" not in other.headers
        assert other.json()["outputs"] != same[0].json()["outputs"]
    took = time.monotonic() - started
    # one run per device and key, summed over both workers
    assert two_workers.metric("cloud_gateway_model_runs_total", outcome="ok") - runs == 2 * TRIALS
    assert (
        two_workers.metric("cloud_gateway_idempotent_replays_total") - replays
        == (CONCURRENT - 1) * TRIALS
    )
    print(f"{TRIALS} trials x {CONCURRENT + 1} requests in {took:.1f} s")


def test_killed_workers_hold_a_key_only_until_its_mark_lapses(
    store: dict[str, str],
    keys: Path,
    tmp_path_factory: pytest.TempPathFactory,
    stalling_upstream: StallingUpstream,
) -> None:
    doomed = start_gateway(
        tmp_path_factory.mktemp("doomed"),
        "--workers",
        "2",
        "--upstream",
        stalling_upstream.url,
        "--upstream-timeout",
        "60",
        key_db=keys,
        env=_env(**store),
    )
    # Its duplicates give up waiting for a first request after half a second (409).
    two_workers = start_gateway(
        tmp_path_factory.mktemp("impatient"),
        "--workers",
        "2",
        key_db=keys,
        env=_env(**store, idempotency_wait_s="0.5"),
    )
    try:
        wait_until(lambda: len(doomed.worker_pids()) == 2, 30.0, what="both doomed workers")
        body = infer_body(np.zeros((1, 64), np.float32))
        headers = {"Idempotency-Key": "held-by-the-dead"}
        before = stalling_upstream.infer_requests

        def send_to_doomed() -> None:
            try:
                with doomed.client(timeout=60.0) as c:
                    c.post(INFER, content=body, headers=headers)
            except httpx.TransportError:
                pass  # its worker dies under it

        sender = threading.Thread(target=send_to_doomed)
        sender.start()
        # Claimed, and forwarded: a worker of the doomed gateway holds the key's mark.
        wait_until(lambda: stalling_upstream.infer_requests == before + 1, what="the forward")
        runs = two_workers.metric("cloud_gateway_model_runs_total", outcome="ok")
        with two_workers.client(doomed.key, timeout=30.0) as c:
            waited = c.post(INFER, content=body, headers=headers)
        assert waited.status_code == 409  # still held (renewed), not run a second time
        for pid in doomed.worker_pids():
            os.kill(pid, signal.SIGKILL)  # between its claim and its store
        killed = time.monotonic()
        with two_workers.client(doomed.key, timeout=30.0) as c:
            wait_until(
                lambda: c.post(INFER, content=body, headers=headers).status_code == 200,
                10 * PENDING_TTL_S,
                what="the dead workers' mark to lapse",
            )
            recovered = time.monotonic() - killed
            again = c.post(INFER, content=body, headers=headers)
        sender.join(30)
        assert again.headers["Idempotency-Replayed"] == "true"
        assert two_workers.metric("cloud_gateway_model_runs_total", outcome="ok") - runs == 1
        # renewals every third of the TTL: the mark outlives its last renewal by at most the TTL
        print(f"recovered {recovered:.2f} s after the kill (pending TTL {PENDING_TTL_S} s)")
    finally:
        # The doomed gateway is not stopped gracefully: after its workers were killed, its
        # supervisor was seen not to replace them within 30 s and then to take over 20 s to
        # stop, so it goes the way they went, and every child of it with it.
        _kill_all(doomed)
        two_workers.daemon.stop()


def _kill_all(gateway: Gateway) -> None:
    pid = gateway.daemon.process.pid
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        children = []
    gateway.daemon.kill()
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
