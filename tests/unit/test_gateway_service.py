"""GatewayService without HTTP: the real model and SQLite store, replays marked and counted."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from cloud_gateway.backends import EmbeddedBackend
from cloud_gateway.backends.embedded import RETIME_EVERY
from cloud_gateway.errors import UpstreamTimeout, http_error
from cloud_gateway.idempotency import IdempotencyGuard, SqliteIdempotencyStore
from cloud_gateway.metrics import GatewayMetrics
from cloud_gateway.service import GatewayService, check_idempotency_key
from model_runtime import InvalidInput, ModelRepository, OutputNotFinite
from model_runtime.demo import CLOUD_REPOSITORY, HELDOUT
from model_runtime.v2_json import InferRequest, InferResponse, decode_infer_request

REPOSITORY = ModelRepository.load(CLOUD_REPOSITORY)


class Parts:
    def __init__(self, tmp_path: Path, backend: EmbeddedBackend | None = None) -> None:
        self.registry = CollectorRegistry()
        self.backend = backend or EmbeddedBackend(REPOSITORY)
        self.service = GatewayService(
            self.backend,
            IdempotencyGuard(SqliteIdempotencyStore(tmp_path / "idem.sqlite3")),
            GatewayMetrics(self.registry),
        )

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def request(rows: slice = slice(0, 3)) -> tuple[InferRequest, bytes]:
    x = np.load(HELDOUT)["X"][rows]
    body = {
        "id": "r-1",
        "inputs": [
            {"name": "X", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ],
    }
    text = json.dumps(body).encode()
    return decode_infer_request(json.loads(text), REPOSITORY.get("digits-large")), text


async def test_answers_match_the_model_and_replays_are_marked(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    decoded, body = request()
    first = await parts.service.infer(
        "clinic-1", "digits-large", "", decoded, body=body, idempotency_key="k"
    )
    answer = json.loads(first.body)
    expected = REPOSITORY.get("digits-large").predict(decoded.inputs).outputs["label"]
    assert answer["id"] == "r-1"
    assert answer["outputs"][0]["data"] == expected.tolist()
    assert "parameters" not in answer

    again = await parts.service.infer(
        "clinic-1", "digits-large", "", decoded, body=body, idempotency_key="k"
    )
    replay = json.loads(again.body)
    assert again.replayed
    assert replay["parameters"] == {"idempotent_replay": True}
    assert replay["outputs"] == answer["outputs"]
    assert parts.metric("cloud_gateway_model_runs_total", model="digits-large", outcome="ok") == 1
    assert parts.metric("cloud_gateway_idempotent_replays_total", model="digits-large") == 1


async def test_without_a_key_every_request_runs(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    decoded, body = request()
    for _ in range(3):
        outcome = await parts.service.infer(
            "clinic-1", "digits-large", "", decoded, body=body, idempotency_key=None
        )
        assert not outcome.replayed
    assert parts.metric("cloud_gateway_model_runs_total", model="digits-large", outcome="ok") == 3


async def test_requested_outputs_only(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    decoded, body = request()
    narrowed = InferRequest(decoded.inputs, decoded.id, {}, ("probabilities",))
    outcome = await parts.service.infer(
        "clinic-1", "digits-large", "1", narrowed, body=body, idempotency_key=None
    )
    answer = json.loads(outcome.body)
    assert [o["name"] for o in answer["outputs"]] == ["probabilities"]
    assert answer["model_version"] == "1"


async def test_upstream_failures_are_counted_by_kind(tmp_path: Path) -> None:
    class TimingOut(EmbeddedBackend):
        async def infer(self, name: str, version: str, request: InferRequest) -> InferResponse:
            raise UpstreamTimeout(1.0)

    parts = Parts(tmp_path, TimingOut(REPOSITORY))
    decoded, body = request()
    with pytest.raises(UpstreamTimeout):
        await parts.service.infer(
            "clinic-1", "digits-large", "", decoded, body=body, idempotency_key="k"
        )
    assert parts.metric("cloud_gateway_upstream_errors_total", kind="timeout") == 1
    assert (
        parts.metric("cloud_gateway_model_runs_total", model="digits-large", outcome="error") == 1
    )


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "tab\tkey", "naïve"])
def test_idempotency_keys_are_checked(key: str) -> None:
    with pytest.raises(InvalidInput) as err:
        check_idempotency_key(key)
    assert err.value.field == "Idempotency-Key"


def test_usual_idempotency_keys_pass() -> None:
    assert check_idempotency_key(None) is None
    for key in ["0b1c5a8e-3f7d-4c1e-9a2b-6d5e4f3a2b1c", "site-7:queue:1234", "x" * 255]:
        assert check_idempotency_key(key) == key


class _NanBackend(EmbeddedBackend):
    """The real model's answer with one value made NaN, as finite inputs far outside its
    training range make it (FP32 pixels of 3e38 overflow its softmax)."""

    async def infer(self, name: str, version: str, request: InferRequest) -> InferResponse:
        answer = await super().infer(name, version, request)
        probabilities = answer.outputs["probabilities"].copy()
        probabilities[0, 0] = np.nan
        return InferResponse(
            answer.model_name, {**answer.outputs, "probabilities": probabilities}, "1", answer.id
        )


async def test_an_answer_with_nan_is_refused_and_counted_not_stored(tmp_path: Path) -> None:
    # Found by the gateway's schema fuzzing (issue 13): encoding the answer raised ValueError,
    # a 500 whose traceback closed the connection.
    parts = Parts(tmp_path, _NanBackend(REPOSITORY))
    decoded, body = request()
    for _ in range(2):  # nothing is stored: a repeat runs (and is refused) again
        with pytest.raises(OutputNotFinite) as err:
            await parts.service.infer(
                "clinic-1", "digits-large", "", decoded, body=body, idempotency_key="nan"
            )
    assert "'probabilities'" in str(err.value)
    assert http_error(err.value).status == 422
    labels = {"model": "digits-large"}
    assert parts.metric("cloud_gateway_model_runs_total", **labels, outcome="not_finite") == 2
    assert parts.metric("cloud_gateway_model_runs_total", **labels, outcome="ok") == 0


class SteppingClock:
    """A run timer whose every reading is `step` seconds after the last; it notes whether the
    event loop's thread read it (an inline run) or a worker thread (a run off the loop)."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.now = 0.0
        self.on_loop: list[bool] = []

    def __call__(self) -> float:
        self.on_loop.append(threading.current_thread() is threading.main_thread())
        self.now += self.step
        return self.now


async def test_tiny_runs_stay_inline_timed_one_in_eight_and_a_slower_one_leaves() -> None:
    clock = SteppingClock(10e-6)
    backend = EmbeddedBackend(REPOSITORY, inline_budget_s=100e-6, perf_counter=clock)
    decoded, _ = request(slice(0, 1))
    await backend.infer("digits-large", "", decoded)
    assert clock.on_loop == [False, False]  # the first run of its size: in a thread, timed
    for _ in range(16):
        await backend.infer("digits-large", "", decoded)
    assert clock.on_loop[2:] == [True] * 4  # 16 inline runs, 2 of them timed
    clock.step = 1e-3  # the model got slower: the next timed run finds out
    for _ in range(RETIME_EVERY + 1):
        await backend.infer("digits-large", "", decoded)
    assert clock.on_loop[-2:] == [False, False]  # and the run after it goes to a thread
