"""The small interface through which the router sees the edge agent's local model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["LocalAnswer", "LocalModel"]


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """The local model's outputs for N items, each item's confidence, and its threshold."""

    outputs: dict[str, npt.NDArray[np.generic]]
    confidence: npt.NDArray[np.float64]
    threshold: float
    cloud_model: str | None


class LocalModel(Protocol):
    name: str
    version: int

    async def answer(self, inputs: Mapping[str, npt.NDArray[np.generic]]) -> LocalAnswer:
        """Run the model on validated inputs (shape (N, ...)) and score each item."""
        ...
