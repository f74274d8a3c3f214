"""One `cloud-gateway serve` worker, driven over real sockets: the whole v2 API and every error."""

from __future__ import annotations

import gzip
import json
import select
import socket
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from model_runtime import ModelRepository
from model_runtime.demo import CLOUD_REPOSITORY
from tests.integration.gateway.helpers import (
    UNLIMITED_RATE,
    Gateway,
    add_key,
    infer_body,
    module_gateway,
    start_gateway,
)
from tests.support.processes import BIN, wait_until
from tests.support.raw_http import status_line

pytestmark = pytest.mark.integration

MAX_BODY = 256 * 1024
INFER = "/v2/models/digits-large/infer"
MARKER = "payload-marker-5f1c"  # must never reach a log


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    env = {
        **UNLIMITED_RATE,
        "CLOUD_GATEWAY_MAX_BODY_BYTES": str(MAX_BODY),
        "CLOUD_GATEWAY_MAX_DECOMPRESSED_BYTES": str(1024 * 1024),
        "CLOUD_GATEWAY_KEY_CACHE_S": "0.2",
    }
    # Everything a log could show: access lines, debug messages.
    debug = ("--access-log", "--log-level", "debug")
    yield from module_gateway(tmp_path_factory, "gateway", *debug, env=env)


@pytest.fixture(scope="module")
def model() -> ModelRepository:
    return ModelRepository.load(CLOUD_REPOSITORY)


def post(gw: Gateway, body: bytes, **headers: str) -> httpx.Response:
    with gw.client() as c:
        return c.post(INFER, content=body, headers=headers)


# -- open endpoints, metrics -------------------------------------------------------------------


def test_health_is_open_and_metrics_have_their_own_port(gateway: Gateway) -> None:
    for path in ("/v2/health/live", "/v2/health/ready"):
        response = httpx.get(gateway.url + path)
        assert response.status_code == 200
    assert httpx.get(gateway.url + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(gateway.url + "/metrics").status_code == 404
    assert "cloud_gateway_requests_total" in gateway.metrics_text()


# -- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2"),
        ("GET", "/v2/models/digits-large"),
        ("GET", "/v2/models/x/ready"),
        ("POST", INFER),
    ],
)
def test_no_or_bad_key_gets_401_with_www_authenticate(
    gateway: Gateway, method: str, path: str
) -> None:
    before = gateway.metric("cloud_gateway_auth_failures_total")
    missing = httpx.request(method, gateway.url + path)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="cloud-gateway"'
    assert "error" in missing.json()
    forged = gateway.key[:-2] + ("AA" if not gateway.key.endswith("AA") else "BB")
    for header in (f"Bearer {forged}", "Bearer not-a-key", f"Basic {gateway.key}"):
        bad = httpx.request(method, gateway.url + path, headers={"Authorization": header})
        assert bad.status_code == 401
        assert 'error="invalid_token"' in bad.headers["WWW-Authenticate"]
    assert gateway.metric("cloud_gateway_auth_failures_total") == before + 4


def test_a_revoked_key_is_refused(gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    token = add_key(gateway.key_db, "tablet-9")
    body = infer_body(heldout[0][:1])
    with gateway.client(token) as c:
        assert c.post(INFER, content=body).status_code == 200
        subprocess.run(
            [
                str(BIN / "cloud-gateway"),
                "keys",
                "revoke",
                "tablet-9",
                "--key-db",
                str(gateway.key_db),
            ],
            check=True,
            capture_output=True,
        )
        # Workers trust a checked key for key_cache_s (0.2 s here), then ask the database.
        wait_until(
            lambda: c.post(INFER, content=body).status_code == 401,
            5.0,
            what="the revoked key to be refused",
        )
    assert gateway.metric("cloud_gateway_auth_failures_total", reason="revoked") >= 1


# -- metadata ----------------------------------------------------------------------------------


def test_server_and_model_metadata(gateway: Gateway) -> None:
    with gateway.client() as c:
        assert c.get("/v2").json()["name"] == "cloud-gateway"
        meta = c.get("/v2/models/digits-large").json()
        assert meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}]
        assert c.get("/v2/models/digits-large/versions/1").json() == meta
        assert c.get("/v2/models/digits-large/ready").json() == {
            "name": "digits-large",
            "ready": True,
        }
        assert c.get("/v2/models/digits-large/versions/1/ready").status_code == 200
        for path in (
            "/v2/models/nope",
            "/v2/models/digits-large/versions/2",
            "/v2/models/nope/ready",
        ):
            missing = c.get(path)
            assert missing.status_code == 404
            assert "is not served here" in missing.json()["error"]


# -- inference ---------------------------------------------------------------------------------


def test_infer_answers_as_the_model_does(
    gateway: Gateway, model: ModelRepository, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = heldout
    # All 719 images, gzipped as a device on a thin link would send them.
    response = post(
        gateway, gzip.compress(infer_body(x, "batch-1")), **{"Content-Encoding": "gzip"}
    )
    assert response.status_code == 200
    answer = response.json()
    assert (answer["model_name"], answer["model_version"], answer["id"]) == (
        "digits-large",
        "1",
        "batch-1",
    )
    outputs = {o["name"]: o for o in answer["outputs"]}
    expected = model.get("digits-large").predict({"X": x}).outputs
    assert outputs["label"]["data"] == expected["label"].tolist()
    probabilities = np.asarray(outputs["probabilities"]["data"], dtype=np.float32)
    np.testing.assert_array_equal(probabilities.reshape(-1, 10), expected["probabilities"])
    assert np.mean(np.asarray(outputs["label"]["data"]) == y) > 0.98


def test_request_parameters_and_output_selection(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    body = infer_body(
        heldout[0][:2], "r-2", parameters={"priority": 1, "ttl_s": 60.5}, outputs=["label"]
    )
    answer = post(gateway, body).json()
    assert [o["name"] for o in answer["outputs"]] == ["label"]
    assert answer["outputs"][0]["shape"] == [2]
    assert answer["id"] == "r-2"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"inputs": [', "body: is not valid JSON"),
        (b'{"id": "\xc3\x28"}', "body: is not UTF-8 text"),
        (b'{"inputs": {}}', "inputs: must be a JSON array"),
        (
            b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}',
            "X: shape [1, 3] does not match [-1, 64]",
        ),
        (
            b'{"inputs": [{"name": "X", "datatype": "INT64", "shape": [1, 64], "data": []}]}',
            "X: datatype is INT64, expected FP32",
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "X",
                            "datatype": "FP32",
                            "shape": [1, 64],
                            "data": [float("nan")] * 64,
                        }
                    ]
                }
            ).encode(),
            "X: value at index [0, 0] is nan",
        ),
        (
            b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1]}]}',
            "image: is not an input of the model",
        ),
    ],
)
def test_malformed_requests_get_400_naming_the_field(
    gateway: Gateway, body: bytes, words: str
) -> None:
    runs = gateway.metric("cloud_gateway_model_runs_total")
    response = post(gateway, body, **{"Idempotency-Key": f"bad-{hash(body)}"})
    assert response.status_code == 400
    assert words in response.json()["error"]
    assert gateway.metric("cloud_gateway_model_runs_total") == runs


def test_unknown_model_gets_404(gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    with gateway.client() as c:
        response = c.post("/v2/models/digits-huge/infer", content=infer_body(heldout[0][:1]))
    assert response.status_code == 404
    assert response.json() == {"error": "model 'digits-huge' is not served here"}


# -- idempotency -------------------------------------------------------------------------------


def test_a_repeat_is_replayed_without_running_the_model(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    body = infer_body(heldout[0][:3], "req-77")
    runs = gateway.metric("cloud_gateway_model_runs_total")
    first = post(gateway, body, **{"Idempotency-Key": "req-77"})
    again = post(gateway, body, **{"Idempotency-Key": "req-77"})
    assert first.status_code == again.status_code == 200
    assert "Idempotency-Replayed" not in first.headers
    assert again.headers["Idempotency-Replayed"] == "true"
    assert again.json()["parameters"] == {"idempotent_replay": True}
    assert again.json()["outputs"] == first.json()["outputs"]
    assert gateway.metric("cloud_gateway_model_runs_total") == runs + 1
    assert gateway.metric("cloud_gateway_idempotent_replays_total") >= 1

    other = post(gateway, infer_body(heldout[0][3:4], "req-77"), **{"Idempotency-Key": "req-77"})
    assert other.status_code == 422
    assert "already used for a different request" in other.json()["error"]

    # Keys belong to their device: another device's req-77 is another request.
    with gateway.client(add_key(gateway.key_db, "kiosk-2")) as c:
        theirs = c.post(INFER, content=body, headers={"Idempotency-Key": "req-77"})
    assert "Idempotency-Replayed" not in theirs.headers
    assert gateway.metric("cloud_gateway_model_runs_total") == runs + 2


# -- limits ------------------------------------------------------------------------------------


def _raw(gateway: Gateway) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gateway.daemon.ports["http"]), timeout=10)
    return sock


def _head(gateway: Gateway, *extra: str) -> bytes:
    lines = [
        f"POST {INFER} HTTP/1.1",
        "Host: gateway",
        f"Authorization: Bearer {gateway.key}",
        "Content-Type: application/json",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _status(sock: socket.socket) -> int:
    return int(status_line(sock).split(b" ", 2)[1])


def test_a_declared_oversize_body_gets_413_before_it_is_sent(gateway: Gateway) -> None:
    with _raw(gateway) as sock:
        sock.sendall(_head(gateway, "Content-Length: 1000000000"))
        # Not a byte of the body sent: the answer comes from the header alone.
        assert _status(sock) == 413


def test_a_streamed_oversize_body_is_cut_off_while_it_is_read(gateway: Gateway) -> None:
    chunk = b"[" * 16384
    sent = 0
    with _raw(gateway) as sock:
        sock.sendall(_head(gateway, "Transfer-Encoding: chunked"))
        # Keep sending until the gateway answers; the body never ends, so a gateway that
        # buffered it all before checking would never answer.
        while not select.select([sock], [], [], 0.02)[0]:
            assert sent < 4 * MAX_BODY, "no answer long after the limit"
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        assert _status(sock) == 413
    assert sent <= MAX_BODY + 4 * len(chunk)


def test_gzip_requests_are_accepted_and_counted_as_sent(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    body = infer_body(heldout[0][:200])
    packed = gzip.compress(body)
    before = gateway.metric("cloud_gateway_request_bytes_total", endpoint="infer")
    response = post(gateway, packed, **{"Content-Encoding": "gzip"})
    assert response.status_code == 200
    assert len(response.json()["outputs"][0]["data"]) == 200
    after = gateway.metric("cloud_gateway_request_bytes_total", endpoint="infer")
    assert after - before == len(packed) < len(body) / 2


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_gzip_bomb_gets_413_and_costs_nothing(gateway: Gateway) -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(200)) + compressor.flush()
    assert len(bomb) < MAX_BODY  # small on the wire: 200 MiB once inflated
    peak_before = _peak_rss_kb(gateway.daemon.process.pid)
    response = post(gateway, bomb, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert "over the limit of 1048576 bytes" in response.json()["error"]
    assert _peak_rss_kb(gateway.daemon.process.pid) - peak_before < 32 * 1024


def test_unsupported_content_encoding_gets_415(gateway: Gateway) -> None:
    response = post(gateway, b"....", **{"Content-Encoding": "br"})
    assert response.status_code == 415


def test_responses_are_gzipped_when_asked(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    body = infer_body(heldout[0][:50])
    plain = post(gateway, body, **{"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
    with (
        gateway.client() as c,
        c.stream("POST", INFER, content=body, headers={"Accept-Encoding": "gzip"}) as packed,
    ):
        assert packed.headers["Content-Encoding"] == "gzip"
        raw = b"".join(packed.iter_raw())
    assert json.loads(gzip.decompress(raw)) == plain.json()
    assert len(raw) < len(plain.content) / 2


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(
        tmp_path_factory.mktemp("limited"),
        env={"CLOUD_GATEWAY_RATE_LIMIT_PER_S": "0.5", "CLOUD_GATEWAY_RATE_LIMIT_BURST": "2"},
    )
    yield gw
    gw.daemon.stop()


def test_a_device_over_its_rate_gets_429_with_retry_after(limited: Gateway) -> None:
    with limited.client() as c:
        assert [c.get("/v2").status_code for _ in range(2)] == [200, 200]  # the burst
        refused = c.get("/v2")
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "2"  # one token every 2 s
    with limited.client(add_key(limited.key_db, "another-site")) as c:
        assert c.get("/v2").status_code == 200  # other devices are not held back
    assert httpx.get(limited.url + "/v2/health/ready").status_code == 200  # health is not limited
    assert limited.metric("cloud_gateway_rate_limited_total") == 1


# -- logs (keep last: it reads what every test above made the gateway log) ----------------------


def test_keys_and_payloads_never_reach_the_logs(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    post(gateway, infer_body(heldout[0][:1], MARKER, parameters={"note": MARKER}))
    post(gateway, b'{"inputs": "' + MARKER.encode() + b'"}')
    post(gateway, infer_body(heldout[0][:1], MARKER), **{"Idempotency-Key": MARKER})
    httpx.get(gateway.url + "/v2", headers={"Authorization": f"Bearer {gateway.key}x"})
    log = gateway.daemon.log()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    # JSON lines, and the access log is on and was read
    assert any(f'"POST {INFER} HTTP/1.1" 200' in e["msg"] for e in events)
    # at debug, one event per call with a request id of its own
    calls = [e for e in events if e["msg"] == f"POST {INFER}"]
    assert {e["status"] for e in calls} >= {200, 400}
    assert all(len(str(e["request_id"])) == 16 for e in calls)
    secret = gateway.key.split(".", 1)[1]
    assert secret not in log
    assert gateway.key not in log
    assert MARKER not in log
    assert "0.0625" not in log  # a pixel value of the held-out images
