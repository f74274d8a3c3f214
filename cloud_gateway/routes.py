"""The v2 REST endpoints: authenticate, limit, decode, call GatewayService, encode.

Errors are raised, not answered here: the handlers in `exception_handlers` turn every one into
a v2 error body through the single table in errors.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cloud_gateway.auth import Authenticator
from cloud_gateway.errors import (
    AuthenticationFailed,
    DeviceBusy,
    GatewayError,
    Overloaded,
    RateLimited,
    http_error,
)
from cloud_gateway.limits import BodyLimits, InFlight, read_body
from cloud_gateway.metrics import GatewayMetrics
from cloud_gateway.offload import Offloader
from cloud_gateway.rate_limit import DeviceRateLimiter
from cloud_gateway.service import GatewayService, InferOutcome, check_idempotency_key
from model_runtime import InvalidInput, LimitExceeded, ModelError, RequestTooLarge
from model_runtime.http_body import parse_json_body
from model_runtime.infer_group import (
    GROUP_EXTENSION,
    HEADER_LENGTH,
    GroupItem,
    encode_group_answer_item,
    join_group_answer,
    split_group_request,
)
from model_runtime.repository import parse_version
from model_runtime.v2_binary import BINARY_EXTENSION, binary_to_json
from model_runtime.v2_json import (
    InferRequest,
    ModelSignature,
    TensorLimits,
    decode_infer_request,
    error_body,
)

log = logging.getLogger("cloud_gateway.requests")

__all__ = ["REPLAYED_HEADER", "V2Routes", "check_group_limits", "exception_handlers"]

REPLAYED_HEADER = "Idempotency-Replayed"

try:
    _VERSION = version("edge-cloud-router")
except PackageNotFoundError:  # running from a source tree that was never installed
    _VERSION = "0"


class V2Routes:
    def __init__(
        self,
        service: GatewayService,
        authenticator: Authenticator,
        limiter: DeviceRateLimiter,
        limits: BodyLimits,
        metrics: GatewayMetrics,
        *,
        tensor_limits: TensorLimits | None = None,
        in_flight: InFlight | None = None,
        offloader: Offloader | None = None,
        openapi: dict[str, Any] | None = None,
    ) -> None:
        self._service = service
        self._auth = authenticator
        self._limiter = limiter
        self._limits = limits
        self._metrics = metrics
        self._tensor_limits = tensor_limits
        self._in_flight = in_flight or InFlight(per_device=2**31, total=2**31)
        self._offload = offloader or Offloader()
        self._openapi = json.dumps(openapi or {}, separators=(",", ":")).encode()

    def routes(self) -> list[Route]:
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        # Inference first: routes are tried in order, and it is nearly all of the traffic.
        return [
            Route(f"{model}/infer", self.infer, methods=["POST"], name="infer"),
            Route(f"{versioned}/infer", self.infer, methods=["POST"], name="infer"),
            Route(
                f"{model}/{GROUP_EXTENSION}", self.infer_group, methods=["POST"], name="infer_group"
            ),
            Route(
                f"{versioned}/{GROUP_EXTENSION}",
                self.infer_group,
                methods=["POST"],
                name="infer_group",
            ),
            Route("/v2/health/live", self.live, name="health_live"),
            Route("/v2/health/ready", self.ready, name="health_ready"),
            Route("/v2", self.server_metadata, name="server_metadata"),
            Route("/openapi.json", self.openapi, name="openapi"),
            Route(model, self.model_metadata, name="model_metadata"),
            Route(versioned, self.model_metadata, name="model_metadata"),
            Route(f"{model}/ready", self.model_ready, name="model_ready"),
            Route(f"{versioned}/ready", self.model_ready, name="model_ready"),
        ]

    async def _device(self, request: Request) -> str:
        """The authenticated device, within its rate."""
        try:
            device = await self._auth.device(request.headers.get("authorization"))
        except AuthenticationFailed as exc:
            self._metrics.auth_failures.labels(exc.reason).inc()
            raise
        try:
            await self._limiter.acquire(device)
        except RateLimited:
            self._metrics.rate_limited.inc()
            raise
        return device

    # -- open endpoints ------------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = await self._service.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def openapi(self, request: Request) -> Response:
        # Open, like the health checks: it describes the API and the limits, never a key.
        return Response(self._openapi, media_type="application/json")

    # -- authenticated endpoints ---------------------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        await self._device(request)
        return JSONResponse(
            {
                "name": "cloud-gateway",
                "version": _VERSION,
                "extensions": [GROUP_EXTENSION, BINARY_EXTENSION],
                # How large a group may be: what clients size their groups by.
                GROUP_EXTENSION: {
                    "max_items": self._max_items,
                    "max_body_bytes": min(
                        self._limits.max_body_bytes, self._limits.max_decompressed_bytes
                    ),
                },
            }
        )

    async def model_metadata(self, request: Request) -> Response:
        await self._device(request)
        name, version = _model(request)
        return JSONResponse(await self._service.model_metadata(name, version))

    async def model_ready(self, request: Request) -> Response:
        await self._device(request)
        name, version = _model(request)
        ready = await self._service.model_ready(name, version)
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    async def infer(self, request: Request) -> Response:
        device = await self._device(request)
        name, version = _model(request)
        key = check_idempotency_key(request.headers.get("idempotency-key"))
        # Counted from before the body is read: a body held in memory is work too.
        # (Refusals counted as _counted_refusals does, without its cost on every request.)
        try:
            with self._in_flight.hold(device):
                outcome = await self._infer(request, device, name, version, key)
        except (LimitExceeded, DeviceBusy, Overloaded) as exc:
            self._count_refusal(exc)
            raise
        headers = {REPLAYED_HEADER: "true"} if outcome.replayed else None
        if log.isEnabledFor(logging.DEBUG):  # one event per call only when asked for
            _log_request(request, 200, model=name, replayed=outcome.replayed)
        return Response(outcome.body, media_type="application/json", headers=headers)

    async def infer_group(self, request: Request) -> Response:
        """The infer_group extension (model_runtime.infer_group): each item as its own infer
        call would be, one answer entry per item. The group is limited as the batch request of
        its items would be: items, values per input and answer bytes over all of them."""
        device = await self._device(request)
        name, version = _model(request)
        with self._counted_refusals(), self._in_flight.hold(device):
            signature = await self._service.signature(name, version)
            body = await self._read_body(request)
            max_items = self._max_items
            parts = split_group_request(body, request.headers.get(HEADER_LENGTH.lower()), max_items)

            def decode() -> list[tuple[InferRequest, bytes] | Exception]:
                return [self._decode_item(part, signature) for part in parts]

            decoded = await self._offload.run(len(body), decode)
            # Items read from binary tensors are fingerprinted as the JSON they stand for.
            parts = [
                p if isinstance(d, Exception) else GroupItem(p.key, d[1])
                for p, d in zip(parts, decoded, strict=True)
            ]
            requests = [d if isinstance(d, Exception) else d[0] for d in decoded]
            check_group_limits(requests, self._tensor_limits)
            outcomes = await self._service.infer_group(
                device, name, version, parts, requests, signature=signature,
                client_gone=request.is_disconnected,
            )  # fmt: skip
        entries = []
        for part, outcome in zip(parts, outcomes, strict=True):
            if isinstance(outcome, Exception):
                error = http_error(outcome)
                self._count_item_refusal(outcome)
                retry = error.headers.get("Retry-After")
                entries.append(
                    encode_group_answer_item(
                        part.key, error.status, error=error.message,
                        retry_after=float(retry) if retry is not None else None,
                    )
                )  # fmt: skip
                self._metrics.child(self._metrics.group_items, str(error.status)).inc()
            else:
                entries.append(encode_group_answer_item(part.key, 200, outcome.body))
                self._metrics.child(self._metrics.group_items, "200").inc()
        if log.isEnabledFor(logging.DEBUG):
            _log_request(request, 200, model=name, items=len(parts))
        return Response(join_group_answer(entries), media_type="application/json")

    def _decode_item(
        self, part: GroupItem, signature: ModelSignature | None
    ) -> tuple[InferRequest, bytes] | Exception:
        try:
            check_idempotency_key(part.key)
            return self._decode(part.body, part.header_bytes, signature)
        except (InvalidInput, LimitExceeded) as exc:
            return exc

    def _count_item_refusal(self, exc: Exception) -> None:
        if isinstance(exc, LimitExceeded):
            self._metrics.child(self._metrics.limit_refusals, exc.limit).inc()

    @property
    def _max_items(self) -> int:
        return self._tensor_limits.max_items if self._tensor_limits is not None else 2**31

    @contextlib.contextmanager
    def _counted_refusals(self) -> Iterator[None]:
        try:
            yield
        except (LimitExceeded, DeviceBusy, Overloaded) as exc:
            self._count_refusal(exc)
            raise

    def _count_refusal(self, exc: LimitExceeded | DeviceBusy | Overloaded) -> None:
        if isinstance(exc, LimitExceeded):
            limit = exc.limit
        else:
            limit = "device_in_flight" if isinstance(exc, DeviceBusy) else "in_flight"
        self._metrics.child(self._metrics.limit_refusals, limit).inc()

    async def _read_body(self, request: Request) -> bytes:
        try:
            body, _ = await read_body(
                request.stream(),
                content_length=request.headers.get("content-length"),
                content_encoding=request.headers.get("content-encoding"),
                limits=self._limits,
            )
        except RequestTooLarge:
            self._metrics.bodies_too_large.inc()
            raise
        except ClientDisconnect:
            raise InvalidInput("body", "the client went away before sending all of it") from None
        return body

    async def _infer(
        self, request: Request, device: str, name: str, version: str, key: str | None
    ) -> InferOutcome:
        # Unknown model: 404 before reading a byte of the body.
        signature = await self._service.signature(name, version)
        body = await self._read_body(request)
        header_length = request.headers.get(HEADER_LENGTH.lower())

        def decode() -> tuple[InferRequest, bytes]:
            return self._decode(body, header_length, signature)

        decoded, as_json = await self._offload.run(len(body), decode)
        return await self._service.infer(
            device, name, version, decoded, body=as_json, idempotency_key=key, signature=signature,
            client_gone=request.is_disconnected,
        )  # fmt: skip

    def _decode(
        self, body: bytes, header_length: str | int | None, signature: ModelSignature | None
    ) -> tuple[InferRequest, bytes]:
        """The request, and the JSON body it is (a binary request read as the JSON it stands
        for: the same request, whichever framing, has the same idempotency fingerprint)."""
        if header_length is not None:
            body = binary_to_json(body, header_length)
        return decode_infer_request(parse_json_body(body), signature, self._tensor_limits), body


def check_group_limits(
    requests: Sequence[InferRequest | Exception], limits: TensorLimits | None
) -> None:
    """A group is limited as the batch of its items would be: LimitExceeded when its items'
    rows, or the values of one input over all items, pass the request limits."""
    if limits is None:
        return
    rows = 0
    values: dict[str, int] = {}
    for request in requests:
        if isinstance(request, Exception):
            continue
        rows += max((a.shape[0] for a in request.inputs.values() if a.ndim), default=1)
        for name, array in request.inputs.items():
            values[name] = values.get(name, 0) + array.size
    if rows > limits.max_items:
        raise LimitExceeded(
            "items", f"{rows} items, over the limit of {limits.max_items} per request",
            "items_per_request",
        )  # fmt: skip
    for name, n in values.items():
        if n > limits.max_elements:
            raise LimitExceeded(
                name, f"{n} values over the group's items, over the limit of "
                f"{limits.max_elements} per tensor", "elements_per_tensor",
            )  # fmt: skip


def _model(request: Request) -> tuple[str, str]:
    version: str = request.path_params.get("version", "")
    parse_version(version)  # refused here for the upstream too, which might read "01" as 1
    return request.path_params["name"], version


def _log_request(request: Request, status: int, **fields: object) -> None:
    # An id of the gateway's own for the line: the device's Idempotency-Key and the body may
    # carry what a clinic entered, so neither is logged, nor the Authorization header.
    log.debug(
        f"{request.method} {request.url.path}",
        extra={"fields": {"request_id": uuid.uuid4().hex[:16], "status": status, **fields}},
    )


async def _error_response(request: Request, exc: Exception) -> Response:
    error = http_error(exc)
    if log.isEnabledFor(logging.DEBUG):
        _log_request(request, error.status)
    return JSONResponse(error_body(error.message), error.status, headers=error.headers)


async def _http_exception(request: Request, exc: Exception) -> Response:
    # Starlette's own refusals (no such path, wrong method) in the v2 error format too.
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        error_body(str(exc.detail)), exc.status_code, headers=dict(exc.headers or {})
    )


def exception_handlers() -> dict[Any, Any]:
    """Starlette handlers: the gateway's and model_runtime's errors, by type, via errors.py."""
    return {
        GatewayError: _error_response,
        ModelError: _error_response,
        HTTPException: _http_exception,
        Exception: _error_response,
    }
