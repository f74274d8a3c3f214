"""The v2 REST JSON codec: round trips exactly, and names the field of every malformed body."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from model_runtime import InvalidInput, ModelRepository, OnnxModel, TensorSpec, json_codec
from model_runtime.demo import CLOUD_REPOSITORY, HELDOUT
from model_runtime.v2_json import (
    decode_infer_request,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
    error_body,
    model_metadata,
    read_infer_request,
)


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    return ModelRepository.load(CLOUD_REPOSITORY).get("digits-large")


@pytest.fixture(scope="module")
def heldout() -> np.ndarray:
    return np.load(HELDOUT)["X"][:5]


def wire(body: dict[str, Any]) -> Any:
    """What the other side parses: the body through real JSON text."""
    return json.loads(json.dumps(body))


def x_tensor(**overrides: Any) -> dict[str, Any]:
    tensor: dict[str, Any] = {
        "name": "X",
        "datatype": "FP32",
        "shape": [1, 64],
        "data": [0.5] * 64,
    }
    tensor.update(overrides)
    return tensor


def test_request_round_trip_is_exact(model: OnnxModel, heldout: np.ndarray) -> None:
    body = encode_infer_request(
        {"X": heldout},
        request_id="req-1",
        parameters={"priority": 2, "escalation": "auto", "urgent": True},
        outputs=["probabilities"],
    )
    decoded = decode_infer_request(wire(body), model)
    assert decoded.id == "req-1"
    assert decoded.parameters == {"priority": 2, "escalation": "auto", "urgent": True}
    assert decoded.outputs == ("probabilities",)
    assert decoded.inputs["X"].dtype == np.float32
    np.testing.assert_array_equal(decoded.inputs["X"], heldout)


def test_float32_is_sent_in_its_shortest_exact_form() -> None:
    values = np.array([0.1, 1 / 3, 1e-8, 123456.78, -2.5], dtype=np.float32)
    body = encode_infer_request({"x": values})
    text = json.dumps(body)
    assert "0.1," in text
    assert "0.10000000149" not in text
    back = decode_infer_response(wire({"model_name": "m", "outputs": body["inputs"]})).outputs["x"]
    np.testing.assert_array_equal(back.astype(np.float32), values)


def test_float32_text_is_numpys_shortest_form_for_every_kind_of_value() -> None:
    # Random values of every magnitude, plus the edges: the smallest subnormal, the largest
    # float32, the smallest normal, negative zero. The fast path must write what str() writes.
    rng = np.random.default_rng(7)
    values = np.concatenate(
        [
            (rng.standard_normal(2000) * 10.0 ** rng.integers(-40, 37, 2000)).astype(np.float32),
            np.array([1e-45, 3.4028235e38, 1.17549435e-38, -0.0, 0.0], dtype=np.float32),
        ]
    )
    assert np.isfinite(values).all()  # else neither path is the fast one
    data = encode_infer_request({"x": values})["inputs"][0]["data"]
    assert json.dumps(data) == json.dumps([float(s) for s in values.astype(str)])


def test_non_finite_float32_cannot_be_sent() -> None:
    body = encode_infer_request({"x": np.array([1.0, np.nan], dtype=np.float32)})
    with pytest.raises(ValueError, match="JSON"):
        json_codec.dumps(body)


@pytest.mark.parametrize(
    ("array", "datatype"),
    [
        (np.array([[1, 2], [3, 4]], dtype=np.int64), "INT64"),
        (np.array([1, 255], dtype=np.uint8), "UINT8"),
        (np.array([True, False]), "BOOL"),
        (np.array([0.5, -1e300], dtype=np.float64), "FP64"),
        (np.array([0.5, 2.0], dtype=np.float16), "FP16"),
    ],
)
def test_response_round_trip_keeps_datatype_and_shape(array: np.ndarray, datatype: str) -> None:
    body = encode_infer_response(
        "m", {"y": array}, model_version="3", request_id="r", parameters={"route": "cloud"}
    )
    assert body["outputs"][0]["datatype"] == datatype
    decoded = decode_infer_response(wire(body))
    assert (decoded.model_name, decoded.model_version, decoded.id) == ("m", "3", "r")
    assert decoded.parameters == {"route": "cloud"}
    assert decoded.outputs["y"].dtype == array.dtype
    np.testing.assert_array_equal(decoded.outputs["y"], array)


def test_nested_data_is_accepted(model: OnnxModel) -> None:
    nested = [[float(i) / 64 for i in range(64)]]
    decoded = decode_infer_request({"inputs": [x_tensor(data=nested)]}, model)
    assert decoded.inputs["X"].shape == (1, 64)


def test_without_a_signature_only_the_form_is_checked() -> None:
    decoded = decode_infer_request(
        {"inputs": [{"name": "anything", "datatype": "INT32", "shape": [2], "data": [1, 2]}]}
    )
    assert decoded.inputs["anything"].tolist() == [1, 2]
    with pytest.raises(InvalidInput) as err:
        decode_infer_request({"inputs": [x_tensor(shape=[0, 64], data=[])]})
    assert err.value.field == "X"


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ([1, 2], "body", "JSON object"),
        ({}, "inputs", "JSON array"),
        ({"inputs": []}, "inputs", "empty"),
        ({"inputs": [7]}, "inputs[0]", "JSON object"),
        ({"inputs": [{"datatype": "FP32"}]}, "inputs[0].name", "string"),
        ({"inputs": [x_tensor(name="Y")]}, "Y", "not an input"),
        ({"inputs": [x_tensor(), x_tensor()]}, "X", "twice"),
        ({"inputs": [x_tensor(datatype="FP64")]}, "X", "expected FP32"),
        ({"inputs": [x_tensor(shape=[1, 63])]}, "X", "dimension 1 must be 64"),
        ({"inputs": [x_tensor(shape=[1, True])]}, "X", "integers"),
        ({"inputs": [x_tensor(shape="1,64")]}, "X.shape", "JSON array"),
        ({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64]}]}, "X.data", "missing"),
        ({"inputs": [x_tensor(data={"a": 1})]}, "X.data", "JSON array"),
        ({"inputs": [x_tensor(data=[0.5] * 63)]}, "X", "63 values"),
        ({"inputs": [x_tensor(data=["a"] * 64)]}, "X", "not FP32"),
        # numpy alone would read these as 0.5 and 1.0 (issue 12)
        ({"inputs": [x_tensor(data=["0.5"] + [0.5] * 63)]}, "X", "found a string"),
        ({"inputs": [x_tensor(data=[True] + [0.5] * 63)]}, "X", "found a boolean"),
        ({"inputs": [x_tensor(data=[[0.5] * 63 + [True]])]}, "X", "found a boolean"),
        ({"inputs": [x_tensor(data=[float("nan")] + [0.0] * 63)]}, "X", "finite"),
        ({"inputs": [x_tensor(datatype="BF16")]}, "X", "expected FP32"),
        ({"id": 5, "inputs": [x_tensor()]}, "id", "string"),
        ({"parameters": [], "inputs": [x_tensor()]}, "parameters", "JSON object"),
        ({"parameters": {"p": {"a": 1}}, "inputs": [x_tensor()]}, "parameters.p", "string"),
        ({"inputs": [x_tensor()], "outputs": [{"name": "logits"}]}, "outputs[0]", "not an output"),
        ({"inputs": [x_tensor()], "outputs": [{}]}, "outputs[0].name", "string"),
        # Found by the gateway's schema fuzzing (issue 13): these were accepted as if absent,
        # or with their parameters unread.
        ({"id": None, "inputs": [x_tensor()]}, "id", "null"),
        ({"parameters": None, "inputs": [x_tensor()]}, "parameters", "null"),
        ({"inputs": [x_tensor()], "outputs": None}, "outputs", "null"),
        ({"inputs": [{**x_tensor(), "parameters": {"p": []}}]}, "X.parameters.p", "string"),
        ({"inputs": [{**x_tensor(), "parameters": None}]}, "X.parameters", "null"),
        (
            {"inputs": [x_tensor()], "outputs": [{"name": "label", "parameters": {"q": None}}]},
            "outputs[0].parameters.q",
            "string",
        ),
    ],
)
def test_malformed_requests_name_the_field(
    model: OnnxModel, body: Any, field: str, words: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        decode_infer_request(wire(body), model)
    assert err.value.field == field
    assert words in err.value.problem


def test_integer_and_bool_tensors_take_only_their_own_json_values() -> None:
    def tensor(datatype: str, data: list[Any]) -> Any:
        return {"inputs": [{"name": "t", "datatype": datatype, "shape": [len(data)], "data": data}]}

    assert decode_infer_request(wire(tensor("INT32", [1, 2]))).inputs["t"].tolist() == [1, 2]
    assert decode_infer_request(wire(tensor("BOOL", [True]))).inputs["t"].tolist() == [True]
    for datatype, data, found in [("INT32", [1.5], "a fraction"), ("BOOL", [1], "an integer")]:
        with pytest.raises(InvalidInput) as err:
            decode_infer_request(wire(tensor(datatype, data)))
        assert found in err.value.problem


def test_a_declared_input_missing_from_the_request_is_named() -> None:
    class TwoInputs:
        inputs = (TensorSpec("a", "FP32", (-1,)), TensorSpec("b", "FP32", (-1,)))
        outputs = (TensorSpec("y", "FP32", (-1,)),)

    with pytest.raises(InvalidInput) as err:
        decode_infer_request(
            {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}]},
            TwoInputs(),
        )
    assert err.value.field == "b"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"outputs": []}, "model_name"),
        ({"model_name": "m", "outputs": {}}, "outputs"),
        ({"model_name": "m", "model_version": 1, "outputs": []}, "model_version"),
        ({"model_name": "m", "outputs": [{"name": "y", "datatype": "FP32"}]}, "y"),
    ],
)
def test_malformed_responses_name_the_field(body: Any, field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        decode_infer_response(body)
    assert err.value.field.startswith(field)


def test_responses_may_carry_infinities() -> None:
    body = {
        "model_name": "m",
        "outputs": [{"name": "logp", "datatype": "FP32", "shape": [2], "data": [0.0, "-inf"]}],
    }
    assert np.isneginf(decode_infer_response(body).outputs["logp"][1])


def test_metadata_and_error_bodies(model: OnnxModel) -> None:
    meta = model_metadata("digits-large", [1], model, platform="onnxruntime_onnx")
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
    assert error_body("X: bad") == {"error": "X: bad"}


def test_reading_checks_the_form_and_leaves_the_model_checks_to_the_server(
    model: OnnxModel, heldout: np.ndarray
) -> None:
    body = {"inputs": [x_tensor(data=heldout[:1].tolist())], "outputs": [{"name": "routing.route"}]}
    read = read_infer_request(wire(body))
    # An output the model lacks is a server's call (the agent serves routing.* beside them).
    assert read.outputs == ("routing.route",)
    (tensor,) = read.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("X", "FP32", [1, 64])
    assert tensor.decode(model.inputs[0]).tobytes() == heldout[:1].astype(np.float32).tobytes()
    assert read_infer_request({"inputs": []}).inputs == ()
    with pytest.raises(InvalidInput, match="is not an output of the model"):
        decode_infer_request(wire(body), model)


def test_binary_tensor_data_is_named_as_such() -> None:
    tensor = x_tensor()
    del tensor["data"]
    tensor["parameters"] = {"binary_data_size": 256}
    with pytest.raises(InvalidInput) as caught:
        read_infer_request({"inputs": [tensor]})
    assert str(caught.value) == (
        "X.data: is missing; binary tensor data is not read here, send the values as JSON data"
    )
