"""Bad REST requests get the status and the words the gRPC side gives them (the twins of
tests/integration/test_agent_bad_input.py), are counted, and change nothing.

v2 JSON has no raw contents: the three gRPC rules about raw bytes (their length, their count,
raw beside typed contents) have as twins the refusals of binary tensor data, the one way REST
could carry raw bytes, and of values that are not of the tensor's datatype.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration.conftest import agent_metric
from tests.integration.rest.helpers import X, body
from tests.support.processes import Daemon
from tests.support.raw_http import check_a_malformed_burst

JSON = {"Content-Type": "application/json"}


class Call:
    """A POST to an infer URL: a body (JSON-encoded unless bytes) and extra headers."""

    def __init__(self, content: Any, path: str = "/v2/models/digits/infer", **headers: str) -> None:
        self.content = content
        self.path = path
        self.headers = {**JSON, **headers}

    def send(self, client: httpx.Client) -> httpx.Response:
        raw = self.content if isinstance(self.content, bytes) else json.dumps(self.content)
        return client.post(self.path, content=raw, headers=self.headers)


def nan_input() -> Call:
    x = X[:2].copy()
    x[1, 5] = np.nan
    return Call(json.dumps(body(x)).encode())  # NaN as JSON's non-standard literal


def short_data() -> Call:
    request = body(X[:1])
    request["inputs"][0]["data"] = [0.5] * 63
    return Call(request)


def binary_data() -> Call:
    request = body(X[:1])
    del request["inputs"][0]["data"]
    request["inputs"][0]["parameters"] = {"binary_data_size": 256}
    return Call(request)


def text_values() -> Call:
    request = body(X[:1])
    request["inputs"][0]["data"] = ["light"] * 64
    return Call(request)


CASES: dict[str, tuple[Callable[[], Call], int, str, str | None]] = {
    "unknown model": (
        lambda: Call(body(X[:1]), "/v2/models/nope/infer"),
        404,
        "model 'nope' is not served here",
        None,
    ),
    "unknown version": (
        lambda: Call(body(X[:1]), "/v2/models/digits/versions/9/infer"),
        404,
        "model 'digits' version '9' is not served here",
        None,
    ),
    "unknown input": (
        lambda: Call(body(X[:1], name="pixels")),
        400,
        "pixels: model 'digits' has no such input (inputs: X)",
        "unknown_input",
    ),
    "missing input": (lambda: Call({"inputs": []}), 400, "X: input is missing", "missing_input"),
    "wrong datatype": (
        lambda: Call(body(X[:1].astype(np.float64), datatype="FP64")),
        400,
        "X: datatype is FP64, expected FP32",
        "datatype",
    ),
    "wrong shape": (
        lambda: Call(body(X[:2, :60])),
        400,
        "X: shape [2, 60] does not match [-1, 64]",
        "shape",
    ),
    "binary tensor extension (twin of byte length)": (
        lambda: Call(b"{}", **{"Inference-Header-Content-Length": "2"}),
        415,
        "the binary tensor extension is not supported",
        None,
    ),
    "data count (twin of typed contents count)": (
        short_data,
        400,
        "X: 63 values given, but shape [1, 64] needs 64",
        "shape",
    ),
    "binary data size (twin of raw count)": (
        binary_data,
        400,
        "X.data: is missing; binary tensor data is not read here",
        "invalid",
    ),
    "values of another type (twin of both contents and raw)": (
        text_values,
        400,
        "X: values are not FP32",
        "datatype",
    ),
    "nan": (nan_input, 400, "X: value at index [1, 5] is nan", "non_finite"),
    "unknown output": (
        lambda: Call(body(X[:1], outputs=[{"name": "logits"}])),
        400,
        "logits: model 'digits' has no such output",
        "unknown_output",
    ),
    "too large": (
        # 300 items x 64 values as JSON text: well over the fixture's 65,536-byte limit
        lambda: Call(body(np.resize(X, (300, 64)))),
        413,
        "over the limit of 65536 bytes",
        None,
    ),
    # REST's own
    "not JSON": (lambda: Call(b'{"inputs": ['), 400, "body: is not valid JSON", "invalid"),
    "not an object": (lambda: Call([]), 400, "body: must be a JSON object", "invalid"),
    "bad parameter": (
        lambda: Call(body(X[:1], parameters={"escalation": "sometimes"})),
        400,
        "parameters.escalation: must be one of auto, never, always",
        "parameter",
    ),
    "bad deadline": (
        lambda: Call(body(X[:1]), **{"Request-Timeout": "soon"}),
        400,
        "Request-Timeout: must be a number of seconds above 0, got 'soon'",
        "invalid",
    ),
    "unsupported encoding": (
        lambda: Call(b"....", **{"Content-Encoding": "br"}),
        415,
        "Content-Encoding 'br' is not supported",
        None,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_refused_clearly_and_counted(
    case: str, agent: Daemon, rest: httpx.Client
) -> None:
    make, status, words, reason = CASES[case]
    model = "unknown" if case == "unknown model" else "digits"
    labels = {"code": str(status), "endpoint": "infer", "model": model}
    before = agent_metric(agent, "edge_agent_http_requests_total", **labels)
    invalid = {"model": "digits", "reason": reason or ""}
    invalid_before = agent_metric(agent, "edge_agent_invalid_requests_total", **invalid)

    response = make().send(rest)

    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["error"]
    assert agent_metric(agent, "edge_agent_http_requests_total", **labels) == before + 1
    if reason is not None:
        assert (
            agent_metric(agent, "edge_agent_invalid_requests_total", **invalid)
            == invalid_before + 1
        )
    # and the agent goes on answering
    ok = rest.post("/v2/models/digits/infer", json=body(X[:1]))
    assert ok.status_code == 200
    assert [o["name"] for o in ok.json()["outputs"]] == ["label", "probabilities"]


def test_a_body_declared_too_large_is_refused_before_it_is_sent(agent: Daemon) -> None:
    host, port = agent.address("rest").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
        )
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 413
        assert "over the limit of 65536 bytes" in json.loads(answer.read())["error"]


def test_bad_requests_leave_threads_and_memory_unchanged(agent: Daemon, rest: httpx.Client) -> None:
    def burst() -> None:
        for make, status, _words, _reason in CASES.values():
            for _ in range(20):
                assert make().send(rest).status_code == status

    agent.assert_steady(burst)


CLOSED = "edge_agent_rest_connections_closed_total"


def test_an_endless_request_head_is_cut_off_with_431(agent: Daemon, rest: httpx.Client) -> None:
    _, rss_before = agent.threads_and_rss_kb()
    closed = agent_metric(agent, CLOSED, reason="head_too_large")
    host, port = agent.address("rest").split(":")
    line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    sent = 0
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with contextlib.suppress(ConnectionError):
            while sent < 8 << 20:  # 8 MB of headers, if the agent were to take them all
                sock.sendall(line)
                sent += len(line)
        with contextlib.suppress(ConnectionError):
            answer = sock.recv(1024)
            assert answer.startswith(b"HTTP/1.1 431 "), answer
            assert b"more than 16384 bytes" in answer
    assert sent < 8 << 20, "the agent read 8 MB of headers"
    assert agent_metric(agent, CLOSED, reason="head_too_large") == closed + 1
    assert agent.threads_and_rss_kb()[1] - rss_before < 2048
    assert rest.get("/v2/health/ready").status_code == 200


def test_a_burst_of_malformed_requests_is_counted_and_summed_up_in_a_line_or_two(
    agent: Daemon, rest: httpx.Client
) -> None:
    host, port = agent.address("rest").split(":")
    check_a_malformed_burst(
        (host, int(port)),
        lambda reason: agent_metric(
            agent, "edge_agent_rest_malformed_requests_total", reason=reason
        ),
        agent.log_path,
    )
    assert rest.get("/v2/health/ready").status_code == 200
