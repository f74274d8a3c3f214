"""Hard examples end to end: a real edge agent with hard examples on and a real cloud gateway behind
the fault proxy. Live escalations and queued ones delivered after an outage are kept with the
cloud's answers, and `export-hard-examples` writes them out while the agent runs."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from edge_agent.export_cli import export_hard_examples_command
from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from tests.integration.conftest import start_agent_with_cloud
from tests.integration.gateway.helpers import Gateway
from tests.integration.test_audit_agent import CLOUD_LABELS, UNSURE, X, ask, link_works, metric
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration


def delivered(address: str, ticket: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        result = rpb_grpc.RouterServiceStub(channel).GetResult(
            rpb.GetResultRequest(ticket=ticket), timeout=5
        )
    return bool(result.state == rpb.TicketResult.DELIVERED)


def test_escalated_inputs_are_kept_with_the_clouds_answers_and_exported(
    tmp_path: Path, gateway: Gateway, proxy: FaultProxy
) -> None:
    env = {"EDGE_AGENT_HARD_EXAMPLES_RETENTION_DAYS": "7"}
    agent = start_agent_with_cloud(tmp_path, gateway, proxy, env=env)
    state = tmp_path / "state"
    live, later = [int(i) for i in UNSURE[:3]], [int(i) for i in UNSURE[3:5]]
    try:
        wait_until(lambda: link_works(agent), what="the link to work")
        for i in live:
            assert ask(agent, i)["route"] == "cloud"
        proxy.cut()
        tickets = []
        for i in later:
            p = ask(agent, i, escalation="always")
            assert p["route"] == "queue"
            tickets.append(str(p["ticket"]))
        proxy.restore()
        wait_until(
            lambda: all(delivered(agent.address("grpc"), t) for t in tickets),
            timeout=30,
            what="the queued items to be delivered",
        )
        stored = "edge_agent_router_hard_examples_total"
        wait_until(
            lambda: metric(agent, stored, model="digits", outcome="stored") == 5,
            what="five hard examples to be kept",
        )

        # Exported while the agent runs: an operator does not have to stop a clinic's device.
        out = tmp_path / "hard.npz"
        app = typer.Typer()
        app.command()(export_hard_examples_command)
        result = CliRunner().invoke(app, ["--out", str(out), "--state-dir", str(state)])
        assert result.exit_code == 0, result.output
        with np.load(out) as data:
            np.testing.assert_array_equal(data["X"], X[live + later])
            np.testing.assert_array_equal(data["cloud_pred"], CLOUD_LABELS[live + later])
            assert data["source"].tolist() == ["live"] * 3 + ["queued"] * 2
            assert data["cloud_scores"].shape == (5, 10)
            assert str(data["cloud_model"]) == "digits-large"
    finally:
        assert agent.stop() == 0
    assert (state / "hard_examples.sqlite").exists()  # kept across restarts, for 7 days
