"""GatewayService: a checked v2 request in, the v2 JSON answer out, the model run at most once
per device and Idempotency-Key. Knows nothing of HTTP; routes.py wraps it.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloud_gateway.backends.base import Backend
from cloud_gateway.errors import (
    ClientGone,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    StoreFull,
    StoreUnavailable,
    UpstreamError,
)
from cloud_gateway.idempotency import ClientCheck, IdempotencyGuard, scope_id
from cloud_gateway.metrics import GatewayMetrics
from cloud_gateway.offload import JSON_BYTES_PER_VALUE, Offloader
from model_runtime import InvalidInput, LimitExceeded, OutputNotFinite, json_codec
from model_runtime.infer_group import GroupItem
from model_runtime.v2_json import (
    InferRequest,
    ModelSignature,
    answer_bytes_bound,
    encode_infer_response,
)

__all__ = ["REPLAY_PARAMETER", "GatewayService", "InferOutcome", "check_idempotency_key"]

# Response parameter set on a replayed answer, so aware clients can tell; plain ones ignore it.
REPLAY_PARAMETER = "idempotent_replay"
_MAX_KEY_LENGTH = 255
_KEY = re.compile(rf"[\x21-\x7e]{{1,{_MAX_KEY_LENGTH}}}")


@dataclass(frozen=True, slots=True)
class InferOutcome:
    body: bytes
    """The v2 JSON response body."""
    replayed: bool


def check_idempotency_key(key: str | None) -> str | None:
    """The key if it is usable: 1-255 visible ASCII characters (the device's request id)."""
    if key is None:
        return None
    if not _KEY.fullmatch(key):
        raise InvalidInput(
            "Idempotency-Key", f"must be 1-{_MAX_KEY_LENGTH} visible ASCII characters"
        )
    return key


def _dumps(body: dict[str, Any]) -> bytes:
    # Compact: every byte counts on the devices' links. NaN is not JSON.
    return json_codec.dumps(body)


class GatewayService:
    def __init__(
        self,
        backend: Backend,
        guard: IdempotencyGuard,
        metrics: GatewayMetrics,
        *,
        max_answer_bytes: int = 1024 * 1024,
        offloader: Offloader | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self._guard = guard
        self._metrics = metrics
        self._max_answer_bytes = max_answer_bytes
        self._offload = offloader or Offloader()
        self._monotonic = monotonic

    @contextmanager
    def _upstream_errors(self) -> Iterator[None]:
        try:
            yield
        except UpstreamError as exc:
            self._metrics.upstream_errors.labels(exc.kind).inc()
            raise

    async def signature(self, name: str, version: str) -> ModelSignature | None:
        # On every request: a plain try costs less than the context manager.
        try:
            return await self.backend.signature(name, version)
        except UpstreamError as exc:
            self._metrics.upstream_errors.labels(exc.kind).inc()
            raise

    async def model_metadata(self, name: str, version: str) -> dict[str, Any]:
        with self._upstream_errors():
            return await self.backend.model_metadata(name, version)

    async def model_ready(self, name: str, version: str) -> bool:
        with self._upstream_errors():
            return await self.backend.model_ready(name, version)

    async def ready(self) -> bool:
        """Whether the backend can serve and the idempotency store answers."""
        if not await self.backend.ready():
            return False
        try:
            await self._guard.store.ping()
        except StoreUnavailable:
            return False
        return True

    async def infer(
        self,
        device: str,
        name: str,
        version: str,
        request: InferRequest,
        *,
        body: bytes,
        idempotency_key: str | None,
        signature: ModelSignature | None = None,
        client_gone: ClientCheck | None = None,
    ) -> InferOutcome:
        """Run `request` (decoded from `body`), or replay the stored answer to its key.

        Raises LimitExceeded, before the model runs, when the answer `signature` declares could
        be larger than `max_answer_bytes`; after it, when the answer is. Raises ClientGone,
        without a run, when a duplicate waited for its key and `client_gone()` is then true.
        """
        self._check_answer_bound(signature, request)

        async def run() -> bytes:
            return await self._run(name, version, request)

        if idempotency_key is None:
            return InferOutcome(await run(), replayed=False)
        # The same key must come with the same request: same model, version and bytes.
        fingerprint = hashlib.sha256(f"{name}\n{version}\n".encode() + body).hexdigest()
        label = self.backend.model_label(name)
        try:
            outcome = await self._guard.run(
                scope_id(device, idempotency_key), fingerprint, run, client_gone=client_gone
            )
        except IdempotencyKeyReused:
            self._metrics.idempotency_refusals.labels("key_reused").inc()
            raise
        except IdempotencyInProgress:
            self._metrics.idempotency_refusals.labels("in_progress").inc()
            raise
        except StoreFull:
            self._metrics.idempotency_refusals.labels("store_full").inc()
            raise
        except ClientGone:
            self._metrics.idempotency_refusals.labels("client_gone").inc()
            raise
        if not outcome.stored:
            self._metrics.child(self._metrics.unstored_answers, label).inc()
        if not outcome.replayed:
            return InferOutcome(outcome.body, replayed=False)
        self._metrics.child(self._metrics.replays, label).inc()
        replay = outcome.body
        return InferOutcome(
            await self._offload.run(len(replay), lambda: _mark_replay(replay)), True
        )

    async def infer_group(
        self,
        device: str,
        name: str,
        version: str,
        items: Sequence[GroupItem],
        requests: Sequence[InferRequest | Exception],
        *,
        signature: ModelSignature | None = None,
        client_gone: ClientCheck | None = None,
    ) -> list[InferOutcome | Exception]:
        """Each item as `infer` would answer it alone (run once per key, or replayed), all at
        once so their idempotency writes share commits; an item's failure is its own outcome.
        `client_gone`: the group's client, asked by any item that had to wait.

        Raises LimitExceeded, before any model runs, when the items' answers together could be
        larger than `max_answer_bytes` (the answer to a group is one HTTP answer)."""
        valid = [r for r in requests if not isinstance(r, Exception)]
        bounds = [self._answer_bound(signature, r) for r in valid]
        if (
            all(b is not None for b in bounds)
            and sum(b or 0 for b in bounds) > self._max_answer_bytes
        ):
            raise LimitExceeded(
                "items",
                f"the answers of {len(valid)} items could take {sum(b or 0 for b in bounds)} "
                f"bytes, over the limit of {self._max_answer_bytes} (max_answer_bytes); "
                "send fewer items per group",
                "answer_bytes",
            )

        async def one(
            item: GroupItem, request: InferRequest | Exception
        ) -> InferOutcome | Exception:
            if isinstance(request, Exception):
                return request
            try:
                return await self.infer(
                    device, name, version, request, body=item.body, idempotency_key=item.key,
                    signature=signature, client_gone=client_gone,
                )  # fmt: skip
            except Exception as exc:  # the item's own failure; the others go on
                return exc

        return list(
            await asyncio.gather(*(one(i, r) for i, r in zip(items, requests, strict=True)))
        )

    def _answer_bound(self, signature: ModelSignature | None, request: InferRequest) -> int | None:
        if signature is None:
            return None
        rows = max((a.shape[0] for a in request.inputs.values() if a.ndim), default=1)
        return answer_bytes_bound(signature.outputs, rows, request.outputs)

    def _check_answer_bound(self, signature: ModelSignature | None, request: InferRequest) -> None:
        bound = self._answer_bound(signature, request)
        if bound is not None and bound > self._max_answer_bytes:
            rows = max((a.shape[0] for a in request.inputs.values() if a.ndim), default=1)
            raise LimitExceeded(
                "outputs",
                f"the answer for {rows} items could take {bound} bytes, over the limit of "
                f"{self._max_answer_bytes} (max_answer_bytes); send fewer items per request",
                "answer_bytes",
            )

    async def _run(self, name: str, version: str, request: InferRequest) -> bytes:
        start = self._monotonic()
        label = self.backend.model_label(name)
        try:
            response = await self.backend.infer(name, version, request)
        except Exception as exc:
            if isinstance(exc, UpstreamError):
                self._metrics.upstream_errors.labels(exc.kind).inc()
            self._metrics.child(self._metrics.model_runs, label, "error").inc()
            raise
        m = self._metrics
        label = self.backend.model_label(name)  # upstream mode learns names from answers
        for output, array in response.outputs.items():
            if array.dtype.kind in "fc" and not np.isfinite(array).all():
                m.child(m.model_runs, label, "not_finite").inc()
                raise OutputNotFinite(response.model_name, output)
        m.child(m.model_runs, label, "ok").inc()
        m.child(m.model_run_duration, label).observe(self._monotonic() - start)

        def encode() -> bytes:
            return _dumps(
                encode_infer_response(
                    response.model_name,
                    response.outputs,
                    model_version=response.model_version,
                    request_id=request.id if request.id is not None else response.id,
                    parameters=response.parameters,
                )
            )

        values = sum(a.size for a in response.outputs.values())
        answer = await self._offload.run(values * JSON_BYTES_PER_VALUE, encode)
        if len(answer) > self._max_answer_bytes:
            # Only when the outputs' shapes were not declared: otherwise refused before the run.
            raise LimitExceeded(
                "outputs",
                f"the answer takes {len(answer)} bytes, over the limit of "
                f"{self._max_answer_bytes} (max_answer_bytes)",
                "answer_bytes",
            )
        return answer


def _mark_replay(body: bytes) -> bytes:
    document = json_codec.loads(body)
    document.setdefault("parameters", {})[REPLAY_PARAMETER] = True
    return _dumps(document)
