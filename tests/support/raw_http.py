"""HTTP/1.1 on raw sockets, for what a client library would not send: requests uvicorn cannot
take, in bursts, and the lines in which a daemon's connection guard sums them up
(model_runtime.connection_guard).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.processes import wait_until

__all__ = [
    "NOT_HTTP",
    "UPGRADE_TO_H2C",
    "LogTail",
    "check_a_malformed_burst",
    "status_line",
    "status_lines",
]

NOT_HTTP = b"HELLO / NOTHTTP\r\nx\r\n\r\n"
UPGRADE_TO_H2C = (
    b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
    b"\r\n"
)
_SUMMARY = "malformed HTTP request(s)"


def status_lines(
    address: tuple[str, int], request: bytes, count: int, batch: int = 50
) -> list[bytes]:
    """`request` sent `count` times, each on a connection of its own, `batch` connections
    open at once (all sent before any answer is read); each answer's status line."""
    answers: list[bytes] = []
    for start in range(0, count, batch):
        sockets = [
            socket.create_connection(address, timeout=10) for _ in range(min(batch, count - start))
        ]
        try:
            for sock in sockets:
                sock.sendall(request)
            answers.extend(status_line(sock) for sock in sockets)
        finally:
            for sock in sockets:
                sock.close()
    return answers


def status_line(sock: socket.socket) -> bytes:
    """The first line of the answer on `sock` (b"" if it closed without one)."""
    received = b""
    while b"\r\n" not in received:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received.partition(b"\r\n")[0]


class LogTail:
    """What a daemon wrote to its log after this was made."""

    def __init__(self, log_path: Path) -> None:
        self._path = log_path
        self._start = log_path.stat().st_size

    def text(self) -> str:
        with self._path.open("rb") as log:
            log.seek(self._start)
            return log.read().decode("utf-8", errors="replace")

    def summaries(self) -> list[str]:
        """The guard's lines about malformed requests."""
        return [line for line in self.text().splitlines() if _SUMMARY in line]

    def summed(self, reason: str) -> int:
        """How many malformed requests of `reason` those lines report in all."""
        return sum(
            int(n) for line in self.summaries() for n in re.findall(rf"(\d+) {reason}\b", line)
        )


def check_a_malformed_burst(
    address: tuple[str, int], counted: Callable[[str], float], log_path: Path
) -> None:
    """200 requests that are not HTTP and 10 asking to upgrade, to the server at `address`:
    each not-HTTP one answered 400, each upgrade served, every one counted (`counted`: the
    malformed-requests counter by reason), summed up in the log (`log_path`) at most once a
    second, and uvicorn's line for each not written."""
    invalid_before = counted("invalid_http")
    upgrades_before = counted("unsupported_upgrade")
    log = LogTail(log_path)
    started = time.monotonic()
    answers = status_lines(address, NOT_HTTP, 200)
    upgrades = status_lines(address, UPGRADE_TO_H2C, 10)
    burst_s = time.monotonic() - started
    assert answers == [b"HTTP/1.1 400 Bad Request"] * 200
    assert upgrades == [b"HTTP/1.1 200 OK"] * 10  # served, the Upgrade ignored
    assert counted("invalid_http") == invalid_before + 200
    assert counted("unsupported_upgrade") == upgrades_before + 10
    # The last count is written when its second ends.
    wait_until(lambda: log.summed("unsupported_upgrade") == 10, what="the summing-up line")
    assert log.summed("invalid_http") == 200
    assert len(log.summaries()) <= 2 + burst_s  # one a second, and the first at once
    assert "Invalid HTTP request" not in log.text()
    assert "upgrade request" not in log.text()
