"""Upstream mode: the gateway in front of a real MLServer (scikit-learn runtime), and in front of
upstreams that are down or stall: what the device sees is 503 with Retry-After, or 504, never a
hang."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import joblib
import numpy as np
import pytest

from tests.integration.gateway.helpers import (
    SKLEARN_MODEL,
    UNDECLARED_MODEL,
    DownThenUp,
    Gateway,
    MLServer,
    StallingUpstream,
    infer_body,
    start_gateway,
)

pytestmark = pytest.mark.integration

INFER = f"/v2/models/{SKLEARN_MODEL}/infer"


@pytest.fixture(scope="module")
def via_mlserver(tmp_path_factory: pytest.TempPathFactory, mlserver: MLServer) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("via-mlserver"), "--upstream", mlserver.url)
    yield gw
    assert gw.daemon.stop() == 0


def sklearn_model(mlserver: MLServer) -> object:
    return joblib.load(Path(mlserver.model_dir) / "model.joblib")


def test_metadata_and_readiness_come_from_the_upstream(via_mlserver: Gateway) -> None:
    with via_mlserver.client() as c:
        meta = c.get(f"/v2/models/{SKLEARN_MODEL}").json()
        assert meta["name"] == SKLEARN_MODEL
        assert meta["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}]
        assert c.get(f"/v2/models/{SKLEARN_MODEL}/ready").status_code == 200
        assert c.get("/v2/models/nope").status_code == 404
    assert httpx.get(via_mlserver.url + "/v2/health/ready").json() == {"ready": True}


def test_inference_is_forwarded_and_answered_as_the_model_does(
    via_mlserver: Gateway, mlserver: MLServer, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x = heldout[0][:20]
    model = sklearn_model(mlserver)
    with via_mlserver.client() as c:
        labels = c.post(INFER, content=infer_body(x, "fwd-1"))
        probabilities = c.post(INFER, content=infer_body(x, outputs=["predict_proba"]))
    assert labels.status_code == 200
    # One call per request to the upstream is not worth a log line at INFO.
    assert "HTTP Request:" not in via_mlserver.daemon.log()
    answer = labels.json()
    assert answer["model_name"] == SKLEARN_MODEL
    assert answer["id"] == "fwd-1"
    (predict,) = answer["outputs"]
    assert np.asarray(predict["data"]).ravel().tolist() == model.predict(x).tolist()  # type: ignore[attr-defined]
    (proba,) = probabilities.json()["outputs"]
    assert proba["name"] == "predict_proba"
    np.testing.assert_allclose(
        np.asarray(proba["data"]).reshape(proba["shape"]),
        model.predict_proba(x),  # type: ignore[attr-defined]
        rtol=1e-6,
    )


def test_requests_are_checked_against_the_upstream_metadata(via_mlserver: Gateway) -> None:
    runs = via_mlserver.metric("cloud_gateway_model_runs_total")
    bad = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    with via_mlserver.client() as c:
        response = c.post(INFER, content=json.dumps(bad).encode())
        unknown = c.post("/v2/models/nope/infer", content=json.dumps(bad).encode())
    assert response.status_code == 400
    assert "X: shape [1, 3] does not match [-1, 64]" in response.json()["error"]
    assert unknown.status_code == 404
    assert via_mlserver.metric("cloud_gateway_model_runs_total") == runs


def test_upstream_refusals_and_failures_reach_the_device(via_mlserver: Gateway) -> None:
    x = np.zeros((1, 64), dtype=np.float32)
    with via_mlserver.client() as c:
        refused = c.post(INFER, content=infer_body(x, outputs=["nonsense"]))
        # Undeclared inputs are forwarded unchecked; this upstream fails on them with a 500.
        failed = c.post(
            f"/v2/models/{UNDECLARED_MODEL}/infer",
            content=infer_body(np.zeros((1, 3), dtype=np.float32)),
        )
    assert refused.status_code == 400
    assert "refused by the upstream server" in refused.json()["error"]
    assert "nonsense" in refused.json()["error"]
    assert failed.status_code == 502
    assert "HTTP 500" in failed.json()["error"]
    assert via_mlserver.metric("cloud_gateway_upstream_errors_total", kind="bad_response") == 1


def test_replays_do_not_reach_the_upstream(
    via_mlserver: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    body = infer_body(heldout[0][:3], "up-1")
    runs = via_mlserver.metric("cloud_gateway_model_runs_total")
    with via_mlserver.client() as c:
        first = c.post(INFER, content=body, headers={"Idempotency-Key": "up-1"})
        again = c.post(INFER, content=body, headers={"Idempotency-Key": "up-1"})
    assert again.headers["Idempotency-Replayed"] == "true"
    assert again.json()["outputs"] == first.json()["outputs"]
    assert via_mlserver.metric("cloud_gateway_model_runs_total") == runs + 1


def test_upstream_down_gets_503_and_the_retry_runs_once_it_is_back(
    tmp_path: Path, mlserver: MLServer, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    port = DownThenUp()
    gw = start_gateway(tmp_path, "--upstream", port.url)
    try:
        body = infer_body(heldout[0][:2], "q-9")
        with gw.client() as c:
            started = time.monotonic()
            down = c.post(INFER, content=body, headers={"Idempotency-Key": "q-9"})
            assert time.monotonic() - started < 15  # not the 30 s upstream timeout
            assert down.status_code == 503
            assert down.headers["Retry-After"] == "5"
            assert "unavailable" in down.json()["error"]
            assert httpx.get(gw.url + "/v2/health/ready").status_code == 503
            assert gw.metric("cloud_gateway_upstream_errors_total", kind="unavailable") == 1

            port.relay_to(int(mlserver.url.rsplit(":", 1)[1]))  # the upstream comes back
            back = c.post(INFER, content=body, headers={"Idempotency-Key": "q-9"})
        # The 503 stored nothing: the retry runs the model, it is not a replay.
        assert back.status_code == 200
        assert "Idempotency-Replayed" not in back.headers
        assert gw.metric("cloud_gateway_model_runs_total", outcome="ok") == 1
    finally:
        gw.daemon.stop()
        port.close()


@pytest.fixture(scope="module")
def stalling_gateway(
    tmp_path_factory: pytest.TempPathFactory, stalling_upstream: StallingUpstream
) -> Iterator[Gateway]:
    gw = start_gateway(
        tmp_path_factory.mktemp("via-stalling"),
        "--upstream",
        stalling_upstream.url,
        "--upstream-timeout",
        "1",
    )
    yield gw
    gw.daemon.stop()


def test_a_stalled_upstream_gets_504_within_the_timeout(
    stalling_gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    with stalling_gateway.client(timeout=httpx.Timeout(10.0)) as c:
        started = time.monotonic()
        response = c.post(
            "/v2/models/digits-large/infer",
            content=infer_body(heldout[0][:1]),
            headers={"Idempotency-Key": "slow-1"},
        )
        elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert "did not answer within 1 s" in response.json()["error"]
    assert 1.0 <= elapsed < 9.0  # the upstream timeout, not the client's 10 s
    assert stalling_gateway.metric("cloud_gateway_upstream_errors_total", kind="timeout") == 1


def test_an_upstream_that_accepts_and_never_answers_gets_504(
    tmp_path: Path, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    # Listening, so connections are accepted by the kernel, but nothing ever reads or answers.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        gw = start_gateway(
            tmp_path,
            "--upstream",
            f"http://127.0.0.1:{silent.getsockname()[1]}",
            "--upstream-timeout",
            "1",
        )
        try:
            with gw.client(timeout=httpx.Timeout(10.0)) as c:
                started = time.monotonic()
                response = c.post(INFER, content=infer_body(heldout[0][:1]))
                elapsed = time.monotonic() - started
        finally:
            gw.daemon.stop()
    assert response.status_code == 504
    assert 1.0 <= elapsed < 9.0  # the upstream timeout, not the client's 10 s
