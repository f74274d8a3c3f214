"""One agent per state dir, with real `edge-agent serve` processes: a second one on the same
directory is refused in one line naming the first, which serves on; the lock dies with its
holder (SIGKILL); `queue purge` beside the running agent leaves its in-memory figures true."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from model_runtime.demo import HELDOUT
from tests.integration.conftest import start_agent
from tests.support.processes import BIN

pytestmark = pytest.mark.integration

X = np.load(HELDOUT)["X"]


def serve(state: Path) -> subprocess.CompletedProcess[str]:
    """A second `edge-agent serve`, run to its exit (the timeout fails a wait on the lock)."""
    args = ["serve", "--port", "0", "--metrics-port", "0", "--rest-port", "0"]
    args += ["--state-dir", str(state)]
    return subprocess.run(
        [str(BIN / "edge-agent"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_second_agent_on_the_same_state_dir_is_one_clear_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = start_agent(tmp_path)
    try:
        second = serve(state)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"edge-agent: state dir {state} is in use by another edge-agent"
            f" (pid {first.process.pid}); stop it or give --state-dir another directory"
        ]
        assert second.stdout == ""
        client = triton.InferenceServerClient(first.address("grpc"))
        assert client.is_server_ready()
        assert client.is_model_ready("digits")
        assert first.process.poll() is None
    finally:
        assert first.stop() == 0
    start_agent(tmp_path).stop()  # stopped cleanly, the first lets the next one in


def test_after_a_power_cut_the_next_agent_starts(tmp_path: Path) -> None:
    first = start_agent(tmp_path)
    first.kill()  # SIGKILL: nothing of the first runs again; its lock file and pid stay behind
    assert (tmp_path / "state" / "agent.lock").read_text() == f"{first.process.pid}\n"
    again = start_agent(tmp_path)
    try:
        assert triton.InferenceServerClient(again.address("grpc")).is_model_ready("digits")
    finally:
        assert again.stop() == 0


# -- queue purge beside the running agent ---------------------------------------------------------
