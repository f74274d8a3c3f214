"""The Open Inference Protocol (v2) REST JSON tensor format: request and response bodies <-> numpy.

Shared by the cloud gateway (decode requests, encode responses) and the router's cloud client
(encode requests, decode responses). Works on parsed JSON (dicts and lists), never on protobuf.
Every malformed body raises InvalidInput whose `field` names the culprit: the tensor's name once
it is known, otherwise a JSON path such as `inputs[2]` or `parameters.priority`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson

from model_runtime.errors import InvalidInput, LimitExceeded
from model_runtime.tensors import TensorSpec, array_from_values, check_finite, datatype_of

__all__ = [
    "InferRequest",
    "InferResponse",
    "ModelSignature",
    "Parameters",
    "RequestBody",
    "RequestTensor",
    "TensorLimits",
    "answer_bytes_bound",
    "decode_infer_request",
    "decode_infer_response",
    "encode_infer_request",
    "encode_infer_response",
    "error_body",
    "model_metadata",
    "read_infer_request",
    "tensor_data",
]

Array = npt.NDArray[np.generic]
# v2 parameter values are strings, numbers or booleans (no nesting).
ParameterValue = str | int | float | bool
Parameters = dict[str, ParameterValue]


class ModelSignature(Protocol):
    """What a request is checked against: the model's declared inputs and outputs.

    `model_runtime.OnnxModel` satisfies it.
    """

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...


@dataclass(frozen=True, slots=True)
class TensorLimits:
    """How much a request may ask for, checked from its shapes before any value is converted."""

    max_items: int
    """Rows of a request: the first dimension of every input."""
    max_elements: int
    """Values in one input tensor."""


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded, checked inference request. `outputs` is None when the caller wants them all."""

    inputs: dict[str, Array]
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)
    outputs: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class InferResponse:
    """A decoded inference response."""

    model_name: str
    outputs: dict[str, Array]
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# encoding


def tensor_data(array: Array) -> list[Any]:
    """Row-major flat values, floats in their shortest round-tripping form.

    float32 values converted to Python floats print as float64 ("0.10000000149011612");
    the shortest text that reads back to the same float32 ("0.1") halves the bytes of a typical
    probability tensor on the wire. orjson writes exactly that text for a float32 array, fifty
    times faster than numpy's str() of each value; it writes NaN and infinities as null, so
    those (which no JSON body may hold) keep the slow path, where the encoder refuses them.
    """
    flat = array.reshape(-1)
    if flat.dtype.kind == "f" and flat.dtype.itemsize < 8:
        if flat.dtype == np.float32 and np.isfinite(flat).all():
            values: list[Any] = orjson.loads(
                orjson.dumps(np.ascontiguousarray(flat), option=orjson.OPT_SERIALIZE_NUMPY)
            )
            return values
        return [float(s) for s in flat.astype(str)]
    if flat.dtype.kind in "SO":
        return [v.decode() if isinstance(v, bytes) else str(v) for v in flat.tolist()]
    return list(flat.tolist())


def _tensor(name: str, array: Array) -> dict[str, Any]:
    return {
        "name": name,
        "datatype": datatype_of(array),
        "shape": list(array.shape),
        "data": tensor_data(array),
    }


def encode_infer_request(
    inputs: Mapping[str, Array],
    *,
    request_id: str | None = None,
    parameters: Mapping[str, ParameterValue] | None = None,
    outputs: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The v2 JSON body of an inference request (pass it to `json.dumps`)."""
    body: dict[str, Any] = {}
    if request_id is not None:
        body["id"] = request_id
    if parameters:
        body["parameters"] = dict(parameters)
    body["inputs"] = [_tensor(name, np.asarray(a)) for name, a in inputs.items()]
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


def encode_infer_response(
    model_name: str,
    outputs: Mapping[str, Array],
    *,
    model_version: str | None = None,
    request_id: str | None = None,
    parameters: Mapping[str, ParameterValue] | None = None,
) -> dict[str, Any]:
    """The v2 JSON body of an inference response."""
    body: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        body["model_version"] = model_version
    if request_id is not None:
        body["id"] = request_id
    if parameters:
        body["parameters"] = dict(parameters)
    body["outputs"] = [_tensor(name, np.asarray(a)) for name, a in outputs.items()]
    return body


def error_body(message: str) -> dict[str, str]:
    """The v2 error body: `{"error": message}`."""
    return {"error": message}


def model_metadata(
    name: str, versions: Sequence[int | str], signature: ModelSignature, platform: str
) -> dict[str, Any]:
    """The v2 model metadata body for `GET /v2/models/{name}`."""

    def specs(tensors: Sequence[TensorSpec]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]

    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": platform,
        "inputs": specs(signature.inputs),
        "outputs": specs(signature.outputs),
    }


# ---------------------------------------------------------------------------------------------
# decoding


def _object(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidInput(where, f"must be a JSON object, got {_json_type(value)}")
    return value


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(where, f"must be a JSON array, got {_json_type(value)}")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(where, f"must be a non-empty string, got {_json_type(value)}")
    return value


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    for kind, label in names.items():
        if isinstance(value, kind):
            return label
    return "a number" if isinstance(value, int | float) else type(value).__name__


def _parameters(value: object, where: str) -> Parameters:
    if value is None:
        return {}
    params = _object(value, where)
    for key, v in params.items():
        if not isinstance(v, str | int | float | bool):
            raise InvalidInput(
                f"{where}.{key}", f"must be a string, number or boolean, got {_json_type(v)}"
            )
    return dict(params)


def _shape(value: object, name: str) -> list[int]:
    dims = _list(value, f"{name}.shape")
    for d in dims:
        # bool is an int in Python, but `true` is not a dimension.
        if not isinstance(d, int) or isinstance(d, bool):
            raise InvalidInput(name, f"shape {dims} must hold integers, got {_json_type(d)}")
    return dims


# JSON value types each datatype takes: numpy would turn "0.5" and true into 0.5 and 1.0, and
# truncate 1.5 to an INT32 1, without a word.
_FLOATS = frozenset({int, float})
_INTEGERS = frozenset({int})
_BOOLS = frozenset({bool})


def _check_value_types(name: str, datatype: str, data: list[Any], depth: int) -> None:
    allowed = _BOOLS if datatype == "BOOL" else _FLOATS if datatype.startswith("FP") else _INTEGERS
    wrong = _leaf_types(data, depth) - allowed
    if wrong:
        found = ", ".join(sorted(_TYPE_NAMES.get(t, t.__name__) for t in wrong))
        raise InvalidInput(
            name, f"values are not {datatype}: {_EXPECTED[allowed]} only, found {found}", "datatype"
        )


_TYPE_NAMES = {
    str: "a string",
    bool: "a boolean",
    float: "a fraction",
    int: "an integer",
    dict: "an object",
    list: "an array",
    type(None): "null",
}
_EXPECTED = {_BOOLS: "true or false", _FLOATS: "numbers", _INTEGERS: "integers"}


def _leaf_types(data: list[Any], depth: int) -> set[type]:
    """The types of the values in `data`, looking into nested arrays up to `depth` levels."""
    types = set(map(type, data))
    if list not in types or depth <= 1:
        return types
    types.discard(list)
    for item in data:
        if type(item) is list:
            types |= _leaf_types(item, depth - 1)
    return types


def _check_limits(name: str, shape: list[int], data: list[Any], limits: TensorLimits) -> None:
    if shape and shape[0] > limits.max_items:
        raise LimitExceeded(
            name,
            f"{shape[0]} items, over the limit of {limits.max_items} per request",
            "items_per_request",
        )
    elements = math.prod(shape)
    # A flat list longer than the limit is refused as well, before numpy reads it.
    if elements > limits.max_elements or len(data) > limits.max_elements:
        raise LimitExceeded(
            name,
            f"{max(elements, len(data))} values, over the limit of {limits.max_elements} "
            "per tensor",
            "elements_per_tensor",
        )


@dataclass(frozen=True, slots=True)
class RequestTensor:
    """One tensor of a v2 JSON body, well formed (name, datatype, integer shape, a data list),
    its values not yet decoded: a server checks it against the model first."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any]

    def decode(
        self,
        spec: TensorSpec | None = None,
        *,
        finite: bool = True,
        limits: TensorLimits | None = None,
    ) -> Array:
        """The values as an array, after checking datatype and shape against `spec`, the
        shape and the data's length against `limits`, and (for requests, `finite`) the JSON
        types of the values. Raises InvalidInput or LimitExceeded."""
        if spec is not None:
            spec.check(self.datatype, self.shape)
        elif any(d < 1 for d in self.shape):
            raise InvalidInput(self.name, f"shape {self.shape} has a dimension below 1")
        if limits is not None:
            _check_limits(self.name, self.shape, self.data, limits)
        if finite:  # requests; answers may spell infinities as "-inf" (log-probabilities)
            _check_value_types(self.name, self.datatype, self.data, len(self.shape))
        array = array_from_values(self.name, self.datatype, self.shape, self.data)
        if finite:
            check_finite(self.name, array)
        return array


@dataclass(frozen=True, slots=True)
class RequestBody:
    """A v2 JSON inference request, well formed, its tensors not yet checked nor decoded."""

    inputs: tuple[RequestTensor, ...]
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)
    outputs: tuple[str, ...] | None = None
    """The outputs asked for by name; None when the caller wants them all."""


def _read_tensor(raw: object, where: str) -> RequestTensor:
    tensor = _object(raw, where)
    name = _string(tensor.get("name"), f"{where}.name")
    datatype = _string(tensor.get("datatype"), f"{name}.datatype")
    shape = _shape(tensor.get("shape"), name)
    if "data" not in tensor:
        problem = "is missing"
        parameters = tensor.get("parameters")
        if isinstance(parameters, Mapping) and "binary_data_size" in parameters:
            problem += "; binary tensor data is not read here, send the values as JSON data"
        raise InvalidInput(f"{name}.data", problem)
    return RequestTensor(name, datatype, shape, _list(tensor["data"], f"{name}.data"))


def read_infer_request(body: object) -> RequestBody:
    """Check that a parsed v2 request body is well formed, without a model to check it against.

    Errors name a JSON path (`inputs[2].name`, `parameters.priority`) or the tensor. A server
    then checks the tensors against its model, in its own words, and decodes them.
    """
    request = _object(body, "body")
    request_id = request.get("id")
    if "id" in request and not isinstance(request_id, str):  # null too: absent is the way
        raise InvalidInput("id", f"must be a string, got {_json_type(request_id)}")
    parameters = _request_parameters(request, "parameters")
    inputs = []
    for i, raw in enumerate(_list(request.get("inputs"), "inputs")):
        tensor = _read_tensor(raw, f"inputs[{i}]")
        # A request's tensors' parameters are held to the rules of the request's own.
        _request_parameters(raw, f"{tensor.name}.parameters")
        inputs.append(tensor)
    if "outputs" in request and request["outputs"] is None:
        raise InvalidInput("outputs", "must be a JSON array, got null (leave it out for all)")
    return RequestBody(tuple(inputs), request_id, parameters, _output_names(request.get("outputs")))


def _request_parameters(container: Mapping[str, Any], where: str) -> Parameters:
    """A request's `parameters` where it may have them: absent is none, null is refused."""
    if "parameters" not in container:
        return {}
    return _parameters(_object(container["parameters"], where), where)


def decode_infer_request(
    body: object, model: ModelSignature | None = None, limits: TensorLimits | None = None
) -> InferRequest:
    """Check and decode a parsed v2 request body.

    With `model`, every declared input must be present with its datatype and shape, and only
    declared inputs and outputs may be named. Without it (a gateway forwarding to a server
    whose metadata it does not hold) the tensors are only checked for being well formed.
    With `limits`, a tensor over them raises LimitExceeded before its values are converted.
    """
    request = read_infer_request(body)
    if not request.inputs:
        raise InvalidInput("inputs", "is empty; at least one input tensor is needed")
    specs = {s.name: s for s in model.inputs} if model is not None else None
    inputs: dict[str, Array] = {}
    for tensor in request.inputs:
        name = tensor.name
        if name in inputs:
            raise InvalidInput(name, "is given twice")
        if specs is not None and name not in specs:
            raise InvalidInput(name, f"is not an input of the model (inputs: {', '.join(specs)})")
        spec = specs[name] if specs is not None else None
        inputs[name] = tensor.decode(spec, limits=limits)
    if specs is not None:
        missing = [n for n in specs if n not in inputs]
        if missing:
            raise InvalidInput(missing[0], "input is missing from the request")
    _check_outputs(request.outputs, model)
    return InferRequest(inputs, request.id, request.parameters, request.outputs)


def _output_names(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = []
    for i, raw in enumerate(_list(value, "outputs")):
        output = _object(raw, f"outputs[{i}]")
        names.append(_string(output.get("name"), f"outputs[{i}].name"))
        _request_parameters(output, f"outputs[{i}].parameters")
    return tuple(names)


def _check_outputs(names: tuple[str, ...] | None, model: ModelSignature | None) -> None:
    # A signature without declared outputs (some upstream servers) cannot refuse any.
    known = [s.name for s in model.outputs] if model is not None and model.outputs else None
    if names is None or known is None:
        return
    for i, name in enumerate(names):
        if name not in known:
            raise InvalidInput(
                f"outputs[{i}]", f"'{name}' is not an output of the model ({', '.join(known)})"
            )


def decode_infer_response(body: object) -> InferResponse:
    """Check and decode a parsed v2 response body (for clients and forwarding gateways)."""
    response = _object(body, "body")
    model_name = _string(response.get("model_name"), "model_name")
    version = response.get("model_version")
    if version is not None and not isinstance(version, str):
        raise InvalidInput("model_version", f"must be a string, got {_json_type(version)}")
    response_id = response.get("id")
    if response_id is not None and not isinstance(response_id, str):
        raise InvalidInput("id", f"must be a string, got {_json_type(response_id)}")
    parameters = _parameters(response.get("parameters"), "parameters")
    outputs: dict[str, Array] = {}
    for i, raw in enumerate(_list(response.get("outputs"), "outputs")):
        # A model may answer with infinities (log-probabilities); only inputs must be finite.
        tensor = _read_tensor(raw, f"outputs[{i}]")
        outputs[tensor.name] = tensor.decode(finite=False)
    return InferResponse(model_name, outputs, version, response_id, parameters)


# The longest JSON text of one value of each datatype, with its comma: "-1.1754944e-38," for
# FP32, "-9223372036854775808," for INT64.
_JSON_VALUE_BYTES = {
    "BOOL": 6,
    "UINT8": 4,
    "UINT16": 6,
    "UINT32": 11,
    "UINT64": 21,
    "INT8": 5,
    "INT16": 7,
    "INT32": 12,
    "INT64": 21,
    "FP16": 11,
    "FP32": 16,
    "FP64": 25,
}
_TENSOR_OVERHEAD_BYTES = 256  # name, datatype, shape and punctuation of one output tensor


def answer_bytes_bound(
    outputs: Sequence[TensorSpec], rows: int, names: Sequence[str] | None = None
) -> int | None:
    """The most bytes the v2 JSON answer with `outputs` (or those of them in `names`) can take
    for `rows` items, known before the model runs; None when a datatype or a dimension other
    than the first is not fixed (the answer can then only be measured)."""
    total = 0
    for spec in outputs:
        if names is not None and spec.name not in names:
            continue
        per_value = _JSON_VALUE_BYTES.get(spec.datatype)
        dims = [rows if i == 0 and d == -1 else d for i, d in enumerate(spec.shape)]
        if per_value is None or any(d < 0 for d in dims):
            return None
        total += math.prod(dims) * per_value + _TENSOR_OVERHEAD_BYTES
    return total
