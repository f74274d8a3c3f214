"""Helpers of the router's integration tests: configs with short timings, recognisable local
answers, waiting on conditions, reading metrics."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from model_runtime.demo import CLOUD_REPOSITORY
from model_runtime.v2_json import encode_infer_request
from router import (
    DurableQueue,
    LinkState,
    LocalAnswer,
    MonitorConfig,
    RetryPolicy,
    Router,
    RouterConfig,
)
from router.clock import Clock, SystemClock
from router.cloud_client import encode_body
from router.config import QUEUE_FILE

CLOUD_MODEL = "digits-large"
THRESHOLD = 0.5


def fast_config(url: str, key: str, state_dir: Path, **changes: Any) -> RouterConfig:
    """Timings scaled down so outages, probes and expiry play out in a fraction of a second."""
    base = RouterConfig(
        cloud_url=url,
        device_key=key,
        state_dir=state_dir,
        monitor=MonitorConfig(probe_interval_s=0.2, probe_timeout_s=1.0, recent_window_s=1.0),
        live_retry=RetryPolicy(max_attempts=2, backoff_initial_s=0.02, backoff_max_s=0.1),
        drain_retry=RetryPolicy(max_attempts=1, attempt_timeout_s=5.0),
        breaker_failures=1,
        link_backoff_s=0.1,
        link_backoff_cap_s=0.3,
        failure_backoff_s=0.05,
        failure_backoff_cap_s=0.2,
        idle_poll_s=0.2,
        expire_interval_s=0.05,
    )
    return replace(base, **changes)


def body(x: np.ndarray, ticket: str) -> bytes:
    return encode_body(encode_infer_request({"X": x[None, :]}, request_id=ticket))


async def queue_backlog(
    state_dir: Path,
    rows: np.ndarray,
    bad: frozenset[int] = frozenset(),
    clock: Clock | None = None,
) -> list[str]:
    """Items queued while the link was down, as the router queues them; a row in `bad` is
    queued with 60 of its 64 values (a request the cloud model refuses)."""
    queue = await DurableQueue.open(state_dir / QUEUE_FILE, clock=clock or SystemClock())
    tickets = []
    try:
        for i, row in enumerate(rows):
            ticket = str(uuid.uuid4())
            await queue.enqueue(
                ticket, CLOUD_MODEL, body(row[:60] if i in bad else row, ticket), ttl_s=7 * 86400
            )
            tickets.append(ticket)
    finally:
        await queue.close()
    return tickets


def local_answer(confidence: list[float], *, cloud_model: str | None = CLOUD_MODEL) -> LocalAnswer:
    """A local model's answer whose rows are recognisable: probabilities all -1, label -1."""
    n = len(confidence)
    return LocalAnswer(
        outputs={
            "probabilities": np.full((n, 10), -1.0, dtype=np.float32),
            "label": np.full((n,), -1, dtype=np.int64),
        },
        confidence=np.asarray(confidence, dtype=np.float64),
        threshold=THRESHOLD,
        cloud_model=cloud_model,
    )


async def until(
    condition: Callable[[], bool], within_s: float = 10.0, what: str = "condition"
) -> None:
    """Wait on the event loop until `condition()` holds; fail after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.01)


async def link_is(router: Router, *states: LinkState, within_s: float = 10.0) -> None:
    assert router.monitor is not None
    monitor = router.monitor
    await until(lambda: monitor.state in states, within_s, f"link state in {states}")


def metric(router: Router, name: str, **labels: str) -> float:
    value = router.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def cloud_model_answers(x: np.ndarray) -> dict[str, np.ndarray]:
    """The large model run here directly, to compare with what came back through the router."""
    session = ort.InferenceSession(str(CLOUD_REPOSITORY / CLOUD_MODEL / "1" / "model.onnx"))
    label, probabilities = session.run(["label", "probabilities"], {"X": x})
    return {"label": label, "probabilities": probabilities}
