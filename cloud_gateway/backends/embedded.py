"""EmbeddedBackend: the model repository loaded into this process, run with onnxruntime.

A run goes to a worker thread unless it is known to be shorter than the hand-off to one: on
a small machine a thread round trip costs ~100 µs, while the large demo model answers one
image in ~15 µs. Run times are learned per model and batch-size class (powers of two): the
first run of a class goes to a thread, later ones run inline while their average stays under
`inline_budget_s` (one inline run in RETIME_EVERY is timed to keep the average current). With single-threaded sessions a run is timed by the CPU time of the thread
that runs it, wherever it runs: on a busy machine the wall clock also counts the time the
process waited for a core, and would send tiny runs to a thread for nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud_gateway.openapi import ServedModel
from cloud_gateway.worker_threads import run_blocking
from model_runtime import ModelRepository, OnnxModel
from model_runtime.v2_json import InferRequest, InferResponse, ModelSignature, model_metadata

__all__ = ["EmbeddedBackend"]

Array = npt.NDArray[np.generic]

OTHER_MODEL = "_other"
# Inline runs are timed one in this many: the thread's CPU clock is a system call, two of which
# cost a fifth of a tiny model's run, and a run that grows past the budget is still caught
# within this many calls.
RETIME_EVERY = 8


class EmbeddedBackend:
    name = "embedded"

    def __init__(
        self,
        repository: ModelRepository,
        *,
        inline_budget_s: float = 100e-6,
        single_threaded: bool = True,
        perf_counter: Callable[[], float] | None = None,
    ) -> None:
        self._repository = repository
        self._names = frozenset(repository.names())
        self._inline_budget_s = inline_budget_s
        # onnxruntime with more than one intra-op thread runs part of the work on its own
        # threads, which only the wall clock sees.
        self._perf_counter = perf_counter or (
            time.thread_time if single_threaded else time.perf_counter
        )
        # (model, version, batch-size class) -> recent run time in seconds (moving average)
        self._run_s: dict[tuple[str, int, int], float] = {}
        # ... -> inline runs since the last timed one
        self._untimed: dict[tuple[str, int, int], int] = {}

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def ready(self) -> bool:
        # Models are loaded and warmed before the server accepts connections.
        return True

    async def model_ready(self, name: str, version: str) -> bool:
        self._repository.get(name, version)
        return True

    async def model_metadata(self, name: str, version: str) -> dict[str, Any]:
        model = self._repository.get(name, version)
        return model_metadata(
            model.name, self._repository.versions(name), model, platform="onnxruntime_onnx"
        )

    async def signature(self, name: str, version: str) -> ModelSignature | None:
        return self._repository.get(name, version)

    async def infer(self, name: str, version: str, request: InferRequest) -> InferResponse:
        model = self._repository.get(name, version)
        rows = max((a.shape[0] for a in request.inputs.values() if a.ndim), default=1)
        key = (model.name, model.version, int(rows).bit_length())
        expected = self._run_s.get(key)
        if expected is not None and expected < self._inline_budget_s:
            untimed = self._untimed.get(key, 0)
            if untimed < RETIME_EVERY - 1:
                self._untimed[key] = untimed + 1
                outputs = model.outputs_for(request.inputs)
                return self._response(model, outputs, request)
            self._untimed[key] = 0
            start = self._perf_counter()
            outputs = model.outputs_for(request.inputs)
            took = self._perf_counter() - start
        else:
            # onnxruntime blocks (and releases the GIL): a worker thread keeps the loop free.
            outputs, took = await run_blocking(_timed_run, model, request, self._perf_counter)
        self._run_s[key] = took if expected is None else 0.8 * expected + 0.2 * took
        return self._response(model, outputs, request)

    def _response(
        self, model: OnnxModel, outputs: dict[str, Array], request: InferRequest
    ) -> InferResponse:
        if request.outputs is not None:
            outputs = {n: outputs[n] for n in request.outputs}
        return InferResponse(model.name, outputs, str(model.version), request.id)

    def model_label(self, name: str) -> str:
        return name if name in self._names else OTHER_MODEL

    def served_models(self) -> list[ServedModel]:
        served = []
        for name in sorted(self._names):
            newest = self._repository.get(name)
            versions = self._repository.versions(name)
            served.append(ServedModel(name, versions, newest.inputs, newest.outputs))
        return served

    def model(self, name: str, version: str = "") -> OnnxModel:
        return self._repository.get(name, version)


def _timed_run(
    model: OnnxModel, request: InferRequest, clock: Callable[[], float]
) -> tuple[dict[str, Array], float]:
    # CPU time of this thread (single-threaded sessions): what the run would cost the loop,
    # without the time spent waiting for the GIL among busy threads. Inline runs are timed
    # again, so an estimate that proves too low corrects itself.
    start = clock()
    outputs = model.outputs_for(request.inputs)
    return outputs, clock() - start
