"""The agent's v2 REST API, as a third-party client (tritonclient.http) and a plain HTTP client
see it: the same service, the same answers and routing facts as over gRPC."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from model_runtime.demo import EDGE_REPOSITORY, HELDOUT, MODEL_CARD
from tests.integration.conftest import agent_metric
from tests.integration.rest.helpers import X, body
from tests.support.processes import Daemon

Y = np.load(HELDOUT)["y"]


@pytest.fixture(scope="module")
def client(agent: Daemon) -> Iterator[triton_http.InferenceServerClient]:
    c = triton_http.InferenceServerClient(agent.address("rest"))
    yield c
    c.close()


def infer_input(x: np.ndarray) -> triton_http.InferInput:
    inp = triton_http.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)  # v2 JSON; the binary extension is refused
    return inp


def test_server_and_model_metadata(client: triton_http.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "7")
    assert not client.is_model_ready("no-such-model")
    assert client.get_server_metadata()["name"] == "edge-cloud-router"
    meta = client.get_model_metadata("digits")
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]


def test_heldout_accuracy_equals_model_card(client: triton_http.InferenceServerClient) -> None:
    card = MODEL_CARD.read_text()
    row = next(line for line in card.splitlines() if line.startswith("| accuracy"))
    edge_accuracy = float(re.findall(r"\*\*([0-9.]+)\*\*", row)[0])
    labels = [
        client.infer("digits", [infer_input(X[i : i + 64])]).as_numpy("label")
        for i in range(0, len(X), 64)
    ]
    assert round(float((np.concatenate(labels) == Y).mean()), 4) == edge_accuracy


def test_predictions_identical_to_running_the_onnx_file(
    client: triton_http.InferenceServerClient,
) -> None:
    x = X[:200]
    session = ort.InferenceSession(str(EDGE_REPOSITORY / "digits" / "1" / "model.onnx"))
    label, probabilities = session.run(["label", "probabilities"], {"X": x})
    result = client.infer("digits", [infer_input(x)])
    # JSON carries each float32 as its shortest round-tripping text: exact, not approximate.
    assert result.as_numpy("label").tobytes() == label.tobytes()
    assert result.as_numpy("probabilities").astype(np.float32).tobytes() == probabilities.tobytes()


def test_rest_and_grpc_give_the_same_answer_and_facts(
    agent: Daemon, client: triton_http.InferenceServerClient
) -> None:
    x = X[:8]
    names = ["label", "routing.confidence", "routing.route", "routing.reason"]
    over_rest = client.infer(
        "digits",
        [infer_input(x)],
        outputs=[triton_http.InferRequestedOutput(n, binary_data=False) for n in names],
        parameters={"escalation": "never"},
    )
    grpc_input = triton_grpc.InferInput("X", list(x.shape), "FP32")
    grpc_input.set_data_from_numpy(x)
    over_grpc = triton_grpc.InferenceServerClient(agent.address("grpc")).infer(
        "digits",
        [grpc_input],
        outputs=[triton_grpc.InferRequestedOutput(n) for n in names],
        parameters={"escalation": "never"},
    )
    for name in names:
        from_grpc = over_grpc.as_numpy(name)
        if from_grpc.dtype == object:  # BYTES: bytes over gRPC's raw contents, text in JSON
            from_grpc = np.array([b.decode() for b in from_grpc], dtype=object)
        np.testing.assert_array_equal(over_rest.as_numpy(name), from_grpc)
    grpc_facts = {
        k: getattr(v, v.WhichOneof("parameter_choice"))
        for k, v in over_grpc.get_response().parameters.items()
    }
    assert over_rest.get_response()["parameters"] == pytest.approx(grpc_facts)
    assert grpc_facts["reason"] == "escalation_never"


def test_batch_carries_per_item_facts_on_request(rest: httpx.Client) -> None:
    outputs = [{"name": "probabilities"}, {"name": "routing.confidence"}]
    answer = rest.post(
        "/v2/models/digits/infer", json=body(X[:8], id="kiosk-3/17", outputs=outputs)
    ).json()
    tensors = {o["name"]: o for o in answer["outputs"]}
    assert list(tensors) == ["probabilities", "routing.confidence"]
    assert tensors["routing.confidence"] == {
        "name": "routing.confidence",
        "datatype": "FP32",
        "shape": [8],
        "data": pytest.approx(np.reshape(tensors["probabilities"]["data"], (8, 10)).max(axis=1)),
    }
    assert answer["id"] == "kiosk-3/17"
    facts = answer["parameters"]
    assert (facts["route"], facts["provisional"]) == ("edge", False)
    assert facts["confidence"] == pytest.approx(min(tensors["routing.confidence"]["data"]))


def test_plain_client_gets_exactly_the_outputs_it_asks_for(rest: httpx.Client) -> None:
    only_label = rest.post("/v2/models/digits/infer", json=body(X[:3], outputs=[{"name": "label"}]))
    assert [o["name"] for o in only_label.json()["outputs"]] == ["label"]
    everything = rest.post("/v2/models/digits/infer", json=body(X[:3]))
    assert [o["name"] for o in everything.json()["outputs"]] == ["label", "probabilities"]
    assert "id" not in everything.json()  # echoed only when the request had one


def test_unknown_paths_and_methods_get_v2_error_bodies(rest: httpx.Client) -> None:
    missing = rest.get("/v2/no/such/thing")
    assert (missing.status_code, missing.json()) == (404, {"error": "Not Found"})
    wrong = rest.get("/v2/models/digits/infer")
    assert (wrong.status_code, wrong.json()) == (405, {"error": "Method Not Allowed"})


def test_the_kiosk_page_is_served(rest: httpx.Client) -> None:
    root = rest.get("/")
    assert (root.status_code, root.headers["location"]) == (307, "/kiosk/")
    page = rest.get("/kiosk/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script src="kiosk.js">' in page.text
    assert rest.get("/kiosk/kiosk.js").status_code == 200


def test_rest_calls_are_counted_beside_grpc(agent: Daemon, rest: httpx.Client) -> None:
    labels = {"endpoint": "infer", "model": "digits", "code": "200"}
    before = agent_metric(agent, "edge_agent_http_requests_total", **labels)
    latencies = agent_metric(agent, "edge_agent_request_duration_seconds_count", model="digits")
    rest.post("/v2/models/digits/infer", json=body(X[:2]))
    assert agent_metric(agent, "edge_agent_http_requests_total", **labels) == before + 1
    assert agent_metric(agent, "edge_agent_request_duration_seconds_count", model="digits") == (
        latencies + 1
    )
    assert agent_metric(agent, "edge_agent_requests_in_flight") == 0
