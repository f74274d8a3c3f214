"""DynamicBatcher on the real demo model: who shares a run, what each request gets back, and
that cancellation, deadlines and errors stay with their own request.

Requests are made concurrent by starting them in the same turn of the event loop, and the
batches are filled by count with a long queue delay, so nothing here depends on how fast the
machine runs the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from model_runtime import ModelRepository
from model_runtime.batching import DynamicBatcher
from model_runtime.demo import EDGE_REPOSITORY
from model_runtime.model_config import BatchingConfig
from model_runtime.onnx_model import OnnxModel, Prediction

X = np.load(Path(EDGE_REPOSITORY).parent / "heldout.npz")["X"].astype(np.float32)
LONG = 1_000_000  # µs: 1 s, the longest delay allowed; batches here fill by count


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    return ModelRepository.load(EDGE_REPOSITORY).get("digits")


def batcher(model: OnnxModel, size: int, runs: list[tuple[int, int]]) -> DynamicBatcher:
    config = BatchingConfig(max_batch_size=size, max_queue_delay_us=LONG)
    return DynamicBatcher(model, config, lambda requests, items: runs.append((requests, items)))


async def test_concurrent_requests_share_one_run_and_each_gets_its_own_rows(
    model: OnnxModel,
) -> None:
    runs: list[tuple[int, int]] = []
    b = batcher(model, 6, runs)
    rows = [X[0:1], X[1:3], X[3:4], X[4:6]]  # 1 + 2 + 1 + 2 items: 6 fill the batch
    answers = await asyncio.gather(*(b.run({"X": r}, len(r)) for r in rows))
    assert runs == [(4, 6)]
    together = model.predict({"X": np.concatenate(rows)})
    start = 0
    for r, answer in zip(rows, answers, strict=True):
        alone = model.predict({"X": r})
        end = start + len(r)
        # Its own rows of the batched run, exactly; the same classes as run alone.
        for name, out in answer.outputs.items():
            np.testing.assert_array_equal(out, together.outputs[name][start:end])
        np.testing.assert_array_equal(answer.outputs["label"], alone.outputs["label"])
        np.testing.assert_allclose(
            answer.outputs["probabilities"], alone.outputs["probabilities"], rtol=1e-5
        )
        np.testing.assert_array_equal(answer.confidence, together.confidence[start:end])
        start = end


async def test_a_request_as_large_as_a_batch_runs_alone(model: OnnxModel) -> None:
    runs: list[tuple[int, int]] = []
    answer = await batcher(model, 4, runs).run({"X": X[:4]}, 4)
    assert runs == [(1, 4)]
    np.testing.assert_array_equal(
        answer.outputs["label"], model.predict({"X": X[:4]}).outputs["label"]
    )


async def test_a_cancelled_request_is_left_out_of_its_batch(model: OnnxModel) -> None:
    runs: list[tuple[int, int]] = []
    b = batcher(model, 3, runs)
    gone = asyncio.ensure_future(b.run({"X": X[:1]}, 1))
    await asyncio.sleep(0)  # it waits in the batch now
    gone.cancel()
    answers = await asyncio.gather(b.run({"X": X[1:2]}, 1), b.run({"X": X[2:3]}, 1))
    assert gone.cancelled()
    assert runs == [(2, 2)]
    assert [int(a.outputs["label"][0]) for a in answers] == [
        int(model.predict({"X": X[i : i + 1]}).outputs["label"][0]) for i in (1, 2)
    ]


async def test_a_request_with_a_deadline_waits_half_its_time_at_most(model: OnnxModel) -> None:
    runs: list[tuple[int, int]] = []
    b = batcher(model, 16, runs)  # nobody else comes: only the deadline ends the wait
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await asyncio.wait_for(b.run({"X": X[:1]}, 1, time_left_s=0.2), timeout=0.9)
    assert loop.time() - started < 0.9, "it did not wait the full second of the delay"
    assert runs == [(1, 1)]
    assert answer.outputs["label"].shape == (1,)


class _FailsOnRow:
    """A model whose run fails whenever a given row is in its batch: the one fake here, since
    a real onnxruntime session fails on no valid input."""

    def __init__(self, model: OnnxModel, poison: float) -> None:
        self.model = model
        self.poison = poison

    async def run(self, inputs: Mapping[str, np.ndarray], items: int) -> Prediction:
        if np.any(inputs["X"][:, 0] == self.poison):
            raise RuntimeError("this row breaks the model")
        return self.model.predict(inputs)


async def test_a_failing_batch_runs_each_request_alone_so_the_error_stays_with_its_own(
    model: OnnxModel,
) -> None:
    runs: list[tuple[int, int]] = []
    poisoned = X[:1].copy()
    poisoned[0, 0] = 99.0
    config = BatchingConfig(max_batch_size=3, max_queue_delay_us=LONG)
    fake = _FailsOnRow(model, 99.0)
    b = DynamicBatcher(fake, config, lambda r, i: runs.append((r, i)))  # type: ignore[arg-type]
    results = await asyncio.gather(
        b.run({"X": X[1:2]}, 1), b.run({"X": poisoned}, 1), b.run({"X": X[2:3]}, 1),
        return_exceptions=True,
    )  # fmt: skip
    assert isinstance(results[1], RuntimeError)
    assert all(isinstance(r, Prediction) for r in (results[0], results[2]))
    assert runs == [(3, 3), (1, 1), (1, 1), (1, 1)]  # the failed batch, then each alone
