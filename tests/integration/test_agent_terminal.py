"""On a terminal, `edge-agent serve` says in one line where it serves and where its state is."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
from pathlib import Path

from tests.support.processes import BIN


def test_serve_on_a_terminal_prints_one_human_line(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    state = tmp_path / "state"
    agent = subprocess.Popen(
        [str(BIN / "edge-agent"), "serve", "--port", "0", "--metrics-port", "0",
         "--state-dir", str(state)],
        stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True,
    )  # fmt: skip
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"Ctrl-C stops" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                seen += os.read(controller, 4096)
    finally:
        agent.send_signal(signal.SIGINT)
        assert agent.wait(30) == 0
        os.close(controller)
    text = seen.decode(errors="replace")
    (line,) = [ln for ln in text.splitlines() if "serving gRPC on" in ln]
    assert re.fullmatch(
        r"edge-agent \S+ serving gRPC on 127\.0\.0\.1:\d+, metrics on "
        r"http://127\.0\.0\.1:\d+/metrics, state in (\S+), cloud: none, all answered here "
        r"\(Ctrl-C stops\)\r?",
        line,
    ), line
    assert str(state.resolve()) in line
