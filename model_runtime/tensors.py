"""v2 tensors as numpy arrays: datatype names, shapes, byte sizes and the checks on them.

Protobuf- and JSON-neutral: the gRPC and REST codecs decode into these calls, so both sides
check a request the same way and name the offending tensor in every error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from model_runtime.errors import InvalidInput

__all__ = [
    "DATATYPE_TO_DTYPE",
    "TensorSpec",
    "array_from_raw",
    "array_from_values",
    "check_finite",
    "datatype_of",
]

# v2 datatype name -> numpy dtype (little-endian, as the protocol's raw bytes are).
DATATYPE_TO_DTYPE: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_DTYPE_TO_DATATYPE = {dt: name for name, dt in DATATYPE_TO_DTYPE.items()}


def datatype_of(array: npt.NDArray[np.generic]) -> str:
    """The v2 datatype name of a numpy array; BYTES for strings and objects."""
    datatype = _DTYPE_TO_DATATYPE.get(array.dtype)  # native order on little-endian hosts
    if datatype is not None:
        return datatype
    if array.dtype.kind in "OSU":
        return "BYTES"
    return _DTYPE_TO_DATATYPE[array.dtype.newbyteorder("<")]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output as its metadata declares it; -1 marks a free dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def check(self, datatype: str, shape: Sequence[int]) -> None:
        """Check a request tensor's declared datatype and shape before decoding its data."""
        if (
            datatype == self.datatype
            and len(shape) == len(self.shape) == 2
            and shape[0] >= 1
            and shape[1] >= 1
            and self.shape[0] in (-1, shape[0])
            and self.shape[1] in (-1, shape[1])
        ):
            return  # the common [batch, features] tensor, settled without the loop below
        if datatype != self.datatype:
            raise InvalidInput(
                self.name, f"datatype is {datatype}, expected {self.datatype}", "datatype"
            )
        if len(shape) != len(self.shape):
            raise InvalidInput(
                self.name,
                f"shape {list(shape)} has {len(shape)} dimensions, expected "
                f"{len(self.shape)} ({list(self.shape)})",
                "shape",
            )
        for axis, (got, want) in enumerate(zip(shape, self.shape, strict=True)):
            if got < 1:
                raise InvalidInput(
                    self.name, f"shape {list(shape)}: dimension {axis} is {got}", "shape"
                )
            if want != -1 and got != want:
                raise InvalidInput(
                    self.name,
                    f"shape {list(shape)} does not match {list(self.shape)} "
                    f"(dimension {axis} must be {want})",
                    "shape",
                )


def _dtype(name: str, datatype: str) -> np.dtype[np.generic]:
    try:
        return DATATYPE_TO_DTYPE[datatype]
    except KeyError:
        raise InvalidInput(name, f"datatype '{datatype}' is not supported", "datatype") from None


def array_from_raw(
    name: str, datatype: str, shape: Sequence[int], raw: bytes
) -> npt.NDArray[np.generic]:
    """Decode v2 raw contents (little-endian, row-major), checking the byte length first."""
    dtype = _dtype(name, datatype)
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            name,
            f"raw contents are {len(raw)} bytes, but shape {list(shape)} of {datatype} "
            f"needs {expected}",
            "byte_size",
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def array_from_values(
    name: str, datatype: str, shape: Sequence[int], values: Iterable[object]
) -> npt.NDArray[np.generic]:
    """Decode typed contents or a JSON `data` list (flat or nested), checking the count."""
    dtype = _dtype(name, datatype)
    try:
        flat = np.asarray(values, dtype=dtype).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(name, f"values are not {datatype}: {exc}", "datatype") from None
    expected = math.prod(shape)
    if flat.size != expected:
        raise InvalidInput(
            name, f"{flat.size} values given, but shape {list(shape)} needs {expected}", "shape"
        )
    return flat.reshape(shape)


def check_finite(name: str, array: npt.NDArray[np.generic]) -> None:
    """NaN and infinities are refused: a model's answer to them means nothing."""
    if array.dtype.kind != "f":
        return
    # isfinite + count: half the cost of a float64 sum under the errstate it would need to
    # keep an overflow or inf - inf quiet; count_nonzero, not all(): a third of its cost
    # (no ufunc reduction machinery) for the same answer.
    finite = np.isfinite(array)
    if np.count_nonzero(finite) == finite.size:
        return
    bad = np.argwhere(~finite)[0]
    raise InvalidInput(
        name,
        f"value at index {bad.tolist()} is {array[tuple(bad)]}, values must be finite",
        "non_finite",
    )
