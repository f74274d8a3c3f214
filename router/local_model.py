"""What the router is handed of the edge agent's local model: its answer to one request.

The router never runs the model itself, so its logic is tested with a made-up answer and a
real cloud.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["LocalAnswer"]


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """The local model's outputs for N items, each item's confidence, its threshold and the
    cloud model its unsure items escalate to (None: it has none)."""

    outputs: dict[str, npt.NDArray[np.generic]]
    confidence: npt.NDArray[np.float64]
    threshold: float
    cloud_model: str | None
