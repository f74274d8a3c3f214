"""The data budget on a real agent behind the counting proxy: what Status reports as used is what
crossed the link, probes included, to the byte; the limit is never passed; the byte metrics
count the same bytes; and the agent says when probing slows or stops for the budget."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from model_runtime.demo import HELDOUT
from tests.integration.conftest import agent_metric, start_agent_with_cloud
from tests.integration.gateway.helpers import Gateway
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Daemon, wait_until

pytestmark = pytest.mark.integration

X = np.asarray(np.load(HELDOUT)["X"], dtype=np.float32)
LIMIT = 6_000


def day_budget(agent: Daemon) -> rpb.Budget:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        status = rpb_grpc.RouterServiceStub(channel).Status(rpb.StatusRequest(), timeout=5)
    return status.day_budget


def test_status_budget_is_the_bytes_the_link_carried_and_never_passes_the_limit(
    gateway: Gateway, proxy: FaultProxy, tmp_path: Path
) -> None:
    agent = start_agent_with_cloud(
        tmp_path, gateway, proxy, env={"EDGE_AGENT_BUDGET_DAY_BYTES": str(LIMIT)}
    )
    try:
        client = triton.InferenceServerClient(agent.address("grpc"))
        reasons = []
        for i in range(10):  # more than the day's budget can carry
            inp = triton.InferInput("X", [1, 64], "FP32")
            inp.set_data_from_numpy(X[i : i + 1])
            result = client.infer(
                "digits", [inp], parameters={"escalation": "always"}, client_timeout=30
            )
            reasons.append(result.get_response().parameters["reason"].string_param)
        assert "escalation_always" in reasons  # some went to the cloud...
        assert "budget_exhausted" in reasons  # ... until the budget said no, and they wait

        def on_the_wire() -> int:
            return proxy.bytes_to_target + proxy.bytes_to_client

        wait_until(
            lambda: day_budget(agent).used_bytes == on_the_wire(),
            timeout=30,
            what="the budget to count what crossed the proxy",
        )
        budget = day_budget(agent)
        assert 0 < budget.used_bytes <= LIMIT
        assert budget.left_bytes == LIMIT - budget.used_bytes
        counted = sum(
            agent_metric(agent, f"edge_agent_router_cloud_{way}_bytes_total", path=path)
            for way in ("sent", "received")
            for path in ("live", "drain", "probe")
        )
        assert counted == budget.used_bytes
        assert agent_metric(agent, "edge_agent_router_cloud_sent_bytes_total", path="probe") > 0
        wait_until(lambda: "link probes" in agent.log(), 10, what="the agent to say probes slowed")
    finally:
        agent.stop()
