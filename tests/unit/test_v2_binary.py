"""The v2 binary tensor extension: a JSON request as bytes and back, to the byte."""

from __future__ import annotations

import numpy as np
import pytest

from model_runtime import InvalidInput, json_codec
from model_runtime.v2_binary import BINARY_SIZE, binary_to_json, json_to_binary
from model_runtime.v2_json import encode_infer_request


@pytest.mark.parametrize(
    "array",
    [
        np.arange(64, dtype=np.float32).reshape(1, 64) / 16,
        np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32),
        np.random.default_rng(1).integers(0, 256, (1, 3, 8, 8)).astype(np.uint8),
        np.array([[0.1, -2.5, 65504]], dtype=np.float16),
        np.array([[True, False]]),
        np.array([[-(2**62), 7]], dtype=np.int64),
    ],
)
def test_a_request_as_bytes_reads_back_as_the_same_json(array: np.ndarray) -> None:
    body = json_codec.dumps(
        encode_infer_request({"x": array}, request_id="t-1", parameters={"priority": 2})
    )
    binary, header_length = json_to_binary(body)
    header = json_codec.loads(binary[:header_length])
    assert "data" not in header["inputs"][0]
    assert header["inputs"][0]["parameters"] == {BINARY_SIZE: array.nbytes}
    assert binary[header_length:] == array.astype(array.dtype.newbyteorder("<")).tobytes()
    assert binary_to_json(binary, str(header_length)) == body


def test_the_tensor_is_smaller_as_bytes_for_images() -> None:
    image = np.random.default_rng(2).integers(0, 256, (1, 3, 96, 96)).astype(np.uint8)
    body = json_codec.dumps(encode_infer_request({"x": image}))
    binary, _ = json_to_binary(body)
    assert len(binary) < len(body) / 3


@pytest.mark.parametrize(
    ("cut", "header", "field"),
    [
        (0, "0", "Inference-Header-Content-Length"),
        (0, "x", "Inference-Header-Content-Length"),
        (0, "\xb2", "Inference-Header-Content-Length"),  # a digit to str.isdigit, not to int()
        (0, "100000", "Inference-Header-Content-Length"),
        (-1, None, "x.parameters.binary_data_size"),  # a byte short
        (1, None, "body"),  # a byte too many
    ],
)
def test_lengths_that_do_not_add_up_name_the_field(
    cut: int, header: str | None, field: str
) -> None:
    body = json_codec.dumps(encode_infer_request({"x": np.zeros((1, 4), np.float32)}))
    binary, header_length = json_to_binary(body)
    if cut < 0:
        binary = binary[:cut]
    elif cut > 0:
        binary += b"\0" * cut
    with pytest.raises(InvalidInput) as refused:
        binary_to_json(binary, header if header is not None else str(header_length))
    assert refused.value.field == field
