"""InferenceService: the agent's transport-free core. Checks a decoded request against its
model, runs the model, scores each item and says how the answer was reached.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edge_agent.metrics import AgentMetrics
from model_runtime import InvalidInput, ModelRepository, OnnxModel

__all__ = ["ROUTING_OUTPUTS", "InferRequest", "InferResult", "InferenceService", "ServerInfo"]

Array = npt.NDArray[np.generic]
ParameterValue = bool | int | float | str

# Per-item routing facts, served beside the model's own outputs only when a request names
# them, so a plain v2 client gets exactly the outputs it asked for.
CONFIDENCE_OUTPUT = "routing.confidence"
ROUTING_OUTPUTS = frozenset({CONFIDENCE_OUTPUT})


@dataclass(frozen=True, slots=True)
class ServerInfo:
    name: str
    version: str
    extensions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded request: inputs already checked one by one against the model's specs."""

    model: OnnxModel
    inputs: dict[str, Array]
    outputs: Sequence[str] = ()
    """Outputs asked for by name; empty means all of the model's own outputs."""
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)
    id: str = ""


@dataclass(frozen=True, slots=True)
class InferResult:
    model: OnnxModel
    id: str
    outputs: dict[str, Array]
    parameters: dict[str, ParameterValue]


class InferenceService:
    def __init__(
        self, repository: ModelRepository, metrics: AgentMetrics, info: ServerInfo
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.info = info

    def model(self, name: str, version: str = "") -> OnnxModel:
        """The model to answer with; raises ModelNotFound."""
        return self.repository.get(name, version)

    def ready(self) -> bool:
        # Every model is loaded and warmed before the server starts, so serving means ready.
        return True

    async def infer(self, request: InferRequest) -> InferResult:
        model = request.model
        model.check_input_names(list(request.inputs))
        model.check_output_names(request.outputs, extra=ROUTING_OUTPUTS)
        items = _batch_size(request.inputs)
        model_metrics = self.metrics.models[model.name]

        started = time.perf_counter()
        prediction = await model.run(request.inputs, items)
        model_metrics.inference_seconds.observe(time.perf_counter() - started)

        confidence = prediction.confidence
        for value in confidence.tolist():
            model_metrics.confidence.observe(value)
        model_metrics.items.inc(items)

        wanted = request.outputs or model.output_names
        outputs: dict[str, Array] = {}
        for name in wanted:
            if name == CONFIDENCE_OUTPUT:
                outputs[name] = confidence.astype(np.float32)
            else:
                outputs[name] = prediction.outputs[name]
        # The batch is as sure as its least sure item.
        parameters: dict[str, ParameterValue] = {
            "route": "edge",
            "confidence": float(confidence.min()),
        }
        return InferResult(model, request.id, outputs, parameters)


def _batch_size(inputs: Mapping[str, Array]) -> int:
    sizes = {name: array.shape[0] if array.ndim else 1 for name, array in inputs.items()}
    distinct = set(sizes.values())
    if len(distinct) > 1:
        listed = ", ".join(f"{name}: {n}" for name, n in sizes.items())
        raise InvalidInput("inputs", f"inputs disagree on the batch size ({listed})", "shape")
    return distinct.pop()
