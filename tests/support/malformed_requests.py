"""Requests uvicorn cannot take as HTTP/1.1, sent in bursts on raw sockets, and the lines in
which a daemon's connection guard sums them up (model_runtime.connection_guard).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

__all__ = [
    "NOT_HTTP",
    "UPGRADE_TO_H2C",
    "LogTail",
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
            answers.extend(_status_line(sock) for sock in sockets)
        finally:
            for sock in sockets:
                sock.close()
    return answers


def _status_line(sock: socket.socket) -> bytes:
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
