"""Browser rules of the REST API: pages from other origins are refused unless the operator
allowed them (then CORS and preflights answer for them), Host must be this machine's, and the
API listens beyond loopback only when callers must authenticate (or the operator says
--insecure)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import agent_metric, start_agent
from tests.integration.rest.helpers import X, body
from tests.support.processes import BIN, Daemon

KIOSK = "http://127.0.0.1:5173"  # a kiosk page served by some other local web server
PREFLIGHT = {
    "Origin": KIOSK,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type,request-timeout",
}


@pytest.fixture(scope="module")
def open_to_kiosk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = start_agent(tmp_path_factory.mktemp("cors"), "--rest-cors-origin", KIOSK)
    yield daemon
    daemon.stop()


def items(agent: Daemon) -> float:
    return agent_metric(agent, "edge_agent_items_total", model="digits")


def test_pages_from_other_origins_are_refused_by_default(agent: Daemon, rest: httpx.Client) -> None:
    before = items(agent)
    refused = rest.post("/v2/models/digits/infer", json=body(X[:1]), headers={"Origin": KIOSK})
    assert refused.status_code == 403
    assert refused.json()["error"].startswith(f"pages from {KIOSK} may not call this API")
    assert "access-control-allow-origin" not in refused.headers
    assert items(agent) == before  # refused before the model ran
    preflight = rest.options("/v2/models/digits/infer", headers=PREFLIGHT)
    assert preflight.status_code == 403

    own = f"http://{agent.address('rest')}"
    assert rest.post(
        "/v2/models/digits/infer", json=body(X[:1]), headers={"Origin": own}
    ).is_success
    assert rest.post("/v2/models/digits/infer", json=body(X[:1])).is_success  # not a browser
    assert items(agent) == before + 2


def test_allowed_origins_get_preflights_and_cors_headers(open_to_kiosk: Daemon) -> None:
    url = f"http://{open_to_kiosk.address('rest')}"
    preflight = httpx.options(f"{url}/v2/models/digits/infer", headers=PREFLIGHT)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == KIOSK
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert {"content-type", "request-timeout", "last-event-id"} <= set(allowed.split(", "))

    answer = httpx.post(
        f"{url}/v2/models/digits/infer", json=body(X[:1]), headers={"Origin": KIOSK}
    )
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == KIOSK
    other = httpx.options(
        f"{url}/v2/models/digits/infer",
        headers={**PREFLIGHT, "Origin": "https://elsewhere.example"},
    )
    assert other.status_code == 403


def test_a_host_that_is_not_this_machine_is_refused(agent: Daemon, rest: httpx.Client) -> None:
    # A page whose domain re-resolves to 127.0.0.1 (DNS rebinding) sends its own name as Host.
    rebound = rest.get("/v2/models/digits", headers={"Host": "attacker.example"})
    assert rebound.status_code == 403
    assert "is not this machine" in rebound.json()["error"]
    port = agent.ports["rest"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert rest.get("/v2/models/digits", headers={"Host": host}).status_code == 200


def test_rest_beyond_loopback_without_tokens_is_refused_at_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "edge-agent"), "serve", "--rest-host", "0.0.0.0", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("edge-agent: rest_host: ")
    assert "0.0.0.0 is beyond loopback: give token_file or tls_client_ca_file (mTLS)" in line
    assert "--insecure" in line


def test_rest_can_be_turned_off(tmp_path: Path) -> None:
    agent = start_agent(tmp_path, "--no-rest")
    try:
        assert set(agent.ports) == {"grpc", "metrics"}
    finally:
        agent.stop()
