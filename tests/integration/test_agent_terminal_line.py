"""`edge-agent serve` on a terminal says, in one line, where it can be reached: gRPC (TCP and
the Unix socket), REST and metrics. A real agent with its stderr on a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.processes import BIN
from tests.support.server_cert import server_cert_files

LINE = re.compile(
    r"serving gRPC on 127\.0\.0\.1:(\d+) and unix:(\S+), REST on http://127\.0\.0\.1:(\d+), "
    r"metrics on (https?)://127\.0\.0\.1:(\d+)/metrics, state in (\S+), cloud: none, all answered "
    r"here \(Ctrl-C stops\)"
)


def read_until(fd: int, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
    seen = ""
    deadline = time.monotonic() + timeout
    while (match := pattern.search(seen)) is None:
        left = deadline - time.monotonic()
        assert left > 0, f"no serve line within {timeout} s; the terminal showed:\n{seen}"
        if select.select([fd], [], [], left)[0]:
            try:
                seen += os.read(fd, 4096).decode(errors="replace")
            except OSError:  # the agent exited: the terminal is gone
                raise AssertionError(f"the agent exited; the terminal showed:\n{seen}") from None
    return match


@pytest.mark.parametrize("metrics_tls", [False, True], ids=["http", "https"])
def test_the_serve_line_names_every_address(tmp_path: Path, metrics_tls: bool) -> None:
    socket_path = tmp_path / "agent.sock"
    tls_flags: list[str] = []
    verify: bool | ssl.SSLContext = True
    if metrics_tls:
        cert, key, verify = server_cert_files(tmp_path, "metrics")
        tls_flags = ["--metrics-tls-cert-file", str(cert), "--metrics-tls-key-file", str(key)]
    terminal, its_end = pty.openpty()
    agent = subprocess.Popen(
        [str(BIN / "edge-agent"), "serve", "--port", "0", "--rest-port", "0",
         "--metrics-port", "0", "--uds", str(socket_path), "--state-dir", str(tmp_path / "s"),
         "--log-level", "WARNING", *tls_flags],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=its_end,
    )  # fmt: skip
    os.close(its_end)
    try:
        line = read_until(terminal, LINE, timeout=120)
        grpc_port, uds, rest_port, scheme, metrics_port, state = line.groups()
        assert scheme == ("https" if metrics_tls else "http")
        assert state == str((tmp_path / "s").resolve())
        assert uds == str(socket_path)
        assert socket_path.is_socket()
        rest = httpx.get(f"http://127.0.0.1:{rest_port}/v2/health/ready", timeout=10)
        assert rest.status_code == 200
        metrics = httpx.get(
            f"{scheme}://127.0.0.1:{metrics_port}/metrics", timeout=10, verify=verify
        )
        assert "edge_agent_info" in metrics.text
        assert int(grpc_port) not in (int(rest_port), int(metrics_port))
        agent.send_signal(signal.SIGINT)  # Ctrl-C, as the line says
        assert agent.wait(timeout=60) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        os.close(terminal)
