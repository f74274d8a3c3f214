"""Tensor checks: each refusal names the tensor and says what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from model_runtime import InvalidInput
from model_runtime.tensors import (
    TensorSpec,
    array_from_raw,
    array_from_values,
    check_finite,
    datatype_of,
)

SPEC = TensorSpec("X", "FP32", (-1, 4))


def test_spec_accepts_any_batch_size() -> None:
    SPEC.check("FP32", [7, 4])


@pytest.mark.parametrize(
    ("datatype", "shape", "kind", "words"),
    [
        ("FP64", [1, 4], "datatype", "datatype is FP64, expected FP32"),
        ("FP32", [1, 3], "shape", "dimension 1 must be 4"),
        ("FP32", [4], "shape", "has 1 dimensions, expected 2"),
        ("FP32", [0, 4], "shape", "dimension 0 is 0"),
    ],
)
def test_spec_refusals_name_input_and_problem(
    datatype: str, shape: list[int], kind: str, words: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        SPEC.check(datatype, shape)
    assert info.value.field == "X"
    assert info.value.kind == kind
    assert words in str(info.value)


def test_raw_round_trip() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(array_from_raw("X", "FP32", [2, 4], x.tobytes()), x)


def test_raw_byte_length_must_match_shape() -> None:
    with pytest.raises(
        InvalidInput, match="raw contents are 28 bytes, but shape \\[2, 4\\] of FP32 needs 32"
    ):
        array_from_raw("X", "FP32", [2, 4], bytes(28))


def test_values_count_must_match_shape() -> None:
    with pytest.raises(InvalidInput, match="3 values given, but shape \\[1, 4\\] needs 4") as info:
        array_from_values("X", "FP32", [1, 4], [1.0, 2.0, 3.0])
    assert info.value.kind == "shape"


def test_nested_json_style_values_are_accepted() -> None:
    a = array_from_values("X", "INT64", [2, 2], [[1, 2], [3, 4]])
    assert a.dtype == np.int64
    assert a.tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_with_their_index(bad: float) -> None:
    x = np.zeros((2, 4), dtype=np.float32)
    x[1, 2] = bad
    with pytest.raises(InvalidInput, match=r"value at index \[1, 2\]") as info:
        check_finite("X", x)
    assert info.value.kind == "non_finite"


def test_large_finite_fp64_values_are_not_mistaken_for_infinite() -> None:
    check_finite("X", np.full((1, 4), 1e308))


def test_datatype_names() -> None:
    assert datatype_of(np.zeros(1, np.float32)) == "FP32"
    assert datatype_of(np.zeros(1, ">f4")) == "FP32"
    assert datatype_of(np.zeros(1, np.int64)) == "INT64"
    assert datatype_of(np.array(["a"], dtype=object)) == "BYTES"
