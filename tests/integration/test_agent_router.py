"""The edge agent with a real cloud gateway behind a fault-injecting proxy: what an app sees.

Escalation follows confidence and the link: unsure items get the cloud's answer while the link
is up, are queued with a ticket while it is down, and the ticket resolves when it comes back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton

from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from model_runtime.demo import CLOUD_REPOSITORY, EDGE_REPOSITORY, HELDOUT
from model_runtime.model_config import load_model_config
from tests.integration.conftest import (
    LINK_WORKS,
    collect_stream,
    model_runs,
    start_agent_with_cloud,
)
from tests.integration.gateway.helpers import Gateway
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Daemon, wait_until

X = np.load(HELDOUT)["X"]
THRESHOLD = load_model_config("digits", EDGE_REPOSITORY / "digits" / "config.toml").threshold
_edge = ort.InferenceSession(str(EDGE_REPOSITORY / "digits" / "1" / "model.onnx"))
_cloud = ort.InferenceSession(str(CLOUD_REPOSITORY / "digits-large" / "1" / "model.onnx"))
CONFIDENCE = _edge.run(["probabilities"], {"X": X})[0].max(axis=1)
CLOUD_LABELS = _cloud.run(["label"], {"X": X})[0]
UNSURE = np.flatnonzero(CONFIDENCE < THRESHOLD)
CONFIDENT = np.flatnonzero(CONFIDENCE >= THRESHOLD + 0.05)


@pytest.fixture
def agent(tmp_path: Path, gateway: Gateway, proxy: FaultProxy) -> Iterator[Daemon]:
    daemon = start_agent_with_cloud(tmp_path, gateway, proxy)
    yield daemon
    daemon.stop()


def status(agent: Daemon) -> rpb.StatusResponse:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        return rpb_grpc.RouterServiceStub(channel).Status(rpb.StatusRequest(), timeout=5)


def ask(
    agent: Daemon, i: int, priority: int = 0, timeout_s: float = 30, **parameters: object
) -> triton.InferResult:
    inp = triton.InferInput("X", [1, 64], "FP32")
    inp.set_data_from_numpy(X[i : i + 1])
    client = triton.InferenceServerClient(agent.address("grpc"))
    # tritonclient sends `priority` as the request parameter of that name, as Triton does.
    return client.infer(
        "digits", [inp], parameters=parameters or None, priority=priority, client_timeout=timeout_s
    )


def params(result: triton.InferResult) -> dict[str, object]:
    return {
        k: getattr(v, v.WhichOneof("parameter_choice"))
        for k, v in result.get_response().parameters.items()
    }


def test_link_up_unsure_items_get_the_clouds_answer_confident_ones_stay(
    agent: Daemon, gateway: Gateway
) -> None:
    wait_until(lambda: status(agent).link_state in LINK_WORKS, what="the link to work")
    runs = model_runs(gateway)
    for i in CONFIDENT[:5]:
        p = params(ask(agent, int(i)))
        assert (p["route"], p["reason"], p["provisional"]) == ("edge", "confident", False)
    assert model_runs(gateway) == runs  # confident items never reach the cloud

    for i in UNSURE[:5]:
        result = ask(agent, int(i))
        p = params(result)
        assert (p["route"], p["reason"], p["provisional"]) == ("cloud", "unsure", False)
        assert result.as_numpy("label")[0] == CLOUD_LABELS[i]
    assert model_runs(gateway) == runs + 5


def test_link_down_gives_a_provisional_answer_and_a_ticket_that_resolves(
    agent: Daemon, proxy: FaultProxy
) -> None:
    wait_until(lambda: status(agent).link_state in LINK_WORKS, what="the link to work")
    proxy.cut()
    i = int(UNSURE[0])
    result = ask(agent, i, escalation="always")
    p = params(result)
    # the caller may not wait on a dead link: the local answer now, marked, with a ticket
    assert p["route"] == "queue"
    assert p["provisional"] is True
    ticket = str(p["ticket"])

    channel = grpc.insecure_channel(agent.address("grpc"))
    stub = rpb_grpc.RouterServiceStub(channel)
    assert (
        stub.GetResult(rpb.GetResultRequest(ticket=ticket), timeout=5).state
        == rpb.TicketResult.PENDING
    )
    stream = stub.WatchResults(rpb.WatchResultsRequest(tickets=[ticket]))
    pushed = collect_stream(stream)

    proxy.restore()
    delivered = pushed.get(timeout=30)
    stream.cancel()
    assert delivered.ticket == ticket
    assert delivered.state == rpb.TicketResult.DELIVERED
    label = next(t for t in delivered.outputs if t.name == "label")
    assert np.frombuffer(label.raw_contents, dtype=np.int64)[0] == CLOUD_LABELS[i]
    final = stub.GetResult(rpb.GetResultRequest(ticket=ticket), timeout=5)
    assert final.state == rpb.TicketResult.DELIVERED
    assert final.cursor == delivered.cursor > 0
    channel.close()


def test_a_black_holed_cloud_never_holds_up_a_local_answer(
    tmp_path: Path, gateway: Gateway, proxy: FaultProxy
) -> None:
    # A live escalation may wait 60 s here: an answer held up by the cloud could not come back
    # within 20 s, while a local one comes in milliseconds however busy the machine is.
    agent = start_agent_with_cloud(
        tmp_path, gateway, proxy, env={"EDGE_AGENT_LIVE_TIMEOUT_SECONDS": "60"}
    )
    try:
        proxy.black_hole()
        wait_until(
            lambda: status(agent).link_state == "down",
            timeout=30,
            what="the monitor to see the link down",
        )
        for i in [*UNSURE[:10], *CONFIDENT[:10]]:
            started = time.monotonic()
            p = params(ask(agent, int(i), timeout_s=120))
            elapsed = time.monotonic() - started
            assert p["route"] in ("edge", "queue")
            assert elapsed < 20, f"item {i} took {elapsed:.3f}s with the cloud black-holed"
    finally:
        agent.stop()


def test_status_reports_link_queue_and_budget(agent: Daemon, proxy: FaultProxy) -> None:
    proxy.cut()
    wait_until(lambda: status(agent).link_state == "down", timeout=30, what="the link to go down")
    for i in UNSURE[:3]:
        ask(agent, int(i), escalation="always", priority=7)
    s = status(agent)
    assert s.cloud_configured
    assert s.queue_depth_by_priority[7] == 3
    assert s.queue_bytes > 0
    assert s.oldest_item_age_seconds >= 0


def test_unknown_ticket_is_not_found(agent: Daemon) -> None:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        stub = rpb_grpc.RouterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetResult(rpb.GetResultRequest(ticket="no-such-ticket"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
