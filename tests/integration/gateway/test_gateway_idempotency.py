"""Idempotency records outliving processes: a dead worker's mark lapses, old answers are purged.

Two gateways share one SQLite idempotency file, as the workers of one host do. Gateway A
forwards to an upstream that never answers, so it holds its mark until it is killed; gateway B
runs the model itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from cloud_gateway.idempotency import SqliteIdempotencyStore, scope_id
from tests.integration.gateway.helpers import (
    DEVICE,
    Gateway,
    StallingUpstream,
    infer_body,
    start_gateway,
)
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration

INFER = "/v2/models/digits-large/infer"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared")


def env(shared: Path, **settings: str) -> dict[str, str]:
    return {
        "CLOUD_GATEWAY_IDEMPOTENCY_DB": str(shared / "idempotency.sqlite3"),
        "CLOUD_GATEWAY_IDEMPOTENCY_PENDING_TTL_S": "1",
        **{f"CLOUD_GATEWAY_{k.upper()}": v for k, v in settings.items()},
    }


@pytest.fixture(scope="module")
def runner(shared: Path) -> Iterator[Gateway]:
    """Gateway B: runs the model; waits briefly for others' marks; purges often."""
    gw = start_gateway(
        shared / "b",
        key_db=shared / "keys.sqlite3",
        env=env(
            shared,
            idempotency_wait_s="0.3",
            idempotency_retention_s="1",
            idempotency_cleanup_interval_s="0.2",
        ),
    )
    yield gw
    gw.daemon.stop()


def test_the_mark_of_a_killed_gateway_lapses_and_another_runs_the_request(
    shared: Path,
    runner: Gateway,
    stalling_upstream: StallingUpstream,
    heldout: tuple[np.ndarray, np.ndarray],
) -> None:
    doomed = start_gateway(
        shared / "a",
        "--upstream",
        stalling_upstream.url,
        "--upstream-timeout",
        "60",
        key_db=shared / "keys.sqlite3",
        env=env(shared),
    )
    body = infer_body(heldout[0][:1], "power-cut-1")
    headers = {"Idempotency-Key": "power-cut-1"}

    def send_to_doomed() -> None:
        try:
            with doomed.client() as c:
                c.post(INFER, content=body, headers=headers)
        except httpx.TransportError:
            pass  # its gateway dies under it

    sender = threading.Thread(target=send_to_doomed)
    sender.start()
    try:
        # The request reached the upstream, so A holds the key's mark, renewing it.
        wait_until(lambda: stalling_upstream.infer_requests == 1, what="A to forward")
        with runner.client(doomed.key) as c:
            waiting = c.post(INFER, content=body, headers=headers)
        assert waiting.status_code == 409
        assert waiting.headers["Retry-After"] == "1"
        assert runner.metric("cloud_gateway_model_runs_total") == 0
    finally:
        doomed.daemon.kill()
        sender.join(10)

    # Nobody renews A's mark now: within the pending TTL, B may run the request itself.
    with runner.client(doomed.key) as c:
        wait_until(
            lambda: c.post(INFER, content=body, headers=headers).status_code == 200,
            10.0,
            what="the dead gateway's mark to lapse",
        )
        replay = c.post(INFER, content=body, headers=headers)
    assert replay.headers["Idempotency-Replayed"] == "true"
    assert runner.metric("cloud_gateway_model_runs_total") == 1


def test_answers_past_their_retention_are_purged(
    shared: Path, runner: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    store = SqliteIdempotencyStore(shared / "idempotency.sqlite3")
    scope = scope_id(DEVICE, "short-lived")
    with runner.client() as c:
        first = c.post(
            INFER, content=infer_body(heldout[0][:1]), headers={"Idempotency-Key": "short-lived"}
        )
    assert first.status_code == 200
    assert store.record(scope) is not None
    # Retention is 1 s here and the cleanup runs every 0.2 s.
    wait_until(lambda: store.record(scope) is None, 10.0, what="the cleanup to purge it")
