"""The gateway's OpenAPI 3.1 document: the v2 REST data plane as the gateway serves it.

It follows the Open Inference Protocol's REST specification and adds what the gateway does on
top: the bearer key, `Idempotency-Key`, gzip both ways, the `infer_group` extension, and every
error status with its v2 error body and headers. With the embedded backend the models are known, so each model's inputs,
datatypes, shapes and the most items a request may carry (the limits in force) are spelled out;
in upstream mode the tensors are described as the protocol's generic ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model_runtime.infer_group import GROUP_CONTENT_TYPE, GROUP_EXTENSION, HEADER_LENGTH
from model_runtime.tensors import TensorSpec
from model_runtime.v2_json import answer_bytes_bound

__all__ = ["DocumentLimits", "ServedModel", "openapi_document"]

_MAX_KEY_LENGTH = 255
# The longest JSON text of one number Python writes ("-1.7976931348623157e+308") and its comma:
# a request of N values is at most this many bytes per value.
_JSON_NUMBER_BYTES = 25
_BODY_OVERHEAD_BYTES = 4096

_FLOAT_MAX = {"FP16": 65504.0, "FP32": 3.4028234663852886e38, "FP64": 1.7976931348623157e308}
_INT_RANGE = {
    **{f"INT{b}": (-(2 ** (b - 1)), 2 ** (b - 1) - 1) for b in (8, 16, 32, 64)},
    **{f"UINT{b}": (0, 2**b - 1) for b in (8, 16, 32, 64)},
}


@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str
    versions: Sequence[int]
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]


@dataclass(frozen=True, slots=True)
class DocumentLimits:
    """The request limits in force (GatewaySettings), which bound what the document admits."""

    max_body_bytes: int
    max_items_per_request: int
    max_tensor_elements: int
    max_answer_bytes: int


def openapi_document(
    models: Sequence[ServedModel] | None, limits: DocumentLimits
) -> dict[str, Any]:
    """The document; `models` None means they are not known here (upstream mode)."""
    paths: dict[str, Any] = {
        "/v2/health/live": {"get": _health("Server live", "live", open_503=False)},
        "/v2/health/ready": {"get": _health("Server ready", "ready", open_503=True)},
        "/v2": {"get": _server_metadata()},
    }
    for versioned in (False, True):
        base = "/v2/models/{name}" + ("/versions/{version}" if versioned else "")
        params = _path_parameters(models, versioned)
        paths[base] = {"parameters": params, "get": _model_metadata(versioned)}
        paths[f"{base}/ready"] = {"parameters": params, "get": _model_ready(versioned)}
        paths[f"{base}/infer"] = {"parameters": params, "post": _infer(models, limits, versioned)}
        paths[f"{base}/{GROUP_EXTENSION}"] = {
            "parameters": params,
            "post": _infer_group(limits, versioned),
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cloud-gateway",
            "version": "2.0",
            "description": (
                "The Open Inference Protocol (KServe v2) REST data plane, as the edge-cloud-router "
                "cloud gateway serves it: device keys, idempotency keys, gzip, bounded requests."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": _security(),
            "responses": _errors(),
            "headers": {
                "Retry-After": {
                    "description": "Seconds to wait before trying again (RFC 9110)",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                }
            },
        },
    }


# -- operations ------------------------------------------------------------------------------


def _health(summary: str, field: str, *, open_503: bool) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": _json({"$ref": f"#/components/schemas/{field}"}, "OK")}
    if open_503:
        responses["503"] = _json(
            {"$ref": f"#/components/schemas/{field}"},
            "Not ready: the upstream server or the Redis store cannot be reached",
        )
    return {
        "operationId": f"health_{field}",
        "summary": summary,
        "security": [],
        "responses": responses,
    }


def _server_metadata() -> dict[str, Any]:
    return {
        "operationId": "server_metadata",
        "summary": "Server metadata",
        "security": [{"device_key": []}],
        "responses": {
            "200": _json({"$ref": "#/components/schemas/metadata_server_response"}, "OK"),
            **_refs("401", "429"),
        },
    }


def _model_metadata(versioned: bool) -> dict[str, Any]:
    return {
        "operationId": "model_metadata" + ("_version" if versioned else ""),
        "summary": "Model metadata",
        "security": [{"device_key": []}],
        "responses": {
            "200": _json({"$ref": "#/components/schemas/metadata_model_response"}, "OK"),
            **_refs("400", "401", "404", "429", "502", "503", "504"),
        },
    }


def _model_ready(versioned: bool) -> dict[str, Any]:
    ready = {"$ref": "#/components/schemas/model_ready"}
    return {
        "operationId": "model_ready" + ("_version" if versioned else ""),
        "summary": "Model ready",
        "security": [{"device_key": []}],
        "responses": {
            "200": _json(ready, "Ready"),
            **_refs("400", "401", "404", "429", "502", "504"),
            "503": {
                "description": "Not ready, or the upstream server cannot be reached",
                "headers": {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
                "content": {
                    "application/json": {
                        "schema": {"anyOf": [ready, {"$ref": "#/components/schemas/error"}]}
                    }
                },
            },
        },
    }


def _infer(
    models: Sequence[ServedModel] | None, limits: DocumentLimits, versioned: bool
) -> dict[str, Any]:
    if models:
        body: dict[str, Any] = {"oneOf": [_request_schema(m, limits) for m in models]}
        if len(models) == 1:
            body = body["oneOf"][0]
    else:  # an upstream's models are its own: the protocol's generic tensors
        body = {"$ref": "#/components/schemas/inference_request"}
    return {
        "operationId": "infer" + ("_version" if versioned else ""),
        "summary": "Inference",
        "description": (
            "Runs the model once per device and Idempotency-Key: repeats get the stored answer "
            "(header Idempotency-Replayed: true, parameter idempotent_replay: true); the same "
            "key with another request gets 422. The body may be gzip-compressed "
            "(Content-Encoding: gzip, at most max_decompressed_bytes once inflated; another "
            "coding gets 415); answers of 512 bytes or more are gzip-compressed when the "
            "request says Accept-Encoding: gzip. Each tensor's data holds exactly as many "
            "values as its shape's product, flat in row-major order or nested as the shape."
        ),
        "security": [{"device_key": []}],
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "The device's request id: the model runs once per device and key.",
                "schema": {
                    "type": "string",
                    "pattern": f"^[\\x21-\\x7e]{{1,{_MAX_KEY_LENGTH}}}$",
                },
            },
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {
            "200": {
                "description": "The model's answer (or the stored answer to a repeat)",
                "headers": {
                    "Idempotency-Replayed": {
                        "description": "true when the answer was stored under this key before",
                        "schema": {"type": "string", "enum": ["true"]},
                    }
                },
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/inference_response"}
                    }
                },
            },
            **_refs("400", "401", "404", "409", "413", "415", "422", "429"),
            **_refs("500", "502", "503", "504"),
        },
    }


def _infer_group(limits: DocumentLimits, versioned: bool) -> dict[str, Any]:
    return {
        "operationId": GROUP_EXTENSION + ("_version" if versioned else ""),
        "summary": "Inference of several requests, each under its own Idempotency-Key",
        "description": (
            "The infer_group extension (listed in GET /v2's extensions with its limits). The "
            "body is framed as the v2 binary tensor extension frames one: a JSON header of "
            f'{HEADER_LENGTH} bytes, {{"items": [{{"key": <Idempotency-Key>, "bytes": '
            "<n>}, ...]}, then each item's body (n bytes: what its single infer request would "
            "carry) back to back. Each item is run as that request would be: once per device "
            "and key, whichever group or single request brings it. The answer has one entry "
            "per item, in order, with the status the item's single request would have got. The "
            "group is limited as the batch of its items would be (items over all of them up to "
            f"{limits.max_items_per_request}), and refused with 413 before any item runs. The "
            "body may be gzip-compressed (Content-Encoding: gzip)."
        ),
        "security": [{"device_key": []}],
        "parameters": [
            {
                "name": HEADER_LENGTH,
                "in": "header",
                "required": True,
                "description": "The length in bytes of the group's JSON header.",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {GROUP_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        },
        "responses": {
            "200": _json(
                {"$ref": "#/components/schemas/group_response"},
                "One entry per item, in order; a bad item fails alone",
            ),
            **_refs("400", "401", "404", "413", "415", "429", "502", "503", "504"),
        },
    }


def _path_parameters(models: Sequence[ServedModel] | None, versioned: bool) -> list[Any]:
    name: dict[str, Any] = {"type": "string", "minLength": 1}
    version: dict[str, Any] = {"type": "string", "pattern": "^[1-9][0-9]{0,17}$"}
    if models:
        name = {"type": "string", "enum": sorted(m.name for m in models)}
        version = {
            "type": "string",
            "enum": sorted({str(v) for m in models for v in m.versions}, key=int),
        }
    params = [{"name": "name", "in": "path", "required": True, "schema": name}]
    if versioned:
        params.append({"name": "version", "in": "path", "required": True, "schema": version})
    return params


# -- one model's request ---------------------------------------------------------------------


def max_rows(model: ServedModel, limits: DocumentLimits) -> int:
    """The most items one request to `model` may carry under `limits`: its items, values per
    tensor, body bytes and answer bytes."""
    per_row = max(math.prod(d for d in s.shape[1:] if d > 0) for s in model.inputs)
    rows = min(limits.max_items_per_request, limits.max_tensor_elements // max(1, per_row))
    by_body = (limits.max_body_bytes - _BODY_OVERHEAD_BYTES) // (
        _JSON_NUMBER_BYTES * per_row * len(model.inputs)
    )
    rows = min(rows, by_body)
    lo, hi = 1, rows
    while lo < hi:  # the answer's bound grows with the rows: the largest that fits
        mid = (lo + hi + 1) // 2
        bound = answer_bytes_bound(model.outputs, mid)
        if bound is None or bound <= limits.max_answer_bytes:
            lo = mid
        else:
            hi = mid - 1
    return max(1, lo)


def _request_schema(model: ServedModel, limits: DocumentLimits) -> dict[str, Any]:
    if any(d < 1 for s in model.inputs for d in s.shape[1:]):
        # A free dimension beyond the first ties the data's length to two numbers at once,
        # which JSON Schema cannot say: such a model gets the protocol's generic request.
        return {"$ref": "#/components/schemas/inference_request"}
    rows = max_rows(model, limits)
    inputs = [_input_schema(spec, rows) for spec in model.inputs]
    return {
        "type": "object",
        "title": f"{model.name} inference request",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"$ref": "#/components/schemas/parameters"},
            "inputs": {
                "type": "array",
                "description": "Each of the model's inputs once, with the same number of items.",
                "minItems": len(inputs),
                "maxItems": len(inputs),
                "items": inputs[0] if len(inputs) == 1 else {"oneOf": inputs},
            },
            "outputs": {
                "type": "array",
                "description": "The outputs to answer with (default: all).",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "enum": [s.name for s in model.outputs]},
                        "parameters": {"$ref": "#/components/schemas/parameters"},
                    },
                },
            },
        },
    }


def _input_schema(spec: TensorSpec, rows: int) -> dict[str, Any]:
    dims: list[dict[str, Any]] = [
        {"type": "integer", "const": d}
        if d > 0
        else {"type": "integer", "minimum": 1, "maximum": rows}
        for d in spec.shape
    ]
    fixed = math.prod(d for d in spec.shape if d > 0)
    most = fixed * (rows if spec.shape and spec.shape[0] < 1 else 1)
    return {
        "type": "object",
        "required": ["name", "datatype", "shape", "data"],
        "properties": {
            "name": {"type": "string", "const": spec.name},
            "datatype": {"type": "string", "const": spec.datatype},
            "shape": {
                "type": "array",
                "prefixItems": dims,
                "minItems": len(dims),
                "maxItems": len(dims),
            },
            "data": {
                "type": "array",
                "description": "The shape's product of values (here: items x "
                f"{fixed}), flat in row-major order.",
                "minItems": fixed,
                "maxItems": most,
                "items": _value_schema(spec.datatype),
            },
            "parameters": {"$ref": "#/components/schemas/parameters"},
        },
    }


def _value_schema(datatype: str) -> dict[str, Any]:
    if datatype == "BOOL":
        return {"type": "boolean"}
    if datatype in _FLOAT_MAX:
        top = _FLOAT_MAX[datatype]
        return {"type": "number", "minimum": -top, "maximum": top}
    if datatype in _INT_RANGE:
        low, high = _INT_RANGE[datatype]
        return {"type": "integer", "minimum": low, "maximum": high}
    return {"type": "string"}


# -- components ------------------------------------------------------------------------------

_ERRORS = {
    "400": "Malformed JSON, tensors, parameters, gzip, Idempotency-Key or version",
    "401": "No device key, or a malformed, unknown or revoked one",
    "404": "Unknown model or version",
    "409": "A duplicate waited too long for the first request with its Idempotency-Key",
    "413": "Body, inflated body, items, values per tensor or the answer over their limits",
    "415": "A Content-Encoding other than gzip",
    "422": "Idempotency-Key already used for a different request",
    "429": "The device is over its rate, or has too many requests in flight",
    "500": "The model failed on this input",
    "502": "The upstream server answered with an error or garbage",
    "503": "The upstream server or the idempotency store is unreachable or full, or the "
    "gateway has too many requests in flight",
    "504": "The upstream server did not answer in time",
}
_RETRY_AFTER = {"409", "429", "503"}


def _errors() -> dict[str, Any]:
    responses = {}
    for status, text in _ERRORS.items():
        response = _json({"$ref": "#/components/schemas/error"}, text)
        if status in _RETRY_AFTER:
            response["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
        if status == "401":
            response["headers"] = {
                "WWW-Authenticate": {"schema": {"type": "string", "pattern": "^Bearer "}}
            }
        responses[status] = response
    return responses


def _refs(*statuses: str) -> dict[str, Any]:
    return {s: {"$ref": f"#/components/responses/{s}"} for s in statuses}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _security() -> dict[str, Any]:
    return {
        "device_key": {
            "type": "http",
            "scheme": "bearer",
            "description": "A device key from `cloud-gateway keys add`.",
        }
    }


def _schemas() -> dict[str, Any]:
    tensor_data = {
        "type": "array",
        "items": {
            "anyOf": [
                {"$ref": "#/components/schemas/tensor_data"},
                {"type": ["number", "string", "boolean"]},
            ]
        },
    }
    metadata_tensor = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    }
    tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}},
            "datatype": {"type": "string", "minLength": 1},
            "parameters": {"$ref": "#/components/schemas/parameters"},
            "data": {"$ref": "#/components/schemas/tensor_data"},
        },
    }
    return {
        "live": _object({"live": {"type": "boolean"}}),
        "ready": _object({"ready": {"type": "boolean"}}),
        "model_ready": _object({"name": {"type": "string"}, "ready": {"type": "boolean"}}),
        "error": _object({"error": {"type": "string"}}),
        "parameters": {
            "type": "object",
            "additionalProperties": {"type": ["string", "number", "boolean"]},
        },
        "tensor_data": tensor_data,
        "metadata_tensor": metadata_tensor,
        "metadata_server_response": _object(
            {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            }
        ),
        "metadata_model_response": {
            "type": "object",
            "required": ["name", "platform"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": metadata_tensor},
                "outputs": {"type": "array", "items": metadata_tensor},
            },
        },
        "inference_request": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {"$ref": "#/components/schemas/parameters"},
                "inputs": {"type": "array", "minItems": 1, "items": tensor},
                "outputs": {
                    "type": "array",
                    "items": _object(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "parameters": {"$ref": "#/components/schemas/parameters"},
                        },
                        required=["name"],
                    ),
                },
            },
        },
        "group_response": _object(
            {
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["key", "status"],
                        "properties": {
                            "key": {"type": "string", "minLength": 1},
                            "status": {"type": "integer", "minimum": 200, "maximum": 599},
                            "response": {"$ref": "#/components/schemas/inference_response"},
                            "error": {"type": "string"},
                            "retry_after": {"type": "number", "minimum": 0},
                        },
                    },
                }
            }
        ),
        "inference_response": {
            "type": "object",
            "required": ["model_name", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "parameters": {"$ref": "#/components/schemas/parameters"},
                "outputs": {"type": "array", "items": tensor},
            },
        },
    }


def _object(properties: dict[str, Any], *, required: Sequence[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(properties if required is None else required),
        "properties": properties,
    }
