"""One ONNX model version: a warmed onnxruntime session, its tensor specs and its confidence.

Sessions are created and warmed at start-up, never on the request path. `predict` blocks
(onnxruntime releases the GIL while it runs); async callers go through `run_blocking`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from model_runtime.confidence import confidence
from model_runtime.errors import InvalidInput, ModelLoadError
from model_runtime.model_config import ModelConfig
from model_runtime.tensors import DATATYPE_TO_DTYPE, TensorSpec

__all__ = ["OnnxModel", "Prediction"]

Array = npt.NDArray[np.generic]

_WARM_UP_RUNS = 5

# onnxruntime's type strings -> v2 datatype names.
_ORT_TO_DATATYPE = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


@dataclass(slots=True)  # not frozen: made per call (see edge_agent.inference.InferRequest)
class Prediction:
    """The model's outputs for a batch of N items and the confidence of each item."""

    outputs: dict[str, Array]
    confidence: npt.NDArray[np.float64]


def _spec(model: str, arg: ort.NodeArg) -> TensorSpec:
    datatype = _ORT_TO_DATATYPE.get(arg.type)
    if datatype is None:
        raise ModelLoadError(model, f"tensor '{arg.name}' has unsupported type {arg.type}")
    # Symbolic or unknown dimensions (None, 'N', 'batch') are free: -1 in v2 metadata.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


class OnnxModel:
    """A loaded, warmed model version. Thread-safe: onnxruntime sessions allow concurrent runs."""

    def __init__(
        self,
        name: str,
        version: int,
        path: Path,
        config: ModelConfig,
        threads: int = 1,
        inline_budget_s: float = 0.0,
    ) -> None:
        self.name = name
        self.inline_budget_s = inline_budget_s
        self._seconds_per_item = float("inf")
        self.version = version
        self.config = config
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning worker threads burn a core while idle; on a shared 2-core box that costs
        # more than it saves on small models.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
            first_line = (
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            )
            raise ModelLoadError(
                name, f"{path.name} is not a loadable ONNX model: {first_line}"
            ) from None
        self.inputs = tuple(_spec(name, a) for a in self._session.get_inputs())
        self.outputs = tuple(_spec(name, a) for a in self._session.get_outputs())
        self.input_by_name = {spec.name: spec for spec in self.inputs}
        self.output_names = tuple(spec.name for spec in self.outputs)
        self._output_list = list(self.output_names)  # as onnxruntime wants them, made once
        self.scores_output = self.check_config(config)

    def reconfigure(self, config: ModelConfig) -> None:
        """Put a new config in force (after calibration); a config that doesn't fit the graph
        raises ModelLoadError and leaves the old one in force."""
        scores_output = self.check_config(config)
        self.config, self.scores_output = config, scores_output

    def check_config(self, config: ModelConfig) -> str:
        """The output holding class scores under `config`; ModelLoadError if it doesn't fit."""
        scores_output = self._find_scores_output(config)
        classes = next(o for o in self.outputs if o.name == scores_output).shape[-1]
        if config.labels and classes != -1 and len(config.labels) != classes:
            raise ModelLoadError(
                self.name,
                f"config has {len(config.labels)} labels but output "
                f"'{scores_output}' has {classes} classes",
            )
        return scores_output

    def _find_scores_output(self, config: ModelConfig) -> str:
        if config.output is not None:
            if config.output not in self.output_names:
                raise ModelLoadError(
                    self.name,
                    f"config output '{config.output}' is not an output of the graph "
                    f"(outputs: {', '.join(self.output_names)})",
                )
            return config.output
        candidates = [
            o.name
            for o in self.outputs
            if o.datatype in ("FP16", "FP32", "FP64") and len(o.shape) == 2
        ]
        if len(candidates) != 1:
            raise ModelLoadError(
                self.name,
                "cannot tell which output holds the class scores; set `output` in config.toml "
                f"(outputs: {', '.join(self.output_names)})",
            )
        return candidates[0]

    def check_input_names(self, names: Sequence[str]) -> None:
        """Every input given exactly once, none unknown; errors name the input."""
        if len(names) == 1 and len(self.input_by_name) == 1 and names[0] in self.input_by_name:
            return  # the common case, settled without building a set
        seen: set[str] = set()
        for name in names:
            if name not in self.input_by_name:
                raise InvalidInput(
                    name,
                    f"model '{self.name}' has no such input (inputs: {', '.join(self.input_by_name)})",
                    "unknown_input",
                )
            if name in seen:
                raise InvalidInput(name, "input is given more than once", "invalid")
            seen.add(name)
        for name in self.input_by_name:
            if name not in seen:
                raise InvalidInput(
                    name, f"input is missing (model '{self.name}' needs it)", "missing_input"
                )

    def check_output_names(self, names: Sequence[str], extra: Collection[str] = ()) -> None:
        """Requested outputs must be the model's own, or among `extra` (served beside them)."""
        for name in names:
            if name not in self.output_names and name not in extra:
                known = ", ".join((*self.output_names, *extra))
                raise InvalidInput(
                    name,
                    f"model '{self.name}' has no such output (outputs: {known})",
                    "unknown_output",
                )

    def warm_up(self) -> None:
        """Run one item of zeros so the first request does not pay for lazy initialisation."""
        feeds = {
            spec.name: np.zeros([1 if d == -1 else d for d in spec.shape], dtype=_numpy_dtype(spec))
            for spec in self.inputs
        }
        try:
            times = []
            for _ in range(_WARM_UP_RUNS):
                start = time.perf_counter()
                self.predict(feeds)
                times.append(time.perf_counter() - start)
        except Exception as exc:
            raise ModelLoadError(self.name, f"warm-up run failed: {exc}") from None
        # The fastest run, not the median: a busy moment at start-up must not send every
        # later run to a worker thread.
        self._seconds_per_item = min(times)

    async def run(self, inputs: Mapping[str, Array], items: int) -> Prediction:
        """`predict` without holding up the event loop for long.

        A batch whose estimated run time (from the warm-up) is within `inline_budget_s` runs
        on the loop's thread: for a model that answers in tens of microseconds, the hop to a
        worker thread and back costs several times the run itself. Anything longer goes to a
        worker thread, so one big batch never stalls the other callers.
        """
        if self.runs_inline(items):
            return self.predict(inputs)
        return await asyncio.to_thread(self.predict, inputs)

    def runs_inline(self, items: int) -> bool:
        """Whether `run` would run a batch of `items` on the calling thread (see `run`):
        callers on the request path then call `predict` and spare themselves a coroutine."""
        return self._seconds_per_item * items <= self.inline_budget_s

    def predict(self, inputs: Mapping[str, Array]) -> Prediction:
        """Run the model on validated inputs; blocks for the duration of the run."""
        outputs = self.outputs_for(inputs)
        return Prediction(outputs, self.confidence(outputs[self.scores_output]))

    def outputs_for(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """`predict` without the confidence, for callers that only pass the outputs on."""
        # onnxruntime's binding takes a dict and only reads it: no copy when it is one already.
        feeds = inputs if type(inputs) is dict else dict(inputs)
        values = self._session.run(self._output_list, feeds)
        return dict(zip(self.output_names, values, strict=True))

    def confidence(self, scores: Array) -> npt.NDArray[np.float64]:
        c = self.config
        return confidence(scores, c.output_kind, c.confidence_method, c.temperature)

    def describe(self) -> str:
        return f"{self.name}/{self.version}"


def _numpy_dtype(spec: TensorSpec) -> np.dtype[np.generic]:
    return DATATYPE_TO_DTYPE.get(spec.datatype, np.dtype(np.float32))
