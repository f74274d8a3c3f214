"""The /metrics rules both daemons share (model_runtime.metrics_endpoint): where it may listen
without a token, what a token file must hold, the bearer gate and TLS, on a real socket."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import httpx
import pytest
import trustme
from prometheus_client import CollectorRegistry, Counter

from cloud_gateway.settings import load_settings as load_gateway_settings
from edge_agent.settings import SettingsError, settings_warnings
from edge_agent.settings import load_settings as load_agent_settings
from model_runtime.metrics_endpoint import (
    check_metrics_bind,
    metrics_tls_context,
    metrics_warning,
    read_metrics_token,
    serve_metrics,
)
from model_runtime.private_files import InsecureSecretFile, SecretFileError
from tests.support.server_cert import server_cert_files

TOKEN = "0123456789abcdef0123456789abcdef"


def token_file(tmp_path: Path, text: str = TOKEN + "\n", mode: int = 0o600) -> Path:
    path = tmp_path / "metrics-token"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_needs_neither_token_nor_opt_out(host: str) -> None:
    check_metrics_bind(host, token_file=None, insecure=False)
    assert metrics_warning(host, token_file=None, insecure=True) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "clinic-7.vpn.example.org"])
def test_beyond_loopback_needs_a_token_or_the_opt_out(host: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metrics_token_file") as caught:
        check_metrics_bind(host, token_file=None, insecure=False)
    assert "--metrics-insecure" in str(caught.value)
    check_metrics_bind(host, token_file=tmp_path / "t", insecure=False)
    check_metrics_bind(host, token_file=None, insecure=True)
    # The opt-out is warned about while it is what lets /metrics listen there; a token wins,
    # and is warned about while it crosses the network in clear.
    warning = metrics_warning(host, token_file=None, insecure=True)
    assert warning is not None
    assert "without authentication (metrics_insecure = true)" in warning
    clear = metrics_warning(host, token_file=tmp_path / "t", insecure=True)
    assert clear is not None
    assert "crosses the network" in clear
    assert "metrics_tls_cert_file" in clear
    assert metrics_warning(host, token_file=tmp_path / "t", insecure=True, tls=True) is None


def test_both_daemons_refuse_the_setting_naming_it_and_the_two_ways_out(tmp_path: Path) -> None:
    flags_of = {"metrics_host": "--metrics-host"}
    loads = (
        lambda: load_agent_settings(flags_of=flags_of, metrics_host="0.0.0.0"),
        lambda: load_gateway_settings(None, {"metrics_host": "0.0.0.0"}, flags_of=flags_of),
    )
    for load in loads:
        with pytest.raises(SettingsError) as caught:
            load()
        (problem,) = caught.value.problems
        assert problem.startswith(
            "metrics_host: 0.0.0.0 is beyond loopback: give metrics_token_file"
        )
        assert "--metrics-insecure" in problem
    agent = load_agent_settings(metrics_host="0.0.0.0", metrics_token_file=tmp_path / "t")
    gateway = load_gateway_settings(None, {"metrics_host": "0.0.0.0", "metrics_insecure": True})
    assert (agent.metrics_host, gateway.metrics_insecure) == ("0.0.0.0", True)


def test_the_agents_opt_out_is_warned_about_by_config_check_and_at_start() -> None:
    (warning,) = settings_warnings(load_agent_settings(metrics_host="::", metrics_insecure=True))
    assert warning.startswith("serving /metrics on :: without authentication")
    assert settings_warnings(load_agent_settings(metrics_insecure=True)) == []  # on loopback


def test_the_token_file_is_one_trimmed_token(tmp_path: Path) -> None:
    assert read_metrics_token(token_file(tmp_path, f"  {TOKEN}\n\n")) == (TOKEN, None)


@pytest.mark.parametrize(
    "text", ["", "short\n", f"{TOKEN} {TOKEN}\n", f"{TOKEN}\n{TOKEN}\n", "\x00" * 20]
)
def test_a_token_file_without_one_usable_token_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(SecretFileError, match="one token of at least 16") as caught:
        read_metrics_token(token_file(tmp_path, text))
    assert TOKEN not in str(caught.value)


def test_a_token_file_others_may_write_is_refused_and_one_they_may_read_warned(
    tmp_path: Path,
) -> None:
    with pytest.raises(InsecureSecretFile):
        read_metrics_token(token_file(tmp_path, mode=0o622))
    token, warning = read_metrics_token(token_file(tmp_path, mode=0o644))
    assert token == TOKEN
    assert warning is not None
    assert "chmod 600" in warning
    assert TOKEN not in warning


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("app_things", "Things.", registry=registry).inc()
    return registry


@pytest.fixture
def gated(registry: CollectorRegistry) -> Iterator[str]:
    server = serve_metrics(registry, "127.0.0.1", 0, namespace="app", token=TOKEN)
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    _stop(server)


def _stop(server: WSGIServer) -> None:
    server.shutdown()
    server.server_close()


def refused(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("app_scrapes_refused_total", {"reason": reason})


def test_without_the_right_bearer_token_a_scrape_gets_401_and_is_counted(
    gated: str, registry: CollectorRegistry
) -> None:
    cases = {
        "missing": {},
        "malformed": {"Authorization": f"Basic {TOKEN}"},
        "wrong": {"Authorization": f"Bearer {TOKEN[:-1]}x"},
    }
    for reason, headers in cases.items():
        answer = httpx.get(gated, headers=headers, timeout=10)
        assert answer.status_code == 401, reason
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert "app_things" not in answer.text
        assert refused(registry, reason) == 1
    answer = httpx.get(gated, headers={"Authorization": f"bearer  {TOKEN}"}, timeout=10)
    assert answer.status_code == 200
    assert "app_things_total 1.0" in answer.text
    assert 'app_scrapes_refused_total{reason="wrong"} 1.0' in answer.text


def test_without_a_token_every_scrape_is_served_and_none_refused(
    registry: CollectorRegistry,
) -> None:
    server = serve_metrics(registry, "::1", 0, namespace="app")
    try:
        answer = httpx.get(f"http://[::1]:{server.server_port}/metrics", timeout=10)
    finally:
        _stop(server)
    assert answer.status_code == 200
    assert "app_things_total 1.0" in answer.text
    assert [refused(registry, r) for r in ("missing", "malformed", "wrong")] == [0, 0, 0]


def test_a_connection_that_says_nothing_is_closed_and_counted(
    registry: CollectorRegistry,
) -> None:
    """Each connection has a thread of its own: one left silent must not keep it for ever."""
    server = serve_metrics(registry, "127.0.0.1", 0, namespace="app", timeout_s=0.2)
    try:
        with socket.create_connection(("127.0.0.1", server.server_port)) as silent:
            silent.settimeout(10)
            assert silent.recv(1) == b""  # closed by the server, well before our 10 s
        answer = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10)
    finally:
        _stop(server)
    assert answer.status_code == 200
    assert refused(registry, "timeout") == 1


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[Path, Path, ssl.SSLContext]:
    return server_cert_files(tmp_path, "metrics")


def test_with_tls_a_silent_or_plain_connection_holds_up_no_scrape(
    registry: CollectorRegistry, tls_pair: tuple[Path, Path, ssl.SSLContext]
) -> None:
    """The handshake happens in each connection's thread, not in accept(): prometheus-client's
    way, a client that connects and says nothing would stop every scrape after it."""
    cert, key, client = tls_pair
    context, warning = metrics_tls_context(cert, key)
    assert warning is None
    server = serve_metrics(registry, "127.0.0.1", 0, namespace="app", token=TOKEN, tls=context)
    url = f"127.0.0.1:{server.server_port}/metrics"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with socket.create_connection(("127.0.0.1", server.server_port)):  # says nothing
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://{url}", headers=bearer, timeout=10)
            answer = httpx.get(f"https://{url}", headers=bearer, verify=client, timeout=10)
            # Counted before its connection was closed; the silent one is still waiting.
            assert refused(registry, "tls") == 1
    finally:
        _stop(server)
    assert answer.status_code == 200
    assert "app_things_total 1.0" in answer.text


def test_the_tls_files_go_together_and_a_key_others_may_write_is_refused(
    tmp_path: Path, tls_pair: tuple[Path, Path, ssl.SSLContext]
) -> None:
    cert, key, _ = tls_pair
    loads = (
        lambda **given: load_agent_settings(**given),
        lambda **given: load_gateway_settings(None, given),
    )
    for load in loads:
        for given in ({"metrics_tls_cert_file": cert}, {"metrics_tls_key_file": key}):
            with pytest.raises(SettingsError) as caught:
                load(**given)
            (problem,) = caught.value.problems
            assert problem.startswith(
                "metrics_tls_key_file: metrics_tls_cert_file and metrics_tls_key_file go "
                "together; give both or neither"
            )
        load(metrics_tls_cert_file=cert, metrics_tls_key_file=key)
    key.chmod(0o644)
    assert "chmod 600" in str(metrics_tls_context(cert, key)[1])
    key.chmod(0o666)
    with pytest.raises(InsecureSecretFile, match="metrics TLS key file"):
        metrics_tls_context(cert, key)
    other = tmp_path / "other.key"
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other))
    other.chmod(0o600)
    with pytest.raises(SecretFileError, match=r"metrics_tls_cert_file .* cannot load them"):
        metrics_tls_context(cert, other)  # a key of another certificate
