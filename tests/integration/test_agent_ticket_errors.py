"""GetResult.error says why a ticket ended without the cloud's answer, on a real agent: expired
(its TTL, and what its attempts met), dropped (the full policy and the cap), rejected (the
cloud's status and message)."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
from onnx import TensorProto, helper, numpy_helper

from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from model_runtime.demo import EDGE_REPOSITORY, HELDOUT
from tests.integration.conftest import start_agent_with_cloud
from tests.integration.gateway.helpers import Gateway
from tests.integration.router.test_router_limits import need
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Daemon, wait_until

pytestmark = pytest.mark.integration

X = np.asarray(np.load(HELDOUT)["X"], dtype=np.float32)
CONFIG = """labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
output = "probabilities"
threshold = 0.99
cloud_model = "digits-large"
"""


def repository(root: Path) -> Path:
    """The demo's digits, and `narrow`: a model whose input the cloud model cannot take (32
    values where digits-large wants 64), so the cloud refuses its requests for good."""
    shutil.copytree(EDGE_REPOSITORY / "digits", root / "digits")
    weights = numpy_helper.from_array(np.full((32, 10), 0.01, dtype=np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["scores"]),
            helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
        ],
        "narrow",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [weights],
    )
    (root / "narrow" / "1").mkdir(parents=True)
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        root / "narrow" / "1" / "model.onnx",
    )
    (root / "narrow" / "config.toml").write_text(CONFIG, encoding="utf-8")
    return root


def ask(agent: Daemon, model: str, x: np.ndarray, priority: int = 0, **parameters: object) -> str:
    inp = triton.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = triton.InferenceServerClient(agent.address("grpc")).infer(
        model,
        [inp],
        parameters={"escalation": "always", **parameters},
        priority=priority,
        client_timeout=30,
    )
    return str(result.get_response().parameters["ticket"].string_param)


def result(agent: Daemon, ticket: str) -> rpb.TicketResult:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        stub = rpb_grpc.RouterServiceStub(channel)
        found: rpb.TicketResult = stub.GetResult(rpb.GetResultRequest(ticket=ticket), timeout=5)
        return found


def ended(agent: Daemon, ticket: str, state: int) -> rpb.TicketResult:
    wait_until(lambda: result(agent, ticket).state == state, 30, what=f"{ticket} to end")
    return result(agent, ticket)


def test_get_result_says_why_for_expired_dropped_and_rejected(
    gateway: Gateway, proxy: FaultProxy, tmp_path: Path
) -> None:
    one = need(X[0])
    agent = start_agent_with_cloud(
        tmp_path,
        gateway,
        proxy,
        "--model-repository",
        str(repository(tmp_path / "models")),
        env={
            "EDGE_AGENT_QUEUE_CAP_BYTES": str(2 * one + one // 2),
            "EDGE_AGENT_QUEUE_FULL_POLICY": "drop_oldest_lowest",
        },
    )
    try:
        proxy.cut()
        expired = ended(agent, ask(agent, "digits", X[:1], ttl_seconds=1), rpb.TicketResult.EXPIRED)
        assert expired.error.startswith("expired: its ttl of 1 s passed before it could be")

        low = ask(agent, "digits", X[1:2], priority=10)
        urgent = [ask(agent, "digits", X[i : i + 1], priority=1) for i in (2, 3)]
        dropped = ended(agent, low, rpb.TicketResult.DROPPED)
        assert dropped.error == (
            "dropped by the full-queue policy (drop_oldest_lowest): the queue was at its cap of"
            f" {2 * one + one // 2} bytes when an item of priority 1 came"
        )

        proxy.restore()
        for ticket in urgent:
            delivered = ended(agent, ticket, rpb.TicketResult.DELIVERED)
            assert delivered.error == ""  # only ends without an answer explain themselves

        refused = ended(agent, ask(agent, "narrow", X[:1, :32]), rpb.TicketResult.REJECTED)
        assert refused.error.startswith("rejected by the cloud: cloud answered 400: X:")
        assert "[1, 32]" in refused.error
    finally:
        agent.stop()
