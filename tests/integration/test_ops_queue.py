"""`edge-agent queue status | list | show | purge --expired` against the queue of a real agent
that is running and holds the file open, with its link to a real gateway cut."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
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
from tests.integration.conftest import start_agent_with_cloud
from tests.integration.gateway.helpers import Gateway
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Daemon, wait_until

pytestmark = pytest.mark.integration

X = np.load(HELDOUT)["X"]


def cli() -> typer.Typer:
    """`edge-agent` with the queue commands, as edge_agent/cli.py registers them."""
    app = typer.Typer()
    app.add_typer(queue_app, name="queue")
    return app


@pytest.fixture
def agent(tmp_path: Path, gateway: Gateway, proxy: FaultProxy) -> Iterator[Daemon]:
    daemon = start_agent_with_cloud(tmp_path, gateway, proxy)
    yield daemon
    daemon.stop()


@pytest.fixture(autouse=True)
def _wide_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps long tickets in narrower tables


def queue(state: Path, *args: str, answer: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli(), ["queue", *args, "--state-dir", str(state)], input=answer)
    return result.exit_code, result.output


def escalate(agent: Daemon, i: int, priority: int = 0, **parameters: object) -> str:
    """Ask with escalation=always while the link is cut: the answer comes with a ticket."""
    inp = triton.InferInput("X", [1, 64], "FP32")
    inp.set_data_from_numpy(X[i : i + 1])
    client = triton.InferenceServerClient(agent.address("grpc"))
    # tritonclient sends `priority` as the request parameter of that name, as Triton does.
    result = client.infer(
        "digits",
        [inp],
        parameters={"escalation": "always", **parameters},
        priority=priority,
        client_timeout=30,
    )
    p = result.get_response().parameters
    assert p["route"].string_param == "queue"
    return str(p["ticket"].string_param)


def ticket_state(agent: Daemon, ticket: str) -> str:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        stub = rpb_grpc.RouterServiceStub(channel)
        try:
            result = stub.GetResult(rpb.GetResultRequest(ticket=ticket), timeout=5)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(rpb.TicketResult.State.Name(result.state))


def cut_link(agent: Daemon, proxy: FaultProxy) -> None:
    """Cut the link and wait until the agent knows, so nothing is in flight when we look."""
    proxy.cut()

    def link_down() -> bool:
        with grpc.insecure_channel(agent.address("grpc")) as channel:
            status = rpb_grpc.RouterServiceStub(channel).Status(rpb.StatusRequest(), timeout=5)
        return str(status.link_state) == "down"

    wait_until(link_down, timeout=20, what="the agent to see its link down")


def row(output: str, *cells: str) -> bool:
    """Whether a table row holds these cells, in this order."""
    pattern = r"\s*│\s*".join(re.escape(c) for c in cells)
    return re.search(rf"│\s*{pattern}\s*│", output) is not None


def test_inspect_and_purge_the_queue_while_the_agent_runs(
    agent: Daemon, proxy: FaultProxy, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    cut_link(agent, proxy)
    urgent = [escalate(agent, i, priority=2) for i in range(3)]  # Triton's order: 1 first
    short = [escalate(agent, i, ttl_seconds=1) for i in range(3, 5)]

    code, out = queue(state, "status")
    assert code == 0, out
    assert row(out, "pending", "5")
    assert row(out, "2", "3")  # priority 2: three waiting
    assert row(out, "5", "2")

    code, out = queue(state, "list")
    assert code == 0, out
    assert "5 of 5 item(s) in state pending, in_flight" in out
    listed = re.findall(r"│ ([0-9a-f-]{36}) ", out)
    assert set(listed[:3]) == set(urgent)  # the urgent ones first
    assert all(t in out for t in short)

    code, out = queue(state, "show", urgent[0])
    assert code == 0, out
    assert row(out, "state", "pending")
    assert row(out, "priority", "2")
    assert row(out, "model", "digits-large")

    code, out = queue(state, "show", "no-such-ticket")
    assert code == 1
    assert "'no-such-ticket' is not in" in out

    # The agent expires the short-lived two (it checks every few seconds).
    wait_until(
        lambda: all(ticket_state(agent, t) == "EXPIRED" for t in short),
        timeout=20,
        what="the agent to expire two tickets",
    )
    code, out = queue(state, "list", "--state", "expired")
    assert code == 0, out
    assert "2 of 2 item(s) in state expired" in out

    # Declined: nothing changes.
    code, out = queue(state, "purge", "--expired", answer="n\n")
    assert code == 1
    assert "Delete 2 expired item(s)" in out
    assert "nothing changed" in out
    assert [ticket_state(agent, t) for t in short] == ["EXPIRED", "EXPIRED"]

    code, out = queue(state, "purge", "--expired", "--yes")
    assert code == 0, out
    assert "deleted 2 expired item(s)" in out
    assert [ticket_state(agent, t) for t in short] == ["NOT_FOUND", "NOT_FOUND"]
    code, out = queue(state, "purge", "--expired", "--yes")
    assert "no expired items" in out

    # The running agent carries on with the rest: they drain once the link is back.
    proxy.restore()
    wait_until(
        lambda: all(ticket_state(agent, t) == "DELIVERED" for t in urgent),
        timeout=30,
        what="the queue to drain",
    )
    code, out = queue(state, "status")
    assert row(out, "delivered", "3")
    assert row(out, "pending", "0")
    assert row(out, "expired since the file was created", "2")


def test_queue_commands_on_the_command_line(
    agent: Daemon, proxy: FaultProxy, tmp_path: Path
) -> None:
    """The real process: read-only while the agent writes, exit codes, no queue file."""
    cut_link(agent, proxy)
    ticket = escalate(agent, 0)
    command = [
        sys.executable,
        "-c",
        "from edge_agent.queue_cli import queue_app; queue_app(prog_name='edge-agent queue')",
    ]
    env = {**os.environ, "COLUMNS": "200"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, *args], capture_output=True, text=True, env=env, timeout=60, check=False
        )

    shown = run("show", ticket, "--state-dir", str(tmp_path / "state"))
    assert shown.returncode == 0, shown.stderr
    assert row(shown.stdout, "state", "pending")

    missing = run("status", "--state-dir", str(tmp_path / "elsewhere"))
    assert missing.returncode == 1
    assert "no queue file at" in missing.stderr
    assert not (tmp_path / "elsewhere").exists()  # looking never creates a queue

    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    listed = run("list", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    assert ticket in listed.stdout

    # The backup the README prescribes, taken while the agent runs, holds the waiting item.
    sqlite3 = shutil.which("sqlite3")
    if sqlite3 is None:
        pytest.skip("sqlite3 command not installed (apt-get install sqlite3)")
    (tmp_path / "backup").mkdir()
    backup = tmp_path / "backup" / "queue.sqlite"
    subprocess.run(
        [sqlite3, str(tmp_path / "state" / "queue.sqlite"), f".backup '{backup}'"],
        check=True,
        timeout=30,
    )
    restored = run("show", ticket, "--state-dir", str(backup.parent))
    assert restored.returncode == 0, restored.stderr
    assert row(restored.stdout, "state", "pending")


def figure(output: str, name: str) -> int:
    """A number from the `queue status` figures table."""
    found = re.search(rf"│\s*{re.escape(name)}\s*│\s*([\d,]+)\s*│", output)
    assert found is not None, output
    return int(found.group(1).replace(",", ""))


def agent_queue_bytes(agent: Daemon) -> int:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        status = rpb_grpc.RouterServiceStub(channel).Status(rpb.StatusRequest(), timeout=5)
    return int(status.queue_bytes)


def test_purge_beside_the_running_agent_keeps_its_figures_true(
    tmp_path: Path, agent: Daemon, proxy: FaultProxy
) -> None:
    """The agent keeps the queue's bytes in memory (its disk cap is checked against them); purge
    deletes from the same file, so after it the agent's figure must still be the file's."""
    state = tmp_path / "state"
    cut_link(agent, proxy)
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
    assert agent_queue_bytes(agent) == accounted > 0

    code, out = queue(state, "purge", "--expired", "--yes")
    assert code == 0, out
    assert "deleted 2 expired item(s)" in out
    assert [ticket_state(agent, t) for t in short] == ["NOT_FOUND", "NOT_FOUND"]
    code, after = queue(state, "status")
    assert figure(after, "accounted bytes (vs queue_cap_bytes)") == accounted
    assert figure(after, "expired since the file was created") == 2
    assert agent_queue_bytes(agent) == accounted

    escalate(agent, 3)  # the agent's accounting carries on from the right figure
    code, later = queue(state, "status")
    grown = figure(later, "accounted bytes (vs queue_cap_bytes)")
    assert grown > accounted
    assert agent_queue_bytes(agent) == grown
