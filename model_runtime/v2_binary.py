"""The v2 binary tensor extension for requests: tensors as their own bytes after a JSON header,
rather than as decimal text in it (Triton's `binary_tensor_data`).

A 3x96x96 photo is 27,648 bytes as UINT8 and 101,078 as JSON text (26,069 and 20,932 gzipped);
as FP32, 110,592 bytes and 289,751 (36,626 and 29,684 gzipped), and gzip takes 3-6 times less
CPU on the bytes. For a 64-pixel digit the two are the same size once gzipped, so it matters for
image-sized inputs.

A binary request is the JSON request with each input's `data` replaced by
`"parameters": {"binary_data_size": n}` and its n bytes (little-endian, row-major) appended
after the JSON, whose length goes in `Inference-Header-Content-Length`. The two directions here
are exact inverses for the JSON this project writes (`v2_json.encode_infer_request`), so a
gateway that reads a binary request as the JSON it stands for sees the same request, bytes and
idempotency fingerprint included, however it was framed.
"""

from __future__ import annotations

import math
from typing import Any

from model_runtime import json_codec
from model_runtime.errors import InvalidInput
from model_runtime.tensors import DATATYPE_TO_DTYPE, array_from_raw, array_from_values
from model_runtime.v2_json import tensor_data

__all__ = ["BINARY_EXTENSION", "BINARY_SIZE", "binary_to_json", "json_to_binary"]

BINARY_EXTENSION = "binary_tensor_data"
"""Listed in the server metadata's `extensions` by servers that read binary tensors."""
BINARY_SIZE = "binary_data_size"


def json_to_binary(body: bytes) -> tuple[bytes, int]:
    """A v2 JSON request's bytes as a binary request: (body, its JSON header's length). Inputs
    of a datatype without a fixed size (BYTES) stay JSON."""
    document = json_codec.loads(body)
    tails: list[bytes] = []
    for tensor in document.get("inputs", []):
        dtype = DATATYPE_TO_DTYPE.get(tensor.get("datatype"))
        if dtype is None or "data" not in tensor:
            continue
        array = array_from_values(
            tensor["name"], tensor["datatype"], tensor["shape"], tensor.pop("data")
        )
        raw = array.astype(dtype.newbyteorder("<"), copy=False).tobytes()
        tensor["parameters"] = {**tensor.get("parameters", {}), BINARY_SIZE: len(raw)}
        tails.append(raw)
    header = json_codec.dumps(document)
    return header + b"".join(tails), len(header)


def binary_to_json(body: bytes, header_length: str | int) -> bytes:
    """The JSON request a binary request stands for; InvalidInput naming the header or the
    tensor when the lengths do not add up. Bounded by the body: each value is read once."""
    size = (
        int(header_length)
        if isinstance(header_length, int) or (header_length.isascii() and header_length.isdigit())
        else -1
    )
    if not 0 < size <= len(body):
        raise InvalidInput(
            "Inference-Header-Content-Length",
            f"must be the JSON header's length, at most {len(body)}",
        )
    try:
        document = json_codec.loads(body[:size])
    except ValueError as exc:
        raise InvalidInput("body", f"JSON header is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise InvalidInput("inputs", "must be a JSON array of tensors")
    offset = size
    inputs: list[Any] = []
    for i, tensor in enumerate(document["inputs"]):
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(parameters, dict) or parameters.get(BINARY_SIZE) is None:
            inputs.append(tensor)
            continue
        n = parameters[BINARY_SIZE]
        name = tensor.get("name") if isinstance(tensor.get("name"), str) else f"inputs[{i}]"
        shape = tensor.get("shape")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or offset + n > len(body):
            raise InvalidInput(
                f"{name}.parameters.{BINARY_SIZE}", f"must be within the body's {len(body)} bytes"
            )
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidInput(name, "shape must be a list of sizes")
        array = array_from_raw(name, str(tensor.get("datatype")), shape, body[offset : offset + n])
        offset += n
        rest = {k: v for k, v in parameters.items() if k != BINARY_SIZE}
        decoded = {k: v for k, v in tensor.items() if k != "parameters"}
        if rest:
            decoded["parameters"] = rest
        decoded["data"] = tensor_data(array) if math.prod(shape) else []
        inputs.append(decoded)
    if offset != len(body):
        raise InvalidInput("body", f"holds {len(body) - offset} bytes after the last binary tensor")
    document["inputs"] = inputs
    return json_codec.dumps(document)
