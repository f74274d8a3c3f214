"""Once per request across workers and crashes (issue 13, item 2): a slow run is never run twice
however long it takes, and a duplicate whose client has gone does not run the model when the
first run's worker dies; only a live retry may run it once more.

Two gateway processes share one idempotency store, as two workers of a host (SQLite) or two
replicas (Redis) do, so a duplicate is sure to wait in the other process; the model is the
counting upstream's, which counts what really ran.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from cloud_gateway.idempotency import scope_id
from tests.integration.gateway.helpers import DEVICE, Gateway, Redis, infer_body, start_gateway
from tests.support.counting_upstream import MODEL, CountingUpstream, digest, run_cloud_model
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration

INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture
def upstream() -> Iterator[CountingUpstream]:
    with CountingUpstream() as counting:
        yield counting


@pytest.fixture
def x(heldout: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return np.asarray(heldout[0][:1], dtype=np.float32)


def two_gateways(
    tmp_path: Path, upstream: CountingUpstream, env: dict[str, str], first_env: dict[str, str]
) -> tuple[Gateway, Gateway]:
    """Two single-worker gateways on one key database and one idempotency store."""
    first = start_gateway(tmp_path / "gw1", "--upstream", upstream.url, env={**env, **first_env})
    try:
        second = start_gateway(
            tmp_path / "gw2", "--upstream", upstream.url, key_db=first.key_db, env=env
        )
    except BaseException:
        first.daemon.kill()
        raise
    return first, second


def test_a_slow_run_is_never_run_twice(
    tmp_path: Path, upstream: CountingUpstream, x: np.ndarray
) -> None:
    ttl = 0.5
    env = {
        "CLOUD_GATEWAY_IDEMPOTENCY_PENDING_TTL_S": str(ttl),
        "CLOUD_GATEWAY_IDEMPOTENCY_DB": str(tmp_path / "idempotency.sqlite3"),
    }
    first, second = two_gateways(tmp_path, upstream, env, {})
    headers = {"Idempotency-Key": "clinic-1/slow/1", "Content-Type": "application/json"}
    body = infer_body(x)
    answers: list[httpx.Response] = []
    try:
        with upstream.holding():
            running = threading.Thread(target=_post, args=(first, body, headers, answers))
            running.start()
            assert upstream.arrived.wait(30)
            duplicates = [
                threading.Thread(target=_post, args=(second, body, headers, answers))
                for _ in range(3)
            ]
            for d in duplicates:
                d.start()
            # The fault under test is the run's length: it lasts four lapses of its mark, and
            # only the renewals keep the duplicates from taking it for a dead worker's.
            time.sleep(4 * ttl)
        running.join(30)
        for d in duplicates:
            d.join(30)
    finally:
        first.daemon.stop()
        second.daemon.stop()
    assert [a.status_code for a in answers] == [200] * 4
    assert upstream.counts() == {digest(x): 1}
    assert sorted(a.headers.get("Idempotency-Replayed", "") for a in answers) == [""] + ["true"] * 3
    want = run_cloud_model(x)["label"].tolist()
    assert all(a.json()["outputs"][0]["data"] == want for a in answers)


def test_a_waiting_duplicate_whose_client_left_does_not_run_when_the_worker_dies(
    tmp_path: Path,
    upstream: CountingUpstream,
    redis_server: Redis,
    x: np.ndarray,
) -> None:
    with redis.Redis.from_url(redis_server.url) as store:
        store.flushall()
    env = {
        "CLOUD_GATEWAY_IDEMPOTENCY_STORE": redis_server.url,
        "CLOUD_GATEWAY_IDEMPOTENCY_PENDING_TTL_S": "1",
    }
    # The first gateway dies as soon as its model run is over, before the answer is stored:
    # the case the promise allows one more run for.
    crash = {"CLOUD_GATEWAY_FAULTS": "gateway.after_run_before_store:1"}
    first, second = two_gateways(tmp_path, upstream, env, crash)
    key = "clinic-1/gone/1"
    body = infer_body(x)
    fingerprint = hashlib.sha256(f"{MODEL}\n\n".encode() + body).hexdigest()
    try:
        with upstream.holding():
            running = threading.Thread(target=_post_ignoring_errors, args=(first, key, body))
            running.start()
            assert upstream.arrived.wait(30)
            with ClaimWatcher(redis_server.url, fingerprint) as claims:
                waiting = _send_and_keep_open(second, key, body)
                # The duplicate polls the store: its claims (after the first one's) show it
                # waiting in the guard, its body read.
                wait_until(lambda: claims.count >= 2, 30, what="the duplicate to wait")
            waiting.close()  # the device hung up (or lost power) while it waited
            wait_until(
                lambda: (
                    second.metric("cloud_gateway_idempotency_refusals_total", reason="client_gone")
                    == 1
                ),
                30,
                what="the duplicate to give up",
            )
        running.join(30)
        wait_until(lambda: first.daemon.process.poll() is not None, 30, what="the crash")
        # The dead worker's mark lapses; nobody is left waiting, so nothing runs.
        with redis.Redis.from_url(redis_server.url) as store:
            wait_until(lambda: not _pending(store, key), 30, what="the mark to lapse")
        assert upstream.counts() == {digest(x): 1}
        # The device's next retry runs it once more, as promised, and gets the model's answer.
        retries: list[httpx.Response] = []
        _post(second, body, {"Idempotency-Key": key, "Content-Type": "application/json"}, retries)
        (retry,) = retries
    finally:
        first.daemon.kill()
        second.daemon.stop()
    assert retry.status_code == 200
    assert retry.json()["outputs"][0]["data"] == run_cloud_model(x)["label"].tolist()
    assert upstream.counts() == {digest(x): 2}


def _post(
    gateway: Gateway, body: bytes, headers: dict[str, str], answers: list[httpx.Response]
) -> None:
    with gateway.client() as client:
        answers.append(client.post(INFER, content=body, headers=headers))


def _post_ignoring_errors(gateway: Gateway, key: str, body: bytes) -> None:
    headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
    with contextlib.suppress(httpx.HTTPError):  # its gateway crashes mid-request
        _post(gateway, body, headers, [])


def _send_and_keep_open(gateway: Gateway, key: str, body: bytes) -> socket.socket:
    """A whole request on a raw connection, left open without reading the answer."""
    sock = socket.create_connection(("127.0.0.1", gateway.daemon.ports["http"]))
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {gateway.key}\r\n"
        f"Idempotency-Key: {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def _pending(store: redis.Redis, key: str) -> bool:
    """Whether the device's record of `key` is still an in-progress mark."""
    return bool(store.hget(f"cloud-gateway:idempotency:{scope_id(DEVICE, key)}", "owner"))


class ClaimWatcher:
    """Counts the idempotency claims Redis executes for one request (MONITOR), in a thread."""

    def __init__(self, url: str, fingerprint: str) -> None:
        self.count = 0
        self._fingerprint = fingerprint
        self._client = redis.Redis.from_url(url)
        self._monitor = self._client.monitor()
        self._monitor.__enter__()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._monitor.listen():
                if self._fingerprint in str(event.get("command", "")):
                    self.count += 1
        except Exception:  # the monitor connection closed
            return

    def __enter__(self) -> ClaimWatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._monitor.__exit__(None, None, None)
        self._client.close()
        self._thread.join(5)
