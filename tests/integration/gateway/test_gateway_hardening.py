"""The attacks of issue 12 on one `cloud-gateway serve`, each a regression test over real sockets:
parser edges, and the work one request may cause (items, elements, answer bytes, requests in
flight).
"""

from __future__ import annotations

import gzip
import json
import re
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.gateway.helpers import (
    UNLIMITED_RATE,
    Gateway,
    add_key,
    infer_body,
    module_gateway,
)
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration

INFER = "/v2/models/digits-large/infer"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    yield from module_gateway(tmp_path_factory, "gateway", env=UNLIMITED_RATE)


def post(gw: Gateway, body: bytes, path: str = INFER, **headers: str) -> httpx.Response:
    with gw.client() as c:
        return c.post(path, content=body, headers=headers)


def fp32_body(data: list[object]) -> bytes:
    tensor = {"name": "X", "datatype": "FP32", "shape": [1, 64], "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


# -- parser edges --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "body: is nested more than 1024 levels deep",
        ),
        (
            b'{"inputs": [{"name": "X", "datatype": "INT64", "shape": [1], "data": ['
            + b"9" * 5_000
            + b"]}]}",
            "body: holds an integer of more than 4300 digits",
        ),
    ],
    ids=["nesting-100000", "integer-5000-digits"],
)
def test_bodies_no_parser_should_chase_get_a_one_line_400(
    gateway: Gateway, body: bytes, error: str
) -> None:
    # Before: 500 "internal error", and a RecursionError / ValueError traceback at ERROR.
    response = post(gateway, body)
    assert response.status_code == 400
    assert response.json() == {"error": error}
    assert "Traceback" not in gateway.daemon.log()


@pytest.mark.parametrize(("value", "found"), [("0.5", "found a string"), (True, "found a boolean")])
def test_fp32_values_must_be_json_numbers(gateway: Gateway, value: object, found: str) -> None:
    # Before: numpy read "0.5" as 0.5 and true as 1.0, and the model ran on them.
    runs = gateway.metric("cloud_gateway_model_runs_total")
    response = post(gateway, fp32_body([value] + [0.0] * 63))
    assert response.status_code == 400
    assert response.json()["error"] == f"X: values are not FP32: numbers only, {found}"
    assert gateway.metric("cloud_gateway_model_runs_total") == runs


@pytest.mark.parametrize("version", ["01", " +1", "\u0661"])
def test_only_canonical_version_numbers_name_a_version(gateway: Gateway, version: str) -> None:
    # Before: int() read each of them as version 1, which answered.
    body = fp32_body([0.0] * 64)
    path = f"/v2/models/digits-large/versions/{version}"
    with gateway.client() as c:
        metadata = c.get(path)
    for response in (post(gateway, body, f"{path}/infer"), metadata):
        assert response.status_code == 400
        assert response.json()["error"].startswith(f"version: {version!r} is not a version")
    assert post(gateway, body, "/v2/models/digits-large/versions/1/infer").status_code == 200


def test_the_parser_edges_left_no_traceback(gateway: Gateway) -> None:
    log = gateway.daemon.log()
    assert "Traceback" not in log
    assert '"level": "error"' not in log


# -- bounded work per request --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with tiny limits, so that each one can be met with small requests."""
    env = {
        **UNLIMITED_RATE,
        "CLOUD_GATEWAY_MAX_ITEMS_PER_REQUEST": "8",
        "CLOUD_GATEWAY_MAX_TENSOR_ELEMENTS": "200",
        "CLOUD_GATEWAY_MAX_ANSWER_BYTES": "1024",
        "CLOUD_GATEWAY_MAX_IN_FLIGHT_PER_DEVICE": "2",
        "CLOUD_GATEWAY_MAX_IN_FLIGHT": "3",
    }
    yield from module_gateway(tmp_path_factory, "tight", env=env)


def rows(n: int) -> np.ndarray:
    return np.full((n, 64), 0.25, dtype=np.float32)


@pytest.mark.parametrize(
    ("n", "limit", "error"),
    [
        (9, "items_per_request", "X: 9 items, over the limit of 8 per request"),
        (4, "elements_per_tensor", "X: 256 values, over the limit of 200 per tensor"),
        (3, "answer_bytes", "outputs: the answer for 3 items could take 1055 bytes, over the"),
    ],
)
def test_requests_over_a_work_limit_get_413_before_the_model_runs(
    tight: Gateway, n: int, limit: str, error: str
) -> None:
    runs = tight.metric("cloud_gateway_model_runs_total")
    refusals = tight.metric("cloud_gateway_limit_refusals_total", limit=limit)
    response = post(tight, infer_body(rows(n)), **{"Idempotency-Key": f"limit-{limit}"})
    assert response.status_code == 413
    assert response.json()["error"].startswith(error)
    assert tight.metric("cloud_gateway_model_runs_total") == runs
    assert tight.metric("cloud_gateway_limit_refusals_total", limit=limit) == refusals + 1


def test_the_16_kb_gzip_of_131000_items_is_refused_while_it_inflates(gateway: Gateway) -> None:
    # Issue 12's request: 131,000 x 64 values, a 17.8 MB answer, the loop blocked for 0.9 s.
    tensor = {"name": "X", "datatype": "FP32", "shape": [131_000, 64], "data": [0] * 8_384_000}
    body = gzip.compress(json.dumps({"inputs": [tensor]}).encode())
    runs = gateway.metric("cloud_gateway_model_runs_total")
    response = post(gateway, body, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert response.json()["error"].endswith("over the limit of 2097152 bytes")
    assert gateway.metric("cloud_gateway_model_runs_total") == runs


def test_the_answer_bound_counts_only_the_outputs_asked_for(tight: Gateway) -> None:
    body = infer_body(rows(3), outputs=["label"])
    assert post(tight, body).status_code == 200
    assert post(tight, infer_body(rows(2))).status_code == 200


def _hold_request_open(gw: Gateway, key: str) -> socket.socket:
    """A request whose headers are in and whose body never ends: in flight until closed."""
    sock = socket.create_connection(("127.0.0.1", gw.daemon.ports["http"]))
    sock.sendall(
        (
            f"POST {INFER} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        ).encode()
    )
    return sock


def _the_refused_one(held: list[socket.socket], timeout: float = 30.0) -> tuple[int, str, str]:
    """The answer to the one held request the gateway refused at admission: status, Retry-After
    and body. Held requests never end, so no request of the test holds a slot for a moment:
    which one is refused is a race, that exactly one is, is not."""
    ready, _, _ = select.select(held, [], [], timeout)
    assert len(ready) == 1, f"{len(ready)} of {len(held)} held requests were answered"
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        ready[0].settimeout(timeout)
        chunk = ready[0].recv(65536)
        assert chunk, f"the connection closed after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    return int(lines[0].split()[1]), headers.get("retry-after", ""), body.decode()


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode().lower()
    match = re.search(r"content-length: (\d+)", head)
    return int(match.group(1)) if match else 0


def test_requests_in_flight_are_bounded_per_device_then_in_total(tight: Gateway) -> None:
    other = add_key(tight.key_db, "clinic-2")
    held = [_hold_request_open(tight, tight.key) for _ in range(3)]
    try:
        status, retry_after, body = _the_refused_one(held)
        assert status == 429
        assert retry_after == "1"
        assert "already has 2 requests in flight" in json.loads(body)["error"]
        others = [_hold_request_open(tight, other) for _ in range(2)]
        held += others
        status, retry_after, body = _the_refused_one(others)
        assert status == 503
        assert retry_after == "1"
        assert "the gateway already has 3 requests in flight" in json.loads(body)["error"]
    finally:
        for sock in held:
            sock.close()
    body = infer_body(rows(1))
    wait_until(lambda: post(tight, body).status_code == 200, what="the slots to be free again")
    assert tight.metric("cloud_gateway_limit_refusals_total", limit="device_in_flight") >= 1
    assert tight.metric("cloud_gateway_limit_refusals_total", limit="in_flight") >= 1


# -- a bounded idempotency store -----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    env = {
        **UNLIMITED_RATE,
        "CLOUD_GATEWAY_IDEMPOTENCY_MAX_BYTES": str(8 * 1024 * 1024),
        "CLOUD_GATEWAY_MAX_ANSWER_BYTES": str(256 * 1024),
    }
    yield from module_gateway(tmp_path_factory, "small-store", env=env)


def test_stored_answers_stay_within_the_store_bytes(small_store: Gateway) -> None:
    # Issue 12: every answer was kept 7 days without a cap; 48 large ones made an 862 MB WAL.
    state = small_store.daemon.args[small_store.daemon.args.index("--state-dir") + 1]

    def files_bytes() -> int:  # the database, its WAL and shared memory
        return sum(f.stat().st_size for f in Path(state).glob("idempotency.sqlite3*"))

    body = infer_body(np.random.default_rng(0).random((1024, 64), dtype=np.float32))
    statuses = []
    with small_store.client() as c:
        for i in range(120):  # ~20 MB of answers for an 8 MiB store
            response = c.post(INFER, content=body, headers={"Idempotency-Key": f"big-{i}"})
            statuses.append(response.status_code)
            assert files_bytes() <= 8 * 1024 * 1024
            if response.status_code == 503:
                break
        assert response.status_code == 503
        assert "idempotency_max_bytes" in response.json()["error"]
        # Until the oldest answer expires (7 days), within reason.
        assert response.headers["Retry-After"] == "3600"
        # Stored answers are still replayed, and requests without a key still run.
        replay = c.post(INFER, content=body, headers={"Idempotency-Key": "big-0"})
        assert replay.headers["Idempotency-Replayed"] == "true"
        assert c.post(INFER, content=infer_body(rows(1))).status_code == 200
    assert statuses.count(200) >= 20
    refusals = small_store.metric("cloud_gateway_idempotency_refusals_total", reason="store_full")
    assert refusals == 1
