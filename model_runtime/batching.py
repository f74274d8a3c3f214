"""Dynamic batching: concurrent requests for one model run as one onnxruntime batch.

As Triton's dynamic batcher: a request waits up to `max_queue_delay_us` for others with the
same input signature (names, datatypes, shape past the first axis) to join it; the batch runs
as soon as it holds `max_batch_size` items or the wait is over, and each request gets its own
rows back. A request with a deadline waits at most half the time it had left. If a batched run
fails, each request of it runs alone, so that an error stays with the request that caused it.

Batching trades exactness for throughput: some operators compute a row differently in a
larger batch (another kernel, another order of summation), so a row's floats may differ in the
last bits from what the same row gives run alone, depending on what else was in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from model_runtime.model_config import BatchingConfig
from model_runtime.onnx_model import OnnxModel, Prediction

__all__ = ["DynamicBatcher"]

Array = npt.NDArray[np.generic]


@dataclass(slots=True)
class _Waiting:
    inputs: Mapping[str, Array]
    items: int
    answer: asyncio.Future[Prediction]


@dataclass(slots=True)
class _Batch:
    members: list[_Waiting] = field(default_factory=list)
    items: int = 0
    due: float = float("inf")
    """Loop time by which it must run."""
    timer: asyncio.TimerHandle | None = None


class DynamicBatcher:
    """Batches the runs of one model. Use from one event loop; `run` is safe to cancel (a
    request cancelled while it waits is left out of its batch)."""

    def __init__(
        self,
        model: OnnxModel,
        config: BatchingConfig,
        on_run: Callable[[int, int], None] = lambda requests, items: None,
    ) -> None:
        """`on_run(requests, items)` is told of every run the batcher makes."""
        self.model = model
        self.config = config
        self.on_run = on_run
        self._delay_s = config.max_queue_delay_us / 1e6
        self._open: dict[Hashable, _Batch] = {}
        self._running: set[asyncio.Task[None]] = set()

    async def run(
        self, inputs: Mapping[str, Array], items: int, time_left_s: float | None = None
    ) -> Prediction:
        """The model's prediction for these inputs, maybe computed in a batch with others."""
        key = _signature(inputs)
        if key is None or items >= self.config.max_batch_size:
            self.on_run(1, items)
            return await self.model.run(inputs, items)
        loop = asyncio.get_running_loop()
        batch = self._open.get(key)
        if batch is not None and batch.items + items > self.config.max_batch_size:
            self._start(key, batch)
            batch = None
        if batch is None:
            batch = self._open[key] = _Batch()
        waiting = _Waiting(inputs, items, loop.create_future())
        batch.members.append(waiting)
        batch.items += items
        wait_s = self._delay_s if time_left_s is None else min(self._delay_s, time_left_s / 2)
        if batch.items >= self.config.max_batch_size or wait_s <= 0:
            self._start(key, batch)
        elif loop.time() + wait_s < batch.due:
            batch.due = loop.time() + wait_s
            if batch.timer is not None:
                batch.timer.cancel()
            batch.timer = loop.call_at(batch.due, self._start, key, batch)
        return await waiting.answer

    def _start(self, key: Hashable, batch: _Batch) -> None:
        if self._open.get(key) is batch:
            del self._open[key]
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.ensure_future(self._run_batch(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_batch(self, batch: _Batch) -> None:
        members = [m for m in batch.members if not m.answer.done()]  # less the cancelled
        if not members:
            return
        if len(members) == 1:
            await self._run_alone(members[0])
            return
        items = sum(m.items for m in members)
        names = list(members[0].inputs)
        joined = {name: np.concatenate([m.inputs[name] for m in members]) for name in names}
        self.on_run(len(members), items)
        try:
            prediction = await self.model.run(joined, items)
        except Exception:
            # Which request made it fail cannot be told from a batch: each runs alone, so that
            # only that one gets the error.
            for member in members:
                await self._run_alone(member)
            return
        if any(np.shape(out)[:1] != (items,) for out in prediction.outputs.values()):
            for member in members:  # an output with no row per item cannot be split
                await self._run_alone(member)
            return
        start = 0
        for member in members:
            end = start + member.items
            rows = {name: out[start:end] for name, out in prediction.outputs.items()}
            _settle(member.answer, Prediction(rows, prediction.confidence[start:end]))
            start = end

    async def _run_alone(self, member: _Waiting) -> None:
        if member.answer.done():
            return
        self.on_run(1, member.items)
        try:
            prediction = await self.model.run(member.inputs, member.items)
        except Exception as exc:
            if not member.answer.done():
                member.answer.set_exception(exc)
            return
        _settle(member.answer, prediction)


def _settle(answer: asyncio.Future[Prediction], prediction: Prediction) -> None:
    if not answer.done():  # its caller may have given up meanwhile
        answer.set_result(prediction)


def _signature(inputs: Mapping[str, Array]) -> Hashable | None:
    """What requests must share to be batched together; None: this one cannot be."""
    if any(array.ndim == 0 for array in inputs.values()):
        return None
    return tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(inputs.items()))
