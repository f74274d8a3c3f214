"""What the REST tests send: v2 JSON bodies built by hand, as any HTTP client could send them."""

from __future__ import annotations

from typing import Any

import numpy as np

from model_runtime.demo import HELDOUT

__all__ = ["X", "body"]

X = np.asarray(np.load(HELDOUT)["X"], dtype=np.float32)


def body(x: np.ndarray, datatype: str = "FP32", name: str = "X", **fields: Any) -> dict[str, Any]:
    """A v2 JSON request body with one input tensor holding `x`."""
    tensor = {"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.tolist()}
    return {"inputs": [tensor], **fields}
