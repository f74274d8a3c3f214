"""The attacks of issue 12 on one `cloud-gateway serve`, each a regression test over real sockets:
parser edges, and the work one request may cause (items, elements, answer bytes, requests in
flight).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.gateway.helpers import Gateway, start_gateway

pytestmark = pytest.mark.integration

INFER = "/v2/models/digits-large/infer"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(
        tmp_path_factory.mktemp("gateway"),
        env={
            "CLOUD_GATEWAY_RATE_LIMIT_PER_S": "1000",
            "CLOUD_GATEWAY_RATE_LIMIT_BURST": "1000",
        },
    )
    yield gw
    assert gw.daemon.stop() == 0


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
