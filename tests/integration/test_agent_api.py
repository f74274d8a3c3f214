"""The edge agent's v2 gRPC API, as a third-party client (tritonclient) sees it."""

from __future__ import annotations

import re

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from model_runtime.demo import EDGE_REPOSITORY, HELDOUT, MODEL_CARD
from tests.support.processes import Daemon

X_ALL = np.load(HELDOUT)["X"]
Y_ALL = np.load(HELDOUT)["y"]


def infer_input(x: np.ndarray) -> triton.InferInput:
    inp = triton.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_server_and_model_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "7")
    assert not client.is_model_ready("no-such-model")
    assert client.get_server_metadata().name == "edge-cloud-router"
    meta = client.get_model_metadata("digits", as_json=True)
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "X", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]


def test_heldout_accuracy_equals_model_card(client: triton.InferenceServerClient) -> None:
    card = MODEL_CARD.read_text()
    row = next(line for line in card.splitlines() if line.startswith("| accuracy"))
    edge_accuracy = float(re.findall(r"\*\*([0-9.]+)\*\*", row)[0])
    # In chunks, as an app would send them; the whole split would also fit in one message.
    labels = [
        client.infer("digits", [infer_input(X_ALL[i : i + 64])]).as_numpy("label")
        for i in range(0, len(X_ALL), 64)
    ]
    accuracy = float((np.concatenate(labels) == Y_ALL).mean())
    assert round(accuracy, 4) == edge_accuracy


def test_predictions_identical_to_running_the_onnx_file(
    client: triton.InferenceServerClient,
) -> None:
    x = X_ALL[:200]
    session = ort.InferenceSession(str(EDGE_REPOSITORY / "digits" / "1" / "model.onnx"))
    label, probabilities = session.run(["label", "probabilities"], {"X": x})
    result = client.infer("digits", [infer_input(x)])
    assert result.as_numpy("label").tobytes() == label.tobytes()
    assert result.as_numpy("probabilities").tobytes() == probabilities.tobytes()


def test_batch_carries_per_item_confidence_on_request(client: triton.InferenceServerClient) -> None:
    x = X_ALL[:8]
    outputs = [
        triton.InferRequestedOutput("probabilities"),
        triton.InferRequestedOutput("routing.confidence"),
    ]
    result = client.infer("digits", [infer_input(x)], outputs=outputs)
    probabilities = result.as_numpy("probabilities")
    per_item = result.as_numpy("routing.confidence")
    assert per_item.shape == (8,)
    np.testing.assert_allclose(per_item, probabilities.max(axis=1), rtol=1e-6)
    params = result.get_response().parameters
    assert params["route"].string_param == "edge"
    assert params["confidence"].double_param == pytest.approx(float(per_item.min()), rel=1e-6)


def test_plain_client_gets_exactly_the_outputs_it_asks_for(
    client: triton.InferenceServerClient,
) -> None:
    x = X_ALL[:3]
    only_label = client.infer(
        "digits", [infer_input(x)], outputs=[triton.InferRequestedOutput("label")]
    )
    assert [o.name for o in only_label.get_response().outputs] == ["label"]
    everything = client.infer("digits", [infer_input(x)])
    assert [o.name for o in everything.get_response().outputs] == ["label", "probabilities"]


def test_standard_health_service(agent: Daemon) -> None:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_server_reflection_lists_services(agent: Daemon) -> None:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services


def test_metrics_served_on_their_own_port(
    agent: Daemon, client: triton.InferenceServerClient
) -> None:
    client.infer("digits", [infer_input(X_ALL[:2])])
    text = httpx.get(f"http://{agent.address('metrics')}/metrics").text
    assert re.search(
        r'edge_agent_requests_total\{code="OK",method="ModelInfer",model="digits"\} [1-9]', text
    )
    assert 'edge_agent_model_info{method="max_probability",model="digits",version="1"} 1.0' in text
    assert "edge_agent_inference_duration_seconds_bucket" in text
    assert "edge_agent_request_duration_seconds_bucket" in text
    assert 'edge_agent_confidence_bucket{le="1.0",model="digits"}' in text
    assert "edge_agent_requests_in_flight 0.0" in text
