"""The one table from exceptions to HTTP answers for the agent's REST API, and the errors only
this transport has.

Keyed by exception type, most specific first (an exception's MRO is walked); anything unlisted
is a 500 with a generic message (the details are logged, never sent: they may hold payload
fragments). Bodies are v2 error bodies, `{"error": "<what is wrong>"}`.

UnsupportedMediaType    a body in a form the API does not read (the binary tensor extension)
ForbiddenOrigin         a browser page from an origin not in rest_cors_origins
ForbiddenHost           a Host header that is not this machine's (DNS rebinding)

and, from the rest of the agent: AccessDenied (edge_agent.access) 401, the router's
TicketNotFound 404, TooManyWatchers 503, QueueFull and DiskFull 507, StorageError 503,
model_runtime's errors, and ServiceStopping 503.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.responses import JSONResponse

from edge_agent.access import AccessDenied
from edge_agent.inference import ServiceStopping
from model_runtime import (
    InvalidInput,
    LimitExceeded,
    ModelNotFound,
    RequestTooLarge,
    UnsupportedEncoding,
)
from model_runtime.v2_json import error_body
from router.errors import DiskFull, QueueFull, StorageError, TicketNotFound, TooManyWatchers

__all__ = [
    "STATUS_BY_ERROR",
    "ForbiddenHost",
    "ForbiddenOrigin",
    "HttpError",
    "UnsupportedMediaType",
    "error_response",
    "http_error",
]

log = logging.getLogger(__name__)


class UnsupportedMediaType(Exception):
    def __init__(self, problem: str) -> None:
        super().__init__(problem)


class ForbiddenOrigin(Exception):
    def __init__(self, origin: str) -> None:
        self.origin = origin
        super().__init__(
            f"pages from {origin} may not call this API; the agent's operator can allow them "
            "with rest_cors_origins"
        )


class ForbiddenHost(Exception):
    def __init__(self, host: str) -> None:
        self.host = host
        super().__init__(
            f"Host {host!r} is not this machine; call the agent by its loopback address"
        )


@dataclass(frozen=True, slots=True)
class HttpError:
    """What the transport sends for an error: status, v2 error message, extra headers."""

    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)


STATUS_BY_ERROR: dict[type[Exception], int] = {
    InvalidInput: 400,
    AccessDenied: 401,
    ForbiddenOrigin: 403,
    ForbiddenHost: 403,
    ModelNotFound: 404,
    TicketNotFound: 404,
    RequestTooLarge: 413,
    LimitExceeded: 413,
    UnsupportedEncoding: 415,
    UnsupportedMediaType: 415,
    ServiceStopping: 503,
    # The agent's cap on open result streams, for all callers together (gRPC: RESOURCE_EXHAUSTED).
    TooManyWatchers: 503,
    # The request is fine but cannot be stored for the cloud now (gRPC: RESOURCE_EXHAUSTED).
    QueueFull: 507,
    DiskFull: 507,
    # A write to the state dir failed (an I/O error): nothing was stored (gRPC: UNAVAILABLE).
    StorageError: 503,
}


def _www_authenticate(exc: Exception) -> dict[str, str]:
    # RFC 6750 §3: no error code when the request had no credentials at all.
    assert isinstance(exc, AccessDenied)
    challenge = 'Bearer realm="edge-agent"'
    if exc.reason != "missing":
        challenge += ', error="invalid_token"'
    return {"WWW-Authenticate": challenge}


_HEADERS: dict[type[Exception], Callable[[Exception], dict[str, str]]] = {
    AccessDenied: _www_authenticate,
    # Worth a retry soon: the agent is restarting, or a stream may close meanwhile.
    ServiceStopping: lambda exc: {"Retry-After": "1"},
    TooManyWatchers: lambda exc: {"Retry-After": "5"},
    StorageError: lambda exc: {"Retry-After": "5"},
}


def http_error(exc: Exception, request_id: str = "") -> HttpError:
    """The HTTP answer for `exc`; unknown exceptions become a 500 that reveals nothing."""
    for cls in type(exc).__mro__:
        status = STATUS_BY_ERROR.get(cls)
        if status is not None:
            headers = _HEADERS.get(cls)
            return HttpError(status, str(exc), headers(exc) if headers is not None else {})
    log.error("internal error", exc_info=exc, extra={"fields": {"request_id": request_id or "-"}})
    return HttpError(500, "internal error; see the agent's log")


def error_response(exc: Exception | HttpError, request_id: str = "") -> JSONResponse:
    """The v2 error body for `exc` (or for an HttpError already looked up), with its status and
    headers from the table."""
    error = exc if isinstance(exc, HttpError) else http_error(exc, request_id)
    return JSONResponse(error_body(error.message), error.status, headers=error.headers)
