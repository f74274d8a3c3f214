"""The one table from errors to HTTP answers: status, message, and the headers devices obey."""

from __future__ import annotations

import pytest

from cloud_gateway.errors import (
    AuthenticationFailed,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    RateLimited,
    StoreUnavailable,
    UnsupportedEncoding,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
    http_error,
)
from model_runtime import InvalidInput, ModelLoadError, ModelNotFound, RequestTooLarge


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (InvalidInput("X", "bad"), 400),
        (ModelNotFound("nope"), 404),
        (IdempotencyInProgress(3.0), 409),
        (RequestTooLarge(10, 5), 413),
        (UnsupportedEncoding("br"), 415),
        (IdempotencyKeyReused(), 422),
        (RateLimited(0.2), 429),
        (ModelLoadError("m", "broken"), 500),
        (UpstreamBadResponse("HTTP 500"), 502),
        (UpstreamUnavailable("refused", 5.0), 503),
        (StoreUnavailable("redis", "down"), 503),
        (UpstreamTimeout(1.0), 504),
    ],
)
def test_each_error_has_its_status_and_message(exc: Exception, status: int) -> None:
    error = http_error(exc)
    assert error.status == status
    assert error.message == str(exc)


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert http_error(RateLimited(0.2)).headers == {"Retry-After": "1"}
    assert http_error(UpstreamUnavailable("x", 5.5)).headers == {"Retry-After": "6"}
    assert http_error(IdempotencyInProgress(10.0)).headers == {"Retry-After": "10"}


def test_401_says_how_to_authenticate() -> None:
    missing = http_error(AuthenticationFailed("missing"))
    assert missing.status == 401
    assert missing.headers == {"WWW-Authenticate": 'Bearer realm="cloud-gateway"'}
    bad = http_error(AuthenticationFailed("revoked"))
    assert bad.headers["WWW-Authenticate"].endswith('error="invalid_token"')
    # The reason is for metrics only; the caller is not told which check failed.
    assert "revoked" not in bad.message


def test_unknown_errors_reveal_nothing() -> None:
    error = http_error(KeyError("internal detail /secret/path"))
    assert (error.status, error.message, error.headers) == (500, "internal error", {})
