"""What the cloud's answer to a call means: the attempt's outcome label, the error a refusal
raises, whether the answer was replayed, and CloudAnswer, what a successful call returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import httpx

from model_runtime import json_codec
from model_runtime.v2_json import InferResponse, decode_infer_response
from router.clock import Clock
from router.errors import CloudError, CloudRejected, CloudUnavailable
from router.retrying import parse_retry_after

__all__ = ["REPLAY_HEADER", "REPLAY_PARAMETER", "CloudAnswer", "Reply", "read_answer"]

# How a v2 server marks an answer replayed from its idempotency store: the project's gateway
# sets this response parameter; the header is the common HTTP convention (Stripe and others).
REPLAY_PARAMETER = "idempotent_replay"
REPLAY_HEADER = "Idempotent-Replayed"


@dataclass(frozen=True, slots=True)
class CloudAnswer:
    """The cloud's answer to one request; byte counts cover every attempt of the call."""

    body: dict[str, Any]
    status: int
    replayed: bool
    """The gateway returned a stored answer for this Idempotency-Key instead of running again."""
    bytes_sent: int
    bytes_received: int
    rtt_s: float
    """The successful attempt's time from sending to the response headers."""
    seconds: float
    """The whole call, retries and waits included."""
    attempts: int

    @property
    def parameters(self) -> dict[str, Any]:
        params = self.body.get("parameters")
        return dict(params) if isinstance(params, Mapping) else {}

    def response(self) -> InferResponse:
        """The body decoded into numpy outputs (raises model_runtime.InvalidInput if malformed)."""
        return decode_infer_response(self.body)


class Reply(NamedTuple):
    """One successful attempt's answer."""

    body: dict[str, Any]
    status: int
    replayed: bool
    rtt_s: float


def read_answer(
    response: httpx.Response, raw: bytes, rtt_s: float, clock: Clock
) -> tuple[str, Reply | CloudError]:
    """The attempt's outcome label (one of ATTEMPT_OUTCOMES), and the reply or the error to
    raise; `clock` dates a Retry-After given as a date."""
    status = response.status_code
    if 200 <= status < 300:
        parsed = _json_object(raw)
        if parsed is None:
            return "bad_response", CloudUnavailable(
                "cloud answered 2xx with a body that is not a JSON object", status=status
            )
        params = parsed.get("parameters")
        replayed = response.headers.get(REPLAY_HEADER, "").lower() == "true" or (
            isinstance(params, Mapping) and params.get(REPLAY_PARAMETER) is True
        )
        return "ok", Reply(parsed, status, replayed, rtt_s)
    retry_after = parse_retry_after(response.headers.get("Retry-After"), clock.wall())
    message = f"cloud answered {status}: {_error_text(raw)}"
    if status == 429:
        kind = "rate_limited"
    elif status in (502, 503, 504):
        kind = "unavailable"
    elif 500 <= status < 600:
        kind = "server_error"
    else:
        return "rejected", CloudRejected(message, status=status, retry_after=retry_after)
    return kind, CloudUnavailable(message, status=status, retry_after=retry_after)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        parsed = json_codec.loads(raw)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _error_text(raw: bytes) -> str:
    """The v2 error body's message ({"error": "..."}), or the start of the raw body."""
    text = (_json_object(raw) or {}).get("error")
    if not isinstance(text, str):
        text = raw[:200].decode("utf-8", errors="replace")
    return text[:200] or "(empty body)"
