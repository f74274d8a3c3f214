"""CloudClient: one v2 REST inference call to the cloud, with auth, idempotency, gzip and retries.

The body is compressed once and sent with the same Idempotency-Key on every attempt, so a retry
or a redelivery after a restart never runs the cloud model twice.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote

import httpx

from model_runtime import json_codec
from model_runtime.v2_json import InferResponse, decode_infer_response
from router.clock import Clock, SystemClock
from router.errors import CircuitOpen, CloudError, CloudRejected, CloudUnavailable
from router.retrying import RetryPolicy, parse_retry_after, retry_call

__all__ = [
    "ATTEMPT_OUTCOMES",
    "AttemptRecord",
    "CallObserver",
    "CloudAnswer",
    "CloudClient",
    "CloudTls",
    "encode_body",
]

# The `outcome` of an AttemptRecord is one of these; a bounded set for a metric label.
ATTEMPT_OUTCOMES = (
    "ok",
    "timeout",  # the attempt's time ran out
    "network_error",  # refused, reset, closed early, unreadable stream
    "rate_limited",  # 429
    "unavailable",  # 502, 503, 504
    "server_error",  # 500 and other 5xx: not retried at once
    "rejected",  # other 4xx (and 1xx/3xx): the request itself is refused
    "bad_response",  # 2xx whose body is not a JSON object
    "breaker_open",  # not attempted
)
# How a v2 server marks an answer replayed from its idempotency store: the project's gateway
# sets this response parameter; the header is the common HTTP convention (Stripe and others).
REPLAY_PARAMETER = "idempotent_replay"
REPLAY_HEADER = "Idempotent-Replayed"


@dataclass(frozen=True, slots=True)
class CloudTls:
    """How to check the cloud's certificate and prove this device's, for https:// URLs."""

    ca_file: Path | None = None
    """PEM bundle of the CAs to trust instead of the system's (a private CA)."""
    client_cert: Path | None = None
    """PEM certificate (chain) this device presents (mTLS); with `client_key`."""
    client_key: Path | None = None

    def context(self) -> ssl.SSLContext:
        """An SSL context with these files loaded; OSError or ssl.SSLError if they cannot be."""
        context = ssl.create_default_context(
            cafile=None if self.ca_file is None else str(self.ca_file)
        )
        if self.client_cert is not None:
            context.load_cert_chain(
                str(self.client_cert), None if self.client_key is None else str(self.client_key)
            )
        return context


class CallObserver(Protocol):
    """Who learns from each attempt: the ConnectivityMonitor (and through it the breaker)."""

    def allow_call(self) -> bool: ...

    def record_success(self, rtt_s: float, bytes_transferred: int, seconds: float) -> None: ...

    def record_failure(self, kind: str) -> None: ...

    def record_neutral(self, rtt_s: float | None) -> None: ...


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt, for metrics and the data budget; bytes include request and status lines
    and headers, and bodies as they went on the wire (compressed)."""

    outcome: str
    status: int | None
    seconds: float
    bytes_sent: int
    bytes_received: int


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


def encode_body(body: Mapping[str, Any]) -> bytes:
    """A v2 JSON request (as built by model_runtime.v2_json.encode_infer_request) as bytes;
    ValueError for NaN or infinities."""
    return json_codec.dumps(body)


@dataclass(slots=True)
class _Call:
    """One infer call's fixed request and its running totals over attempts."""

    path: str
    payload: bytes
    headers: dict[str, str]
    sent: int = 0
    received: int = 0
    attempts: int = 0


class _Reply(NamedTuple):
    body: dict[str, Any]
    status: int
    replayed: bool
    rtt_s: float


class CloudClient:
    """Calls a v2 REST server (the cloud gateway or any v2 server) over one kept-alive pool.

    `deadline` arguments are absolute times on `clock.monotonic()`. `on_attempt` is called
    with an AttemptRecord after every attempt (metrics, data budget); `observer` is asked
    before each attempt and told its result (link state, circuit breaker).
    """

    def __init__(
        self,
        base_url: str,
        device_key: str,
        *,
        clock: Clock | None = None,
        retry: RetryPolicy | None = None,
        observer: CallObserver | None = None,
        on_attempt: Callable[[AttemptRecord], None] | None = None,
        compress: bool = True,
        probe_timeout_s: float = 5.0,
        max_connections: int = 4,
        keepalive_expiry_s: float = 60.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`tls`: how https:// connections check the cloud (None: the system's CAs)."""
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not device_key or not device_key.isprintable() or any(c.isspace() for c in device_key):
            raise ValueError("device_key must be non-empty printable text without spaces")
        self._clock = clock or SystemClock()
        self.retry = retry or RetryPolicy()
        self.observer = observer
        self.on_attempt = on_attempt
        self._compress = compress
        self._probe_timeout_s = probe_timeout_s
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {device_key}", "Accept-Encoding": "gzip"},
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=keepalive_expiry_s,
            ),
            trust_env=False,  # a library does not read proxies from the environment
            follow_redirects=False,
            verify=tls if tls is not None else True,
        )

    async def __aenter__(self) -> CloudClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def ready(self) -> bool:
        """GET /v2/health/ready once, without retries: True only for a 200 in time."""
        try:
            async with asyncio.timeout(self._probe_timeout_s):
                response = await self._http.get("/v2/health/ready", timeout=self._probe_timeout_s)
        except (httpx.HTTPError, TimeoutError):
            return False
        return response.status_code == 200

    async def infer(
        self,
        model: str,
        body: Mapping[str, Any] | bytes,
        *,
        idempotency_key: str,
        deadline: float | None = None,
        version: str | None = None,
    ) -> CloudAnswer:
        """POST the v2 request `body` (a JSON object, or its encoded bytes) to the model.

        Raises CloudRejected for a 4xx other than 429, CloudUnavailable when the cloud cannot
        answer in time (CircuitOpen when the breaker holds the call back).
        """
        if not model:
            raise ValueError("model must be a non-empty model name")
        if not (
            0 < len(idempotency_key) <= 255 and all(33 <= ord(c) <= 126 for c in idempotency_key)
        ):
            raise ValueError("idempotency_key must be 1-255 visible ASCII characters")
        payload = body if isinstance(body, bytes) else encode_body(body)
        headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key}
        if self._compress:
            payload = gzip.compress(payload, mtime=0)  # mtime=0: equal bodies, equal bytes
            headers["Content-Encoding"] = "gzip"
        path = f"/v2/models/{quote(model, safe='')}"
        if version is not None:
            path += f"/versions/{quote(version, safe='')}"
        path += "/infer"
        call = _Call(path, payload, headers)
        started = self._clock.monotonic()

        async def attempt(limit_s: float) -> _Reply:
            return await self._attempt(call, limit_s)

        reply = await retry_call(attempt, policy=self.retry, clock=self._clock, deadline=deadline)
        return CloudAnswer(
            body=reply.body,
            status=reply.status,
            replayed=reply.replayed,
            bytes_sent=call.sent,
            bytes_received=call.received,
            rtt_s=reply.rtt_s,
            seconds=self._clock.monotonic() - started,
            attempts=call.attempts,
        )

    async def _attempt(self, call: _Call, limit_s: float) -> _Reply:
        observer = self.observer
        if observer is not None and not observer.allow_call():
            self._emit(AttemptRecord("breaker_open", None, 0.0, 0, 0))
            raise CircuitOpen()
        call.attempts += 1
        request = self._http.build_request(
            "POST", call.path, content=call.payload, headers=call.headers, timeout=limit_s
        )
        sent = _request_bytes(request, len(call.payload))
        start = self._clock.monotonic()
        try:
            async with asyncio.timeout(limit_s):
                response = await self._http.send(request, stream=True)
                try:
                    rtt = self._clock.monotonic() - start
                    raw = await response.aread()
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TimeoutException) as error:
            self._settle(call, "timeout", None, start, sent, 0, None)
            raise CloudUnavailable(f"cloud call timed out after {limit_s:.2f} s") from error
        except httpx.RequestError as error:
            sent = 0 if isinstance(error, httpx.ConnectError) else sent
            self._settle(call, "network_error", None, start, sent, 0, None)
            raise CloudUnavailable(f"cloud unreachable: {type(error).__name__}: {error}") from error
        except asyncio.CancelledError:
            if observer is not None:
                observer.record_neutral(None)  # no verdict: free a half-open probe slot
            raise
        kind, outcome = self._read(response, raw)
        self._settle(call, kind, response.status_code, start, sent, _response_bytes(response), rtt)
        if isinstance(outcome, CloudError):
            raise outcome
        params = outcome.get("parameters")
        replayed = response.headers.get(REPLAY_HEADER, "").lower() == "true" or (
            isinstance(params, Mapping) and params.get(REPLAY_PARAMETER) is True
        )
        return _Reply(outcome, response.status_code, replayed, rtt)

    def _read(
        self, response: httpx.Response, raw: bytes
    ) -> tuple[str, dict[str, Any] | CloudError]:
        """The attempt's outcome label, and the answer or the error to raise."""
        status = response.status_code
        if 200 <= status < 300:
            parsed = _json_object(raw)
            if parsed is None:
                return "bad_response", CloudUnavailable(
                    "cloud answered 2xx with a body that is not a JSON object", status=status
                )
            return "ok", parsed
        retry_after = parse_retry_after(response.headers.get("Retry-After"), self._clock.wall())
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

    def _settle(
        self,
        call: _Call,
        kind: str,
        status: int | None,
        start: float,
        sent: int,
        received: int,
        rtt: float | None,
    ) -> None:
        """Count the attempt, report it to `on_attempt`, and give the observer its verdict."""
        seconds = self._clock.monotonic() - start
        call.sent += sent
        call.received += received
        self._emit(AttemptRecord(kind, status, seconds, sent, received))
        if self.observer is None:
            return
        if kind == "ok":
            self.observer.record_success(rtt or 0.0, sent + received, seconds)
        elif kind in ("rate_limited", "rejected"):  # the cloud is there; nothing is learnt
            self.observer.record_neutral(rtt)
        else:
            self.observer.record_failure(kind)

    def _emit(self, record: AttemptRecord) -> None:
        if self.on_attempt is not None:
            self.on_attempt(record)


def _request_bytes(request: httpx.Request, body_bytes: int) -> int:
    line = len(request.method) + len(request.url.raw_path) + len(" HTTP/1.1\r\n") + 1
    return line + sum(len(k) + len(v) + 4 for k, v in request.headers.raw) + 2 + body_bytes


def _response_bytes(response: httpx.Response) -> int:
    line = len("HTTP/1.1 200 \r\n") + len(response.reason_phrase)
    headers = sum(len(k) + len(v) + 4 for k, v in response.headers.raw) + 2
    return line + headers + response.num_bytes_downloaded


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
