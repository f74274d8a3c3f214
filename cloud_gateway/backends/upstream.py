"""UpstreamBackend: forward inference to an existing v2 REST server (Triton, KServe, MLServer...).

Every call has one deadline for the whole exchange, so a stalled upstream costs the device at
most `timeout_s` and a 504, never a hang. httpx's errors are translated in one place.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from cloud_gateway.errors import UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from cloud_gateway.offload import JSON_BYTES_PER_VALUE, Offloader
from model_runtime import InvalidInput, ModelNotFound, TensorSpec, json_codec
from model_runtime.v2_json import (
    InferRequest,
    InferResponse,
    ModelSignature,
    decode_infer_response,
    encode_infer_request,
)

__all__ = ["UpstreamBackend"]

OTHER_MODEL = "_other"
_MAX_LABELS = 64


@dataclass(frozen=True, slots=True)
class _Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


class UpstreamBackend:
    name = "upstream"

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 30.0,
        retry_after_s: float = 5.0,
        metadata_ttl_s: float = 60.0,
        offloader: Offloader | None = None,
        client: httpx.AsyncClient | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url
        self._timeout_s = timeout_s
        self._retry_after_s = retry_after_s
        self._metadata_ttl_s = metadata_ttl_s
        self._offload = offloader or Offloader()
        self._monotonic = monotonic
        self._client = client or httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        )
        self._signatures: dict[tuple[str, str], tuple[float, ModelSignature | None]] = {}
        self._labels: set[str] = set()

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        await self._client.aclose()

    @asynccontextmanager
    async def _exchange(self, timeout_s: float | None = None) -> AsyncIterator[None]:
        """Translate httpx's errors, and bound the whole exchange by one deadline."""
        limit = timeout_s or self._timeout_s
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError:
            raise UpstreamTimeout(limit) from None
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                raise UpstreamUnavailable("connection timed out", self._retry_after_s) from exc
            raise UpstreamTimeout(limit) from exc
        except httpx.ConnectError as exc:
            raise UpstreamUnavailable("connection refused", self._retry_after_s) from exc
        except httpx.TransportError as exc:
            raise UpstreamBadResponse(f"connection failed: {type(exc).__name__}") from exc

    def _path(self, name: str, version: str, tail: str = "") -> str:
        path = f"/v2/models/{quote(name, safe='')}"
        if version:
            path += f"/versions/{quote(version, safe='')}"
        return path + tail

    def _check_status(self, response: httpx.Response, name: str, version: str) -> None:
        status = response.status_code
        if status < 300:
            return
        if status == 404:
            raise ModelNotFound(name, version)
        if status in (400, 422):
            raise InvalidInput("request", f"refused by the upstream server: {_message(response)}")
        if status in (429, 503):
            raise UpstreamUnavailable(
                f"HTTP {status}", _retry_after(response) or self._retry_after_s
            )
        raise UpstreamBadResponse(f"HTTP {status}: {_message(response)}")

    async def ready(self) -> bool:
        try:
            async with self._exchange(min(self._timeout_s, 2.0)):
                response = await self._client.get("/v2/health/ready")
        except (UpstreamTimeout, UpstreamUnavailable, UpstreamBadResponse):
            return False
        return response.status_code == 200

    async def model_ready(self, name: str, version: str) -> bool:
        async with self._exchange():
            response = await self._client.get(self._path(name, version, "/ready"))
        if response.status_code == 404:
            raise ModelNotFound(name, version)
        return response.status_code == 200

    async def model_metadata(self, name: str, version: str) -> dict[str, Any]:
        async with self._exchange():
            response = await self._client.get(self._path(name, version))
        self._check_status(response, name, version)
        body = _json(response)
        if not isinstance(body, dict):
            raise UpstreamBadResponse("model metadata is not a JSON object")
        return body

    async def signature(self, name: str, version: str) -> ModelSignature | None:
        """The upstream's declared inputs and outputs, cached; None when it declares none."""
        now = self._monotonic()
        cached = self._signatures.get((name, version))
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            metadata = await self.model_metadata(name, version)
        except UpstreamBadResponse:
            metadata = {}
        signature = _signature(metadata)
        self._signatures[(name, version)] = (now + self._metadata_ttl_s, signature)
        return signature

    async def infer(self, name: str, version: str, request: InferRequest) -> InferResponse:
        def encode() -> bytes:
            return json_codec.dumps(
                encode_infer_request(
                    request.inputs,
                    request_id=request.id,
                    parameters=request.parameters,
                    outputs=request.outputs,
                )
            )

        values = sum(a.size for a in request.inputs.values())
        body = await self._offload.run(values * JSON_BYTES_PER_VALUE, encode)
        async with self._exchange():
            response = await self._client.post(
                self._path(name, version, "/infer"),
                content=body,
                headers={"Content-Type": "application/json"},
            )
        self._check_status(response, name, version)
        answer = response.content
        # Large answers are parsed off the event loop, as the gateway's own requests are.
        decoded = await self._offload.run(len(answer), lambda: _decode(answer))
        if len(self._labels) < _MAX_LABELS:
            self._labels.add(name)
        return decoded

    def served_models(self) -> None:
        return None

    def model_label(self, name: str) -> str:
        return name if name in self._labels else OTHER_MODEL


def _decode(answer: bytes) -> InferResponse:
    try:
        return decode_infer_response(json_codec.loads(answer))
    except (ValueError, UnicodeDecodeError):
        raise UpstreamBadResponse("the answer is not JSON") from None
    except InvalidInput as exc:
        raise UpstreamBadResponse(f"not a v2 inference response ({exc})") from None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UpstreamBadResponse("the answer is not JSON") from None


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:200]
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])[:500]
    return json.dumps(body)[:500]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isascii() and value.isdigit() else None


def _signature(metadata: dict[str, Any]) -> ModelSignature | None:
    """TensorSpecs from v2 metadata, or None unless every input is fully declared."""
    try:
        inputs = tuple(_spec(t) for t in metadata.get("inputs") or [])
        outputs = tuple(_spec(t) for t in metadata.get("outputs") or [])
    except (TypeError, ValueError, KeyError):
        return None
    return _Signature(inputs, outputs) if inputs else None


def _spec(tensor: Any) -> TensorSpec:
    shape = tuple(int(d) for d in tensor["shape"])
    return TensorSpec(str(tensor["name"]), str(tensor["datatype"]), shape)
