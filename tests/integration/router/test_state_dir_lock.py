"""One agent per state dir, with real `edge-agent serve` processes: a second one on the same
directory is refused in one line naming the first, which serves on; the lock dies with its
holder (SIGKILL); `queue purge` beside the running agent leaves its in-memory figures true."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import typer
from typer.testing import CliRunner

from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from edge_agent.queue_cli import queue_app
from model_runtime.demo import HELDOUT
from tests.integration.conftest import start_agent, start_agent_with_cloud
from tests.integration.gateway.helpers import Gateway
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import BIN, Daemon, wait_until

pytestmark = pytest.mark.integration

X = np.load(HELDOUT)["X"]


def serve(state: Path) -> subprocess.CompletedProcess[str]:
    """A second `edge-agent serve`, run to its exit (the timeout fails a wait on the lock)."""
    args = ["serve", "--port", "0", "--metrics-port", "0", "--state-dir", str(state)]
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


def queue(state: Path, *args: str) -> tuple[int, str]:
    app = typer.Typer()
    app.add_typer(queue_app, name="queue")
    result = CliRunner().invoke(app, ["queue", *args, "--state-dir", str(state)])
    return result.exit_code, result.output


def status(agent: Daemon) -> rpb.StatusResponse:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        response: rpb.StatusResponse = rpb_grpc.RouterServiceStub(channel).Status(
            rpb.StatusRequest(), timeout=5
        )
    return response


def ticket_state(agent: Daemon, ticket: str) -> str:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        stub = rpb_grpc.RouterServiceStub(channel)
        try:
            result = stub.GetResult(rpb.GetResultRequest(ticket=ticket), timeout=5)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(rpb.TicketResult.State.Name(result.state))


def escalate(agent: Daemon, i: int, **parameters: object) -> str:
    """escalation=always with the link cut: the answer comes with a ticket, the item is queued."""
    inp = triton.InferInput("X", [1, 64], "FP32")
    inp.set_data_from_numpy(X[i : i + 1])
    result = triton.InferenceServerClient(agent.address("grpc")).infer(
        "digits", [inp], parameters={"escalation": "always", **parameters}, client_timeout=30
    )
    p = result.get_response().parameters
    assert p["route"].string_param == "queue"
    return str(p["ticket"].string_param)


def figure(output: str, name: str) -> int:
    """A number from the `queue status` figures table."""
    found = re.search(rf"│\s*{re.escape(name)}\s*│\s*([\d,]+)\s*│", output)
    assert found is not None, output
    return int(found.group(1).replace(",", ""))


def test_purge_beside_the_running_agent_keeps_its_figures_true(
    tmp_path: Path, gateway: Gateway, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent keeps the queue's bytes in memory (its disk cap is checked against them); purge
    deletes from the same file, so after it the agent's figure must still be the file's."""
    monkeypatch.setenv("COLUMNS", "200")  # rich would wrap the figures table
    state = tmp_path / "state"
    agent = start_agent_with_cloud(tmp_path, gateway, proxy)
    try:
        proxy.cut()
        wait_until(lambda: status(agent).link_state == "down", 20, what="the link to be down")
        short = [escalate(agent, i, ttl_seconds=1) for i in range(2)]
        escalate(agent, 2)
        wait_until(
            lambda: all(ticket_state(agent, t) == "EXPIRED" for t in short),
            timeout=20,
            what="the agent to expire two tickets",
        )
        code, before = queue(state, "status")
        assert code == 0, before
        accounted = figure(before, "accounted bytes (vs queue_cap_bytes)")
        assert status(agent).queue_bytes == accounted > 0

        code, out = queue(state, "purge", "--expired", "--yes")
        assert code == 0, out
        assert "deleted 2 expired item(s)" in out
        assert [ticket_state(agent, t) for t in short] == ["NOT_FOUND", "NOT_FOUND"]
        code, after = queue(state, "status")
        assert figure(after, "accounted bytes (vs queue_cap_bytes)") == accounted
        assert figure(after, "expired since the file was created") == 2
        assert status(agent).queue_bytes == accounted

        escalate(agent, 3)  # the agent's accounting carries on from the right figure
        code, later = queue(state, "status")
        grown = figure(later, "accounted bytes (vs queue_cap_bytes)")
        assert grown > accounted
        assert status(agent).queue_bytes == grown
    finally:
        proxy.restore()
        assert agent.stop() == 0
