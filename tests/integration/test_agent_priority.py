"""Priority as Triton means it, on a real agent: tritonclient's `priority=` for every level,
0 (which tritonclient leaves out) meaning the default, the `priority` request parameter of
other clients alike; the queue drains the most urgent level first, and a level beyond the
configured ones is refused naming the range."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from model_runtime.demo import HELDOUT
from tests.integration.conftest import collect_stream, start_agent_with_cloud
from tests.integration.gateway.helpers import Gateway
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Daemon, wait_until

pytestmark = pytest.mark.integration

X = np.asarray(np.load(HELDOUT)["X"], dtype=np.float32)
LEVELS = 10


def ticket_of(parameters: object) -> str:
    return str(parameters["ticket"].string_param)  # type: ignore[index]


def with_tritonclient(agent: Daemon, i: int, priority: int) -> str:
    """tritonclient's own way: `priority=`, which it leaves out of the request when 0."""
    inp = triton.InferInput("X", [1, 64], "FP32")
    inp.set_data_from_numpy(X[i : i + 1])
    client = triton.InferenceServerClient(agent.address("grpc"))
    result = client.infer(
        "digits", [inp], parameters={"escalation": "always"}, priority=priority, client_timeout=30
    )
    return ticket_of(result.get_response().parameters)


def with_a_parameter(agent: Daemon, i: int, priority: int) -> pb.ModelInferResponse:
    """Any other v2 client: the request parameter `priority` (tritonclient refuses to set it)."""
    request = pb.ModelInferRequest(
        model_name="digits",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=[1, 64])],
        raw_input_contents=[X[i : i + 1].tobytes()],
    )
    request.parameters["escalation"].string_param = "always"
    request.parameters["priority"].int64_param = priority
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        response: pb.ModelInferResponse = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=30
        )
        return response


def status(agent: Daemon) -> rpb.StatusResponse:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        return rpb_grpc.RouterServiceStub(channel).Status(rpb.StatusRequest(), timeout=5)


def test_every_level_and_the_default_are_kept_and_drained_in_tritons_order(
    gateway: Gateway, proxy: FaultProxy, tmp_path: Path
) -> None:
    # One delivery at a time, so the order the cloud answers in is the order of the queue.
    agent = start_agent_with_cloud(
        tmp_path, gateway, proxy, env={"EDGE_AGENT_DRAIN_CONCURRENCY": "1"}
    )
    try:
        proxy.cut()
        wait_until(lambda: status(agent).link_state == "down", 20, what="the link to go down")
        # the least urgent first, so that enqueue order alone would give the reverse
        levels = [*range(LEVELS, 0, -1), 0]
        tickets = {with_tritonclient(agent, i, p): p for i, p in enumerate(levels)}
        by_parameter = with_a_parameter(agent, 20, 3)
        tickets[ticket_of(by_parameter.parameters)] = 3

        depth = status(agent).queue_depth_by_priority
        expected = {p: 1 for p in range(1, LEVELS + 1)} | {3: 2, 5: 2}  # 0 is the default, 5
        assert dict(depth) == expected

        with grpc.insecure_channel(agent.address("grpc")) as channel:
            stream = rpb_grpc.RouterServiceStub(channel).WatchResults(rpb.WatchResultsRequest())
            delivered = collect_stream(stream)
            proxy.restore()
            order = [delivered.get(timeout=30).ticket for _ in tickets]
            stream.cancel()
        assert [tickets[t] or 5 for t in order] == [1, 2, 3, 3, 4, 5, 5, 6, 7, 8, 9, 10]
    finally:
        agent.stop()


def test_a_level_beyond_the_configured_ones_is_refused_naming_the_range(
    gateway: Gateway, proxy: FaultProxy, tmp_path: Path
) -> None:
    agent = start_agent_with_cloud(
        tmp_path,
        gateway,
        proxy,
        env={"EDGE_AGENT_PRIORITY_LEVELS": "3", "EDGE_AGENT_DEFAULT_PRIORITY": "2"},
    )
    try:
        with pytest.raises(triton.InferenceServerException) as refused:
            with_tritonclient(agent, 0, 4)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "parameters.priority: must be an integer 0..3 (1 most urgent, 3 least; 0 or" in (
            refused.value.message()
        )
        with pytest.raises(grpc.RpcError) as raw:
            with_a_parameter(agent, 0, -1)
        assert raw.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert status(agent).queue_depth_by_priority == {1: 0, 2: 0, 3: 0}  # nothing stored
    finally:
        agent.stop()
