"""Audit sampling end to end: a real edge agent with `audit_share = 1`, a real cloud gateway behind
the fault proxy. Confident requests are answered at the edge as before; the gateway runs the large
model for each of them in the background, and the agent counts agreement per model."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families

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

pytestmark = pytest.mark.integration

X = np.load(HELDOUT)["X"]
THRESHOLD = load_model_config("digits", EDGE_REPOSITORY / "digits" / "config.toml").threshold
_edge = ort.InferenceSession(str(EDGE_REPOSITORY / "digits" / "1" / "model.onnx"))
_cloud = ort.InferenceSession(str(CLOUD_REPOSITORY / "digits-large" / "1" / "model.onnx"))
EDGE_LABELS, EDGE_PROBABILITIES = _edge.run(["label", "probabilities"], {"X": X})
CLOUD_LABELS = _cloud.run(["label"], {"X": X})[0]
CONFIDENT = np.flatnonzero(EDGE_PROBABILITIES.max(axis=1) >= THRESHOLD + 0.05)
UNSURE = np.flatnonzero(EDGE_PROBABILITIES.max(axis=1) < THRESHOLD)


def ask(agent: Daemon, i: int, **parameters: object) -> dict[str, object]:
    inp = triton.InferInput("X", [1, 64], "FP32")
    inp.set_data_from_numpy(X[i : i + 1])
    client = triton.InferenceServerClient(agent.address("grpc"))
    result = client.infer("digits", [inp], parameters=parameters or None, client_timeout=30)
    return {
        k: getattr(v, v.WhichOneof("parameter_choice"))
        for k, v in result.get_response().parameters.items()
    }


def metric(agent: Daemon, name: str, **labels: str) -> float:
    text = httpx.get(f"http://{agent.address('metrics')}/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def link_works(agent: Daemon) -> bool:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        status = rpb_grpc.RouterServiceStub(channel).Status(rpb.StatusRequest(), timeout=5)
    return status.link_state in LINK_WORKS


def audited(agent: Daemon, result: str) -> float:
    return metric(agent, "edge_agent_router_audits_total", model="digits", result=result)


def test_confident_answers_are_audited_in_the_background(
    tmp_path: Path, gateway: Gateway, proxy: FaultProxy
) -> None:
    # Five confident items the cloud agrees with, and the confident ones it does not.
    disagree = [int(i) for i in CONFIDENT if EDGE_LABELS[i] != CLOUD_LABELS[i]]
    agree = [int(i) for i in CONFIDENT if EDGE_LABELS[i] == CLOUD_LABELS[i]][:5]
    assert disagree, "the demo models disagree on some confident items"
    picks = agree + disagree
    agent = start_agent_with_cloud(tmp_path, gateway, proxy, env={"EDGE_AGENT_AUDIT_SHARE": "1"})
    try:
        wait_until(lambda: link_works(agent), what="the link to work")
        runs = model_runs(gateway)
        for i in picks:
            p = ask(agent, i)
            # the caller sees exactly what it saw without audits
            assert (p["route"], p["reason"], p["provisional"]) == ("edge", "confident", False)
            assert "ticket" not in p
        wait_until(
            lambda: audited(agent, "agree") + audited(agent, "disagree") == len(picks),
            timeout=30,
            what="every audit to be compared",
        )
        assert model_runs(gateway) == runs + len(picks)  # the cloud ran each one, once
        assert audited(agent, "agree") == len(agree)
        assert audited(agent, "disagree") == len(disagree)
        samples = "edge_agent_router_audit_samples_total"
        assert metric(agent, samples, model="digits", outcome="queued") == len(picks)
        routes = "edge_agent_router_model_routes_total"
        assert metric(agent, routes, model="digits", route="edge") == len(picks)

        # Unsure items escalate as usual and, hard examples being off by default, leave nothing.
        for i in UNSURE[:2]:
            assert ask(agent, int(i))["route"] == "cloud"
        assert metric(agent, routes, model="digits", route="cloud") == 2
        assert not (tmp_path / "state" / "hard_examples.sqlite").exists()

        # A watcher from the start is told of the app's ticket, never of the audits before it.
        proxy.cut()
        ticket = str(ask(agent, int(UNSURE[2]), escalation="always")["ticket"])
        channel = grpc.insecure_channel(agent.address("grpc"))
        stream = rpb_grpc.RouterServiceStub(channel).WatchResults(
            rpb.WatchResultsRequest(after_cursor=0)
        )
        pushed = collect_stream(stream)
        proxy.restore()
        first = pushed.get(timeout=30)
        stream.cancel()
        channel.close()
        assert first.ticket == ticket
        assert first.cursor > len(picks)  # the audits ended before it, unseen
    finally:
        agent.stop()
