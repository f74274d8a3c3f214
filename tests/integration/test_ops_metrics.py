"""Both daemons' /metrics pass `promtool check metrics` after real traffic (every labelled
child that traffic creates included), and the agent names its site and device in its metrics
and in every JSON log line."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families

from edge_agent import __version__
from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from model_runtime.demo import HELDOUT
from tests.integration.conftest import LINK_WORKS, start_agent_with_cloud
from tests.integration.gateway.helpers import Gateway, infer_body
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Daemon, wait_until

pytestmark = pytest.mark.integration

X = np.load(HELDOUT)["X"]
SITE = {"EDGE_AGENT_SITE": "clinic-ops", "EDGE_AGENT_DEVICE": "kiosk-9"}


@pytest.fixture
def agent(tmp_path: Path, gateway: Gateway, proxy: FaultProxy) -> Iterator[Daemon]:
    daemon = start_agent_with_cloud(tmp_path, gateway, proxy, env={**SITE, "PYTHONUNBUFFERED": "1"})
    yield daemon
    daemon.stop()


def link_state(agent: Daemon) -> str:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        status = rpb_grpc.RouterServiceStub(channel).Status(rpb.StatusRequest(), timeout=5)
    return str(status.link_state)


def queue_depth(agent: Daemon) -> int:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        status = rpb_grpc.RouterServiceStub(channel).Status(rpb.StatusRequest(), timeout=5)
    return sum(status.queue_depth_by_priority.values())


def infer(agent: Daemon, rows: slice, **parameters: object) -> triton.InferResult:
    x = X[rows]
    inp = triton.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    client = triton.InferenceServerClient(agent.address("grpc"))
    return client.infer("digits", [inp], parameters=parameters or None, client_timeout=30)


def drive_traffic(agent: Daemon, gateway: Gateway, proxy: FaultProxy) -> None:
    """What a day at a site brings: answers at the edge, live escalations, an outage that
    queues, its drain, a bad request, and a device with a wrong key at the gateway."""
    wait_until(lambda: link_state(agent) in LINK_WORKS, timeout=20, what="the link to work")
    infer(agent, slice(0, 8))
    infer(agent, slice(8, 10), escalation="always")
    bad = triton.InferInput("X", [1, 60], "FP32")
    bad.set_data_from_numpy(X[:1, :60])
    client = triton.InferenceServerClient(agent.address("grpc"))
    with pytest.raises(triton.InferenceServerException, match="shape"):
        client.infer("digits", [bad])
    proxy.cut()
    wait_until(lambda: link_state(agent) == "down", timeout=20, what="the link to go down")
    infer(agent, slice(10, 13), escalation="always")
    proxy.restore()
    wait_until(lambda: queue_depth(agent) == 0, timeout=30, what="the queue to drain")
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        refused = client.post(
            "/v2/models/digits-large/infer",
            content=infer_body(X[:1]),
            headers={"Authorization": "Bearer cgk_0000000000000000.wrong"},
        )
    assert refused.status_code == 401


def scrape(address: str) -> str:
    response = httpx.get(f"http://{address}/metrics", timeout=10)
    response.raise_for_status()
    return response.text


def samples(text: str, name: str) -> list[dict[str, str]]:
    return [
        sample.labels
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def test_both_scrapes_pass_promtool_check_metrics(
    agent: Daemon, gateway: Gateway, proxy: FaultProxy
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus); CI installs it")
    drive_traffic(agent, gateway, proxy)
    agent_text = scrape(agent.address("metrics"))
    gateway_text = scrape(gateway.daemon.address("metrics"))
    # the traffic made the labelled children appear, so promtool sees them too
    assert samples(agent_text, "edge_agent_router_routes_total")
    assert samples(agent_text, "edge_agent_router_cloud_calls_total")
    assert samples(agent_text, "edge_agent_invalid_requests_total")
    assert samples(gateway_text, "cloud_gateway_auth_failures_total")
    assert samples(gateway_text, "cloud_gateway_model_runs_total")
    for daemon, text in (("edge-agent", agent_text), ("cloud-gateway", gateway_text)):
        result = subprocess.run(
            [promtool, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        complaints = (result.stdout + result.stderr).strip()
        assert (result.returncode, complaints) == (0, ""), f"{daemon}:\n{complaints}"


def test_agent_names_its_site_in_metrics_and_logs(agent: Daemon) -> None:
    text = scrape(agent.address("metrics"))
    assert samples(text, "edge_agent_info") == [
        {"site": "clinic-ops", "device": "kiosk-9", "version": __version__}
    ]
    infer(agent, slice(0, 1))
    agent.stop()
    lines = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
    assert {line["msg"] for line in lines} >= {"serving", "stopping", "stopped"}
    for line in lines:
        assert (line["site"], line["device"]) == ("clinic-ops", "kiosk-9"), line
