"""Errors the gateway's core raises, and the one table that turns any error into an HTTP answer.

GatewayError
├── AuthenticationFailed    no, malformed, unknown or revoked device key
├── InvalidDeviceName       `keys add` got a name it cannot store
├── RateLimited             the device is over its request rate
├── DeviceBusy              the device has too many requests in flight already
├── Overloaded              the worker has too many requests in flight already
├── IdempotencyKeyReused    the same Idempotency-Key came with a different request
├── IdempotencyInProgress   a duplicate waited too long for the first request to finish
├── ClientGone              a duplicate's client went away while it waited; nothing was run
├── StoreUnavailable        the idempotency store (SQLite or Redis) cannot be reached
├── StoreFull               the idempotency store holds its cap of answers, none expired
└── UpstreamError           the upstream v2 server gave no usable answer
    ├── UpstreamUnavailable refused the connection, or answered 503 / 429
    ├── UpstreamTimeout     no answer within the configured time
    └── UpstreamBadResponse an answer that is not a v2 response, or another 5xx

The errors carry facts (a reason, a retry delay), never status codes: `http_error` maps them,
with model_runtime's errors (ModelNotFound, InvalidInput, RequestTooLarge, LimitExceeded,
UnsupportedEncoding, OutputNotFinite), by type.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from model_runtime import (
    InvalidInput,
    LimitExceeded,
    ModelError,
    ModelNotFound,
    OutputNotFinite,
    RequestTooLarge,
    UnsupportedEncoding,
)

__all__ = [
    "CLIENT_CLOSED_REQUEST",
    "AuthenticationFailed",
    "ClientGone",
    "DeviceBusy",
    "GatewayError",
    "HttpError",
    "IdempotencyInProgress",
    "IdempotencyKeyReused",
    "InvalidDeviceName",
    "Overloaded",
    "RateLimited",
    "StoreFull",
    "StoreUnavailable",
    "UnsupportedEncoding",
    "UpstreamBadResponse",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "http_error",
]


class GatewayError(Exception):
    """Base of every error the gateway raises."""


class AuthenticationFailed(GatewayError):
    """`reason` is one of missing, malformed, unknown, revoked: for metrics, never for the caller."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__("a valid device key is required: Authorization: Bearer <key>")


class InvalidDeviceName(GatewayError):
    def __init__(self, device: str, problem: str) -> None:
        self.device = device
        super().__init__(f"device name {device!r}: {problem}")


class RateLimited(GatewayError):
    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__("too many requests from this device; slow down")


class DeviceBusy(GatewayError):
    def __init__(self, limit: int, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            f"this device already has {limit} requests in flight (max_in_flight_per_device); "
            "wait for their answers"
        )


class Overloaded(GatewayError):
    def __init__(self, limit: int, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the gateway already has {limit} requests in flight (max_in_flight); retry later"
        )


class IdempotencyKeyReused(GatewayError):
    def __init__(self) -> None:
        super().__init__(
            "Idempotency-Key was already used for a different request; use a new key per request"
        )


class IdempotencyInProgress(GatewayError):
    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__("a request with this Idempotency-Key is still being processed")


class ClientGone(GatewayError):
    def __init__(self) -> None:
        super().__init__(
            "the client went away while this request waited for an earlier one with its "
            "Idempotency-Key; it was not run"
        )


class StoreUnavailable(GatewayError):
    def __init__(self, store: str, problem: str, retry_after_s: float = 5.0) -> None:
        self.store = store
        self.retry_after_s = retry_after_s
        super().__init__(f"idempotency store ({store}) is unavailable: {problem}")


class StoreFull(GatewayError):
    def __init__(self, limit_bytes: int, retry_after_s: float) -> None:
        self.limit_bytes = limit_bytes
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the idempotency store holds its limit of {limit_bytes} bytes of answers "
            "(idempotency_max_bytes) and none has expired yet; retry later"
        )


class UpstreamError(GatewayError):
    """The upstream inference server did not produce an answer we can pass on."""

    kind = "error"


class UpstreamUnavailable(UpstreamError):
    kind = "unavailable"

    def __init__(self, problem: str, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"upstream inference server is unavailable: {problem}")


class UpstreamTimeout(UpstreamError):
    kind = "timeout"

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(f"upstream inference server did not answer within {timeout_s:g} s")


class UpstreamBadResponse(UpstreamError):
    kind = "bad_response"

    def __init__(self, problem: str) -> None:
        super().__init__(f"upstream inference server failed: {problem}")


# -- the HTTP table ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpError:
    """What the transport sends for an error: status, v2 error message, extra headers."""

    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)


def _retry_after(seconds: float) -> dict[str, str]:
    # RFC 9110 §10.2.3: delay-seconds is a non-negative integer; round up so a device that
    # obeys it is not refused again.
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _www_authenticate(exc: Exception) -> dict[str, str]:
    # RFC 6750 §3: no error code when the request had no credentials at all.
    assert isinstance(exc, AuthenticationFailed)
    if exc.reason == "missing":
        return {"WWW-Authenticate": 'Bearer realm="cloud-gateway"'}
    return {"WWW-Authenticate": 'Bearer realm="cloud-gateway", error="invalid_token"'}


def _retry_header(exc: Exception) -> dict[str, str]:
    return _retry_after(getattr(exc, "retry_after_s", 1.0))


_Headers = Callable[[Exception], dict[str, str]] | None

CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a request whose client closed the connection: nobody reads it, but the
gateway's metrics and logs show what became of the request."""

# Keyed by exception type; the most specific entry on the exception's MRO wins.
_TABLE: dict[type[Exception], tuple[int, _Headers]] = {
    InvalidInput: (400, None),
    AuthenticationFailed: (401, _www_authenticate),
    ModelNotFound: (404, None),
    IdempotencyInProgress: (409, _retry_header),
    RequestTooLarge: (413, None),
    LimitExceeded: (413, None),
    UnsupportedEncoding: (415, None),
    IdempotencyKeyReused: (422, None),
    # The request is well formed, but the model cannot answer it in JSON: the device's
    # forwarder ends such a ticket as rejected rather than sending it again and again.
    OutputNotFinite: (422, None),
    ClientGone: (CLIENT_CLOSED_REQUEST, None),
    RateLimited: (429, _retry_header),
    DeviceBusy: (429, _retry_header),
    Overloaded: (503, _retry_header),
    StoreFull: (503, _retry_header),
    InvalidDeviceName: (400, None),
    ModelError: (500, None),
    UpstreamBadResponse: (502, None),
    UpstreamError: (502, None),
    StoreUnavailable: (503, _retry_header),
    UpstreamUnavailable: (503, _retry_header),
    UpstreamTimeout: (504, None),
}


def http_error(exc: Exception) -> HttpError:
    """The HTTP answer for any exception; unknown ones become a 500 that reveals nothing."""
    for cls in type(exc).__mro__:
        entry = _TABLE.get(cls)
        if entry is not None:
            status, headers = entry
            extra = headers(exc) if headers is not None else {}
            return HttpError(status, str(exc), extra)
    return HttpError(500, "internal error")
