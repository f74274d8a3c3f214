"""The Open Inference Protocol (KServe v2) over REST: decode, call InferenceService, encode.

The same service and the same checks as the gRPC servicer; a `Request-Timeout` header (seconds)
plays the part of the gRPC deadline.
"""

from __future__ import annotations

import math
import time

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_agent import __version__
from edge_agent.inference import InferenceService
from edge_agent.metrics import AgentMetrics
from edge_agent.request_log import log_infer, logging_calls
from edge_agent.rest.auth import caller_of
from edge_agent.rest.convert import decode_infer_request, encode_infer_result
from edge_agent.rest.errors import UnsupportedMediaType, error_response, http_error
from model_runtime import InvalidInput, json_codec
from model_runtime.http_body import BodyLimits, parse_json_body, read_body
from model_runtime.v2_json import model_metadata

__all__ = ["TIMEOUT_HEADER", "V2Routes"]

TIMEOUT_HEADER = "Request-Timeout"
"""The caller's latency budget in seconds, as the gRPC deadline is on the other transport."""

# tritonclient.http and Triton put a binary tensor section after a JSON header of this length.
_BINARY_HEADER = "inference-header-content-length"
_JSON = "application/json"


class V2Routes:
    def __init__(
        self, service: InferenceService, metrics: AgentMetrics, limits: BodyLimits
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.limits = limits

    def routes(self) -> list[Route]:
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        # Inference first: routes are tried in order, and it is nearly all of the traffic.
        return [
            Route(f"{model}/infer", self.infer, methods=["POST"], name="infer"),
            Route(f"{versioned}/infer", self.infer, methods=["POST"], name="infer"),
            Route("/v2/health/live", self.live, name="health_live"),
            Route("/v2/health/ready", self.ready, name="health_ready"),
            Route("/v2", self.server_metadata, name="server_metadata"),
            Route(model, self.model_metadata, name="model_metadata"),
            Route(versioned, self.model_metadata, name="model_metadata"),
            Route(f"{model}/ready", self.model_ready, name="model_ready"),
            Route(f"{versioned}/ready", self.model_ready, name="model_ready"),
        ]

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        # Not ready once the drain before a stop has begun, as gRPC's ServerReady says.
        ready = self.service.ready()
        return JSONResponse({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        info = self.service.info
        return JSONResponse(
            {
                "name": info.name,
                "version": info.version or __version__,
                "extensions": list(info.extensions),
            }
        )

    async def model_metadata(self, request: Request) -> Response:
        try:
            model = self.service.model(*_model(request))
        except Exception as exc:
            return error_response(exc)
        versions = self.service.repository.versions(model.name)
        return JSONResponse(model_metadata(model.name, versions, model, "onnxruntime_onnx"))

    async def model_ready(self, request: Request) -> Response:
        # v2 REST: the status is the answer, 200 for ready and 4xx (here 404) for not.
        try:
            model = self.service.model(*_model(request))
        except Exception as exc:
            return error_response(exc)
        return JSONResponse({"name": model.name, "ready": True})

    async def infer(self, request: Request) -> Response:
        started = time.perf_counter()
        name, version = _model(request)
        request_id = ""
        self.metrics.in_flight += 1
        try:
            time_left = _time_left(request.headers.get(TIMEOUT_HEADER))
            if _BINARY_HEADER in request.headers:
                raise UnsupportedMediaType(
                    "the binary tensor extension is not supported; send each tensor's values "
                    "as JSON `data` (tritonclient.http: binary_data=False)"
                )
            model = self.service.model(name, version)  # 404 before reading a byte of the body
            body = await self._read(request)
            time_left = time_left and time_left - _since(started)
            decoded = decode_infer_request(
                parse_json_body(body), model, time_left, caller_of(request)
            )
            request_id = decoded.id
            result = await self.service.infer(decoded)
            content = json_codec.dumps(encode_infer_result(result))
        except Exception as exc:
            return self._fail(exc, name, request_id)
        finally:
            self.metrics.in_flight -= 1
        elapsed = _since(started)
        self.metrics.models[model.name].request_seconds.observe(elapsed)
        if logging_calls():
            log_infer(request_id, model.name, "200", elapsed, result.parameters.get("route"))
        return Response(content, media_type=_JSON)

    async def _read(self, request: Request) -> bytes:
        try:
            body, _ = await read_body(
                request.stream(),
                content_length=request.headers.get("content-length"),
                content_encoding=request.headers.get("content-encoding"),
                limits=self.limits,
            )
        except ClientDisconnect:
            raise InvalidInput("body", "the client went away before sending all of it") from None
        return body

    def _fail(self, exc: Exception, model: str, request_id: str) -> Response:
        error = http_error(exc, request_id)
        if isinstance(exc, InvalidInput):
            self.metrics.invalid_requests.labels(self.metrics.model_label(model), exc.kind).inc()
        if logging_calls():
            log_infer(request_id, model, str(error.status), None, None, error.message)
        return error_response(error)


def _model(request: Request) -> tuple[str, str]:
    return request.path_params["name"], request.path_params.get("version", "")


def _since(started: float) -> float:
    return time.perf_counter() - started


def _time_left(header: str | None) -> float | None:
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidInput(TIMEOUT_HEADER, f"must be a number of seconds above 0, got {header!r}")
    return seconds
