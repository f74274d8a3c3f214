"""Who may read /metrics, on real `edge-agent` and `cloud-gateway` processes: beyond loopback
only scrapers with the bearer token of metrics_token_file (over HTTPS with the metrics TLS
files), or anyone when the operator opts out with --metrics-insecure (warned about at every
start); with a token, on loopback too."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import start_agent
from tests.integration.gateway.helpers import start_gateway
from tests.support.processes import BIN, Daemon
from tests.support.server_cert import server_cert_files

TOKEN = "5e7c0d1f9a8b4c3d2e1f0a9b8c7d6e5f"
DAEMONS = ("edge-agent", "cloud-gateway")


def start(program: str, workdir: Path, *args: str) -> Daemon:
    if program == "edge-agent":
        return start_agent(workdir, *args)
    return start_gateway(workdir, *args).daemon


@pytest.fixture
def token_path(tmp_path: Path) -> Path:
    path = tmp_path / "metrics-token"
    path.write_text(TOKEN + "\n")  # Prometheus' credentials_file trims it, and so do the daemons
    path.chmod(0o600)
    return path


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, ssl.SSLContext]:
    """The metrics port's certificate and key, and a client context trusting its CA."""
    return server_cert_files(tmp_path, "metrics", "127.0.0.1", "localhost")


@pytest.fixture
def running() -> Iterator[Callable[..., Daemon]]:
    """Start a daemon with `start`; every one started is stopped, whatever the test did."""
    started: list[Daemon] = []

    def run(program: str, workdir: Path, *args: str) -> Daemon:
        started.append(start(program, workdir, *args))
        return started[-1]

    yield run
    for daemon in started:
        daemon.stop()


def scrape(daemon: Daemon, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.get(f"http://{daemon.address('metrics')}/metrics", headers=headers, timeout=10)


@pytest.mark.parametrize("program", DAEMONS)
def test_metrics_beyond_loopback_without_a_token_is_refused_at_start(
    program: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [str(BIN / program), "serve", "--port", "0", "--metrics-port", "0",
         "--metrics-host", "0.0.0.0", "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"{program}: metrics_host: 0.0.0.0 is beyond loopback: ")
    assert "give metrics_token_file (--metrics-token-file)" in line
    assert "metrics_insecure = true (--metrics-insecure)" in line
    assert not (tmp_path / "state").exists()  # refused before anything was made


@pytest.mark.parametrize(
    ("program", "host"),
    # The same gate serves both; each daemon once, so both kinds of address are covered.
    [("cloud-gateway", "0.0.0.0"), ("edge-agent", "127.0.0.1")],
)
def test_with_a_token_only_scrapes_that_carry_it_are_answered(
    program: str, host: str, tmp_path: Path, token_path: Path, running: Callable[..., Daemon]
) -> None:
    """On loopback too: a token, once set, is required of every scraper."""
    daemon = running(
        program, tmp_path, "--metrics-host", host, "--metrics-token-file", str(token_path)
    )
    namespace = program.replace("-", "_")
    without, wrong = scrape(daemon), scrape(daemon, TOKEN[::-1])
    for answer in (without, wrong):
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert namespace not in answer.text  # not one series leaks
    answer = scrape(daemon, TOKEN)
    assert answer.status_code == 200
    assert f'{namespace}_scrapes_refused_total{{reason="missing"}} 1.0' in answer.text
    assert f'{namespace}_scrapes_refused_total{{reason="wrong"}} 1.0' in answer.text
    assert f'{namespace}_scrapes_refused_total{{reason="malformed"}} 0.0' in answer.text
    daemon.stop()
    assert TOKEN not in daemon.log()


@pytest.mark.parametrize("program", DAEMONS)
def test_metrics_insecure_serves_anyone_beyond_loopback_with_a_warning_at_start(
    program: str, tmp_path: Path, running: Callable[..., Daemon]
) -> None:
    daemon = running(program, tmp_path, "--metrics-host", "0.0.0.0", "--metrics-insecure")
    assert scrape(daemon).status_code == 200
    daemon.stop()
    warnings = [line for line in daemon.log().splitlines() if '"level": "warning"' in line]
    assert any(
        "serving /metrics on 0.0.0.0 without authentication (metrics_insecure = true)" in line
        for line in warnings
    ), daemon.log()


@pytest.mark.parametrize("program", DAEMONS)
def test_a_token_file_others_may_write_stops_the_start_without_showing_it(
    program: str, tmp_path: Path, token_path: Path
) -> None:
    token_path.chmod(0o666)
    done = subprocess.run(
        [str(BIN / program), "serve", "--port", "0", "--metrics-port", "0",
         "--metrics-token-file", str(token_path), "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"metrics token file {token_path} is writable by its group or by anyone" in done.stderr
    assert TOKEN not in done.stdout + done.stderr


@pytest.mark.parametrize("program", DAEMONS)
def test_with_tls_files_metrics_speak_https_only_and_the_token_never_crosses_in_clear(
    program: str,
    tmp_path: Path,
    token_path: Path,
    tls_files: tuple[Path, Path, ssl.SSLContext],
    running: Callable[..., Daemon],
) -> None:
    cert, key, client = tls_files
    daemon = running(
        program, tmp_path, "--metrics-host", "0.0.0.0", "--metrics-token-file", str(token_path),
        "--metrics-tls-cert-file", str(cert), "--metrics-tls-key-file", str(key),
    )  # fmt: skip
    url = f"{daemon.address('metrics')}/metrics"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"https://{url}", verify=client, timeout=10).status_code == 401
    with pytest.raises(httpx.TransportError):  # plain HTTP: the handshake fails, no answer
        httpx.get(f"http://{url}", headers=bearer, timeout=10)
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate
        httpx.get(f"https://{url}", headers=bearer, timeout=10)
    answer = httpx.get(f"https://{url}", headers=bearer, verify=client, timeout=10)
    assert answer.status_code == 200
    namespace = program.replace("-", "_")
    assert f'{namespace}_scrapes_refused_total{{reason="tls"}} 2.0' in answer.text
    assert f'{namespace}_scrapes_refused_total{{reason="missing"}} 1.0' in answer.text
    daemon.stop()
    log = daemon.log()
    assert TOKEN not in log
    assert "in clear" not in log  # the warning of a token over plain HTTP
    if program == "cloud-gateway":
        assert f"metrics on https://0.0.0.0:{daemon.ports['metrics']}/metrics" in log
    else:
        assert '"metrics_tls": true' in log


def test_a_token_over_plain_http_beyond_loopback_is_warned_about_at_start(
    tmp_path: Path, token_path: Path, running: Callable[..., Daemon]
) -> None:
    daemon = running(
        "cloud-gateway", tmp_path, "--metrics-host", "0.0.0.0",
        "--metrics-token-file", str(token_path),
    )  # fmt: skip
    assert scrape(daemon, TOKEN).status_code == 200
    daemon.stop()
    assert "the /metrics token crosses the network to 0.0.0.0 in clear" in daemon.log()
