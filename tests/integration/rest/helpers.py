"""What the REST tests send (v2 JSON bodies built by hand, as any HTTP client could send them),
and when an agent's REST API is ready."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np

from model_runtime.demo import HELDOUT
from tests.support.processes import Daemon

__all__ = ["X", "body", "rest_ready"]

X = np.asarray(np.load(HELDOUT)["X"], dtype=np.float32)


def body(x: np.ndarray, datatype: str = "FP32", name: str = "X", **fields: Any) -> dict[str, Any]:
    """A v2 JSON request body with one input tensor holding `x`."""
    tensor = {"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.tolist()}
    return {"inputs": [tensor], **fields}


def rest_ready(agent: Daemon) -> bool:
    """Health needs no credentials, whatever the agent asks of other calls."""
    return httpx.get(f"http://{agent.address('rest')}/v2/health/ready").status_code == 200
