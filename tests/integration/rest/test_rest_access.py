"""Who may call the REST API and whose results they see, under the gRPC side's rules
(edge_agent.access): bearer tokens, health and the kiosk page open to all, results shown to the
caller and client id that queued them, the cap on watchers, and HTTPS with the gRPC API's
certificate and client CA (certificates made here with trustme).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from tests.integration.conftest import TOKENS, agent_metric, start_agent_with_cloud
from tests.integration.gateway.helpers import Gateway
from tests.integration.rest.helpers import X, body, rest_ready
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Daemon, start_daemon, wait_until
from tests.support.sse import EventStream

HEADER_TIMEOUT_S = 2.0


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def queued_while_cut(rest: httpx.Client, proxy: FaultProxy, **parameters: str) -> str:
    """Cut the link, wait until the agent sees it down, and queue one request of kiosk-a's
    (escalation always, with `parameters`): its ticket."""
    proxy.cut()
    wait_until(
        lambda: (
            rest.get("/router/v1/status", headers=bearer("kiosk-a")).json()["link_state"] == "down"
        ),
        timeout=30,
        what="the link down",
    )
    request = body(X[:1], parameters={"escalation": "always", **parameters})
    facts = rest.post("/v2/models/digits/infer", json=request, headers=bearer("kiosk-a")).json()
    return str(facts["parameters"]["ticket"])


@pytest.fixture
def agent(
    tmp_path: Path, token_file: Path, gateway: Gateway, proxy: FaultProxy
) -> Iterator[Daemon]:
    daemon = start_agent_with_cloud(
        tmp_path,
        gateway,
        proxy,
        "--token-file",
        str(token_file),
        env={"EDGE_AGENT_MAX_WATCHERS": "2"},
        ready=rest_ready,
    )
    yield daemon
    daemon.stop()


def test_every_call_but_health_and_the_page_needs_a_known_token(
    agent: Daemon, rest: httpx.Client
) -> None:
    calls = [
        lambda h: rest.get("/v2", headers=h),
        lambda h: rest.post("/v2/models/digits/infer", json=body(X[:1]), headers=h),
        lambda h: rest.get("/router/v1/status", headers=h),
        lambda h: rest.get("/router/v1/results", headers=h),
    ]
    for headers, reason, challenge in (
        ({}, "missing", 'Bearer realm="edge-agent"'),
        ({"Authorization": "Bearer " + "x" * 24}, "unknown", 'error="invalid_token"'),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "malformed", 'error="invalid_token"'),
    ):
        before = agent_metric(agent, "edge_agent_auth_failures_total", reason=reason)
        for call in calls:
            refused = call(headers)
            assert refused.status_code == 401, reason
            assert challenge in refused.headers["www-authenticate"]
            assert refused.json()["error"]
        assert agent_metric(agent, "edge_agent_auth_failures_total", reason=reason) == before + 4
    # Probes and the page itself carry no token.
    assert rest.get("/v2/health/ready").status_code == 200
    assert rest.get("/kiosk/").status_code == 200
    answer = rest.post("/v2/models/digits/infer", json=body(X[:1]), headers=bearer("kiosk-b"))
    assert answer.status_code == 200


def test_a_result_reaches_only_the_caller_and_client_id_that_queued_it(
    agent: Daemon, rest: httpx.Client, proxy: FaultProxy
) -> None:
    ticket = queued_while_cut(rest, proxy, client_id="screen-1")

    def get(name: str, client_id: str | None) -> int:
        query = {"client_id": client_id} if client_id else {}
        url = f"/router/v1/tickets/{ticket}"
        return rest.get(url, params=query, headers=bearer(name)).status_code

    assert get("kiosk-a", "screen-1") == 200
    assert get("kiosk-a", None) == 404  # the same token, another screen: not its result
    assert get("kiosk-b", "screen-1") == 404  # another caller, whatever client id it claims

    url = f"{rest.base_url}/router/v1/results"
    with (
        EventStream(f"{url}?client_id=screen-1", bearer("kiosk-a")) as mine,
        EventStream(f"{url}?client_id=screen-1", bearer("kiosk-b")) as theirs,
    ):
        proxy.restore()
        delivered = json.loads(mine.events.get(timeout=30).data)
        assert (delivered["ticket"], delivered["state"]) == (ticket, "delivered")
        # The end was pushed to every watcher in the same turn: none reached the other caller.
        assert theirs.events.empty()


def test_watchers_are_capped_and_their_places_freed(agent: Daemon, rest: httpx.Client) -> None:
    url = f"{rest.base_url}/router/v1/results"
    first = EventStream(url, bearer("kiosk-a"))
    second = EventStream(url, bearer("kiosk-b"))
    try:
        refused = rest.get("/router/v1/results", headers=bearer("kiosk-a"))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "5"
        assert "result watchers are connected already" in refused.json()["error"]
    finally:
        first.close()
        second.close()

    def a_watcher_gets_in() -> bool:
        with rest.stream("GET", "/router/v1/results", headers=bearer("kiosk-a")) as answer:
            return answer.status_code == 200

    # Freed when the client hangs up (Starlette's stream listens for http.disconnect), well
    # before the next heartbeat (15 s), by which a client gone without a word is found.
    wait_until(a_watcher_gets_in, timeout=10, what="closed streams to free their places")


def test_streams_closed_after_their_first_event_give_their_places_back(
    agent: Daemon, rest: httpx.Client, proxy: FaultProxy
) -> None:
    # Closed after the headers: test_watchers_are_capped_and_their_places_freed; before the
    # first byte: tests/unit/test_rest_result_stream.py. The agent learns that a client went
    # away as it hangs up, not at the next heartbeat (15 s).
    def watchers() -> float:
        return agent_metric(agent, "edge_agent_router_result_watchers")

    # One result of kiosk-a's, delivered: every stream of kiosk-a's from cursor 0 sends it first.
    ticket = queued_while_cut(rest, proxy)
    proxy.restore()
    wait_until(
        lambda: (
            rest.get(f"/router/v1/tickets/{ticket}", headers=bearer("kiosk-a")).json()["state"]
            == "delivered"
        ),
        timeout=30,
        what="the queued request delivered",
    )
    url = f"{rest.base_url}/router/v1/results"
    streams = [EventStream(url, bearer("kiosk-a")) for _ in range(2)]
    assert watchers() == 2
    for stream in streams:
        assert json.loads(stream.events.get(timeout=30).data)["ticket"] == ticket
        stream.close()
    wait_until(lambda: watchers() == 0, timeout=10, what="closed streams to free their places")
    with EventStream(url, bearer("kiosk-a")) as again, EventStream(url, bearer("kiosk-b")):
        assert json.loads(again.events.get(timeout=30).data)["ticket"] == ticket
    assert agent_metric(agent, "edge_agent_router_result_watchers_refused_total") == 0


def test_https_with_the_grpc_apis_certificate_and_client_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = {
        "agent.crt": server.cert_chain_pems[0],
        "agent.key": server.private_key_pem,
        "clients-ca.crt": ca.cert_pem,
    }
    for name in ("kiosk-1", "kiosk-2"):
        leaf = ca.issue_cert(f"{name}.clinic", common_name=name)
        files[f"{name}.pem"] = leaf.private_key_and_cert_chain_pem
    for name, blob in files.items():
        blob.write_to_path(str(tmp_path / name))
        (tmp_path / name).chmod(0o600)

    key_file = tmp_path / "device.key"
    key_file.write_text("cgk_0123456789abcdef.unused-by-this-test")
    key_file.chmod(0o600)

    def context(client: str | None) -> ssl.SSLContext:
        made = ssl.create_default_context(cafile=str(tmp_path / "clients-ca.crt"))
        if client is not None:
            made.load_cert_chain(str(tmp_path / f"{client}.pem"))
        return made

    def ready(agent: Daemon) -> bool:
        url = f"https://{agent.address('rest')}/v2/health/ready"
        return httpx.get(url, verify=context("kiosk-1")).status_code == 200

    # mTLS alone, no tokens: a client is named by its certificate, as on gRPC.
    agent = start_daemon(
        "edge-agent",
        [
            "serve", "--port", "0", "--metrics-port", "0", "--rest-port", "0",
            "--state-dir", str(tmp_path / "s"),
            "--tls-cert-file", str(tmp_path / "agent.crt"),
            "--tls-key-file", str(tmp_path / "agent.key"),
            "--tls-client-ca-file", str(tmp_path / "clients-ca.crt"),
            # A cloud that never answers: an escalated request is queued, with a ticket.
            "--cloud-url", "http://127.0.0.1:9", "--device-key-file", str(key_file),
        ],
        tmp_path,
        ready=ready,
        env={"EDGE_AGENT_REST_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT_S)},
    )  # fmt: skip
    try:
        base = f"https://{agent.address('rest')}"
        request = body(X[:1], parameters={"escalation": "always"})
        queued = httpx.post(
            f"{base}/v2/models/digits/infer", json=request, verify=context("kiosk-1")
        )
        assert queued.status_code == 200
        ticket = queued.json()["parameters"]["ticket"]
        mine = httpx.get(f"{base}/router/v1/tickets/{ticket}", verify=context("kiosk-1"))
        assert (mine.status_code, mine.json()["state"]) == (200, "pending")
        theirs = httpx.get(f"{base}/router/v1/tickets/{ticket}", verify=context("kiosk-2"))
        assert theirs.status_code == 404  # another certificate, another caller
        with pytest.raises(httpx.TransportError):  # no client certificate: no connection
            httpx.get(f"{base}/v2/health/ready", verify=context(None))
        with pytest.raises(httpx.TransportError):  # nor plain HTTP
            httpx.get(f"http://{agent.address('rest')}/v2/health/ready")

        # A client that never begins its TLS handshake, and one that sends nothing after it,
        # are closed after the header timeout (asyncio alone would wait 60 s for a handshake).
        host, port = agent.address("rest").rsplit(":", 1)
        with (
            socket.create_connection((host, int(port))) as silent,
            context("kiosk-1").wrap_socket(
                socket.create_connection((host, int(port))), server_hostname=host
            ) as shook,
        ):
            for sock in (silent, shook):
                sock.settimeout(HEADER_TIMEOUT_S + 8)
                with contextlib.suppress(ConnectionResetError, ssl.SSLEOFError):
                    assert sock.recv(1) == b""
        closed = "edge_agent_rest_connections_closed_total"
        assert agent_metric(agent, closed, reason="header_timeout") == 1  # the one with TLS
    finally:
        agent.stop()
