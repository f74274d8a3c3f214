"""CloudClient: one v2 REST inference call to the cloud, with auth, idempotency, gzip and retries.

The body is compressed once and sent with the same Idempotency-Key on every attempt, so a retry
or a redelivery after a restart never runs the cloud model twice. Every exchange, probes
included, reserves its bytes in the data budget before it starts and settles what it took.

What counts as a byte here: the HTTP/1.1 messages as they go on the wire, request and status
lines, headers, chunk framing and bodies as sent (gzip), counted from what httpx writes and
reads. TCP/IP and TLS framing and the TLS handshake are below what the client can see, and not
counted. An answer is reserved at the size of the largest recent one from its endpoint; one
whose Content-Length does not fit what is left is not read (the connection is closed), and one
without a length is read while it fits, so only that last read (at most 64 KiB) can pass it.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import ssl
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote

import httpx

from model_runtime import json_codec
from model_runtime.infer_group import (
    GROUP_CONTENT_TYPE,
    GROUP_EXTENSION,
    HEADER_LENGTH,
    GroupItem,
    encode_group_request,
)
from model_runtime.v2_binary import json_to_binary
from model_runtime.v2_json import InferResponse, decode_infer_response
from router.budget import Reservation
from router.clock import Clock, SystemClock
from router.errors import BudgetExhausted, CircuitOpen, CloudError, CloudRejected, CloudUnavailable
from router.link_check import failure_cause
from router.pacing import RequestPacer
from router.retrying import RetryPolicy, parse_retry_after, retry_call

__all__ = [
    "ATTEMPT_OUTCOMES",
    "AttemptRecord",
    "ByteBudget",
    "CallObserver",
    "CloudAnswer",
    "CloudClient",
    "CloudTls",
    "encode_body",
]

log = logging.getLogger(__name__)

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
    "cancelled",  # the caller went away mid-attempt
    "budget",  # not attempted, or its answer left unread: the data budget would be overspent
)
# How a v2 server marks an answer replayed from its idempotency store: the project's gateway
# sets this response parameter; the header is the common HTTP convention (Stripe and others).
REPLAY_PARAMETER = "idempotent_replay"
REPLAY_HEADER = "Idempotent-Replayed"
PROBE_PATH = "/v2/health/ready"
SERVER_PATH = "/v2"
_ANSWER_GUESS = 1024
"""An answer's bytes (status line, headers, body) until one from that endpoint was measured."""


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

    def record_failure(self, kind: str, cause: str | None = None) -> None: ...

    def record_neutral(self, rtt_s: float | None) -> None: ...


class ByteBudget(Protocol):
    """Where exchanges reserve and settle their bytes: the DataBudget."""

    def reserve(self, n_bytes: int) -> Reservation: ...

    def grow(self, reservation: Reservation, n_bytes: int) -> None: ...

    def settle(self, reservation: Reservation, used_bytes: int) -> None: ...


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt, for metrics; bytes include request and status lines and headers, and
    bodies as they went on the wire (compressed)."""

    outcome: str
    status: int | None
    seconds: float
    bytes_sent: int
    bytes_received: int
    probe: bool = False
    """A readiness probe (GET /v2/health/ready), not an inference call."""


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
    method: str = "POST"
    sent: int = 0
    received: int = 0
    attempts: int = 0


@dataclass(slots=True)
class _Exchange:
    """One HTTP exchange's bytes: its request's (known before it is sent; counted once httpx
    began writing it) and what has been read of the answer; the answer may grow only within
    the reservation."""

    request_bytes: int
    reservation: Reservation | None
    writing: bool = False
    received: int = 0

    @property
    def sent(self) -> int:
        # A request cut off while being written is counted whole: a budget may over-count,
        # never under-count.
        return self.request_bytes if self.writing else 0

    @property
    def used(self) -> int:
        return self.sent + self.received

    async def trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpcore's `trace` extension: tells whether the request started going out (not if
        it waited for a connection that never came)."""
        if event.startswith("http11.send_request_headers."):
            self.writing = True

    def expect(self, budget: ByteBudget | None, received: int) -> None:
        """The answer will have taken `received` bytes: grow the reservation to cover them, or
        raise BudgetExhausted (the rest of the answer is then left unread)."""
        if self.reservation is None or budget is None:
            return
        over = self.request_bytes + received - self.reservation.n_bytes
        if over > 0:
            budget.grow(self.reservation, over)


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
        budget: ByteBudget | None = None,
        pacer: RequestPacer | None = None,
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
        self.budget = budget
        self.pacer = pacer
        self._compress = compress
        # The largest recent answers per endpoint: what the next answer there is reserved at.
        self._answers: dict[str, deque[int]] = {}
        self._probe_timeout_s = probe_timeout_s
        self._key_refused = False
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
        # Every byte is paid for on a metered link: httpx's Accept: */* and Connection:
        # keep-alive say what HTTP/1.1 means anyway, and no server reads its User-Agent (70
        # bytes of every request's ~500).
        for name in ("Accept", "Connection", "User-Agent"):
            self._http.headers.pop(name, None)

    async def __aenter__(self) -> CloudClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def ready(self) -> bool:
        """GET /v2/health/ready once, without retries: True only for a 200 in time.

        Raises BudgetExhausted, without sending, when the probe's bytes do not fit the budget:
        that says nothing of the link."""
        try:
            return await self.check_ready()
        except CloudUnavailable:
            return False

    async def check_ready(self) -> bool:
        """Like `ready`, but a failure raises CloudUnavailable, caused by what went wrong
        (router.link_check.failure_cause reads it), so the monitor can say why."""
        request = self._http.build_request("GET", PROBE_PATH, timeout=self._probe_timeout_s)
        exchange = self._open_exchange(PROBE_PATH, request, 0, probe=True)
        start = self._clock.monotonic()
        status: int | None = None
        outcome = "network_error"
        try:
            async with asyncio.timeout(self._probe_timeout_s):
                response, _, _ = await self._exchange(request, exchange)
            status = response.status_code
            outcome = "ok" if status == 200 else "unavailable"
        except (httpx.TimeoutException, TimeoutError) as error:
            outcome = "timeout"
            raise CloudUnavailable("probe timed out") from error
        except httpx.HTTPError as error:
            raise CloudUnavailable(f"probe failed: {type(error).__name__}") from error
        except BudgetExhausted:  # the answer was larger than the budget could take
            outcome = "budget"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._close_exchange(PROBE_PATH, exchange, outcome, status, start, probe=True)
        if status != 200:
            why = "not ready" if status is not None else "its answer did not fit the data budget"
            raise CloudUnavailable(why, status=status)
        return True

    def _open_exchange(
        self, endpoint: str, request: httpx.Request, body_bytes: int, *, probe: bool = False
    ) -> _Exchange:
        """Reserve the request's bytes and the endpoint's expected answer; BudgetExhausted if
        they do not fit (counted as a `budget` attempt, nothing sent)."""
        exchange = _Exchange(_request_bytes(request, body_bytes), None)
        request.extensions["trace"] = exchange.trace
        if self.budget is not None:
            answers = self._answers.get(endpoint)
            expected = max(answers) if answers else _ANSWER_GUESS
            try:
                exchange.reservation = self.budget.reserve(exchange.request_bytes + expected)
            except BudgetExhausted:
                self._emit(AttemptRecord("budget", None, 0.0, 0, 0, probe))
                raise
        return exchange

    async def _exchange(
        self, request: httpx.Request, exchange: _Exchange
    ) -> tuple[httpx.Response, bytes, float]:
        """Send, then read the answer while it fits the reservation: the response, its body
        (decoded) and the time to its headers."""
        start = self._clock.monotonic()
        response = await self._http.send(request, stream=True)
        rtt = self._clock.monotonic() - start
        head = _response_head_bytes(response)
        # A chunked answer's framing is counted from the pieces h11 hands over: one per chunk,
        # or more when a chunk arrives split, which can only over-count.
        chunked = "chunked" in response.headers.get("Transfer-Encoding", "").lower()
        framing = 0
        try:
            exchange.received = head
            length = response.headers.get("Content-Length", "")
            exchange.expect(
                self.budget, head + (int(length) if length.isascii() and length.isdigit() else 0)
            )
            parts = []
            async for piece in response.aiter_raw():
                parts.append(piece)
                framing += len(f"{len(piece):x}\r\n\r\n") if chunked else 0
                exchange.expect(self.budget, head + response.num_bytes_downloaded + framing)
            framing += len("0\r\n\r\n") if chunked else 0
            return response, _decoded(b"".join(parts), response), rtt
        finally:
            exchange.received = head + response.num_bytes_downloaded + framing
            await response.aclose()

    def _close_exchange(
        self,
        endpoint: str,
        exchange: _Exchange,
        outcome: str,
        status: int | None,
        start: float,
        *,
        probe: bool = False,
    ) -> AttemptRecord:
        """Settle the reservation with what the exchange took, learn its answer's size, and
        report the attempt."""
        if exchange.reservation is not None and self.budget is not None:
            self.budget.settle(exchange.reservation, exchange.used)
        if status is not None and outcome != "budget":  # an answer read whole
            self._answers.setdefault(endpoint, deque(maxlen=32)).append(exchange.received)
        seconds = self._clock.monotonic() - start
        record = AttemptRecord(outcome, status, seconds, exchange.sent, exchange.received, probe)
        self._emit(record)
        return record

    async def infer(
        self,
        model: str,
        body: Mapping[str, Any] | bytes,
        *,
        idempotency_key: str,
        deadline: float | None = None,
        version: str | None = None,
        binary: bool = False,
    ) -> CloudAnswer:
        """POST the v2 request `body` (a JSON object, or its encoded bytes) to the model;
        `binary`: its tensors as their own bytes (the v2 binary tensor extension), for a cloud
        that lists it.

        Raises CloudRejected for a 4xx other than 429, CloudUnavailable when the cloud cannot
        answer in time (CircuitOpen when the breaker holds the call back).
        """
        _check_key(idempotency_key)
        payload = body if isinstance(body, bytes) else encode_body(body)
        headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key}
        if binary:
            payload, header_length = json_to_binary(payload)
            headers["Content-Type"] = GROUP_CONTENT_TYPE
            headers[HEADER_LENGTH] = str(header_length)
        return await self._call(
            "POST", _model_path(model, version, "infer"), payload, headers, deadline
        )

    async def infer_group(
        self,
        model: str,
        items: Sequence[GroupItem],
        *,
        deadline: float | None = None,
        version: str | None = None,
        binary: bool = False,
    ) -> CloudAnswer:
        """POST `items` (v2 JSON bodies, each under its Idempotency-Key) as one request of the
        infer_group extension (model_runtime.infer_group), their tensors as bytes if `binary`.
        The answer's `body` is the group's answer: read it with `decode_group_answer`. Raises
        as `infer` does for the group."""
        if not items:
            raise ValueError("items: a group needs at least one item")
        for item in items:
            _check_key(item.key)
        if binary:
            items = [GroupItem(i.key, *json_to_binary(i.body)) for i in items]
        payload, header_length = encode_group_request(items)
        headers = {"Content-Type": GROUP_CONTENT_TYPE, HEADER_LENGTH: str(header_length)}
        path = _model_path(model, version, GROUP_EXTENSION)
        return await self._call("POST", path, payload, headers, deadline)

    async def server_metadata(self, *, deadline: float | None = None) -> dict[str, Any]:
        """GET /v2: the server's name, version and `extensions` (what it can do beyond v2)."""
        answer = await self._call("GET", SERVER_PATH, b"", {}, deadline)
        return answer.body

    async def _call(
        self,
        method: str,
        path: str,
        payload: bytes,
        headers: dict[str, str],
        deadline: float | None,
    ) -> CloudAnswer:
        if payload and self._compress:
            payload = gzip.compress(payload, mtime=0)  # mtime=0: equal bodies, equal bytes
            headers["Content-Encoding"] = "gzip"
        call = _Call(path, payload, headers, method)
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
        if self.pacer is not None:  # RateLimited if the rate would start it too late
            now = self._clock.monotonic()
            limit_s -= await self.pacer.acquire(latest=now + limit_s - self.retry.min_attempt_s)
        request = self._http.build_request(
            call.method, call.path, content=call.payload or None, headers=call.headers,
            timeout=limit_s,
        )  # fmt: skip
        exchange = self._open_exchange(call.path, request, len(call.payload))
        start = self._clock.monotonic()
        observer = self.observer
        if observer is not None and not observer.allow_call():
            self._close_exchange(call.path, exchange, "breaker_open", None, start)
            raise CircuitOpen()
        call.attempts += 1
        try:
            async with asyncio.timeout(limit_s):
                response, raw, rtt = await self._exchange(request, exchange)
        except BudgetExhausted:
            self._finish(call, exchange, "budget", None, start, None)
            raise
        except (TimeoutError, httpx.TimeoutException) as error:
            self._finish(call, exchange, "timeout", None, start, None)
            raise CloudUnavailable(f"cloud call timed out after {limit_s:.2f} s") from error
        except httpx.RequestError as error:
            cause = failure_cause(error)
            self._finish(call, exchange, "network_error", None, start, None, cause)
            raise CloudUnavailable(f"cloud unreachable: {type(error).__name__}: {error}") from error
        except asyncio.CancelledError:
            self._finish(call, exchange, "cancelled", None, start, None)
            raise
        kind, outcome = self._read(response, raw)
        self._finish(call, exchange, kind, response.status_code, start, rtt)
        if isinstance(outcome, CloudError):
            if self.pacer is not None and outcome.retry_after is not None and kind != "rejected":
                self.pacer.hold(outcome.retry_after, rate_limited=kind == "rate_limited")
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

    def _finish(
        self,
        call: _Call,
        exchange: _Exchange,
        kind: str,
        status: int | None,
        start: float,
        rtt: float | None,
        cause: str | None = None,
    ) -> None:
        """Settle and report the attempt, add it to the call's totals, and give the observer
        its verdict."""
        record = self._close_exchange(call.path, exchange, kind, status, start)
        call.sent += record.bytes_sent
        call.received += record.bytes_received
        self._watch_key(status)
        if self.observer is None:
            return
        if kind == "ok":
            self.observer.record_success(rtt or 0.0, exchange.used, record.seconds)
        elif kind in ("rate_limited", "rejected"):  # the cloud is there; nothing is learnt
            self.observer.record_neutral(rtt)
        elif kind in ("budget", "cancelled"):  # no verdict: free a half-open probe slot
            self.observer.record_neutral(None)
        else:
            self.observer.record_failure(kind, cause or (f"http {status}" if status else kind))

    def _watch_key(self, status: int | None) -> None:
        """One line when the cloud starts refusing the device key (401, 403), one when it
        takes it again: not one per call."""
        if status in (401, 403) and not self._key_refused:
            self._key_refused = True
            log.warning(
                "the cloud refuses this device's key (http %d): escalations fail and wait in "
                "the queue; check device_key_file or issue a new key",
                status,
            )
        elif status is not None and 200 <= status < 300 and self._key_refused:
            self._key_refused = False
            log.info("the cloud accepts this device's key again")

    def _emit(self, record: AttemptRecord) -> None:
        if self.on_attempt is not None:
            self.on_attempt(record)


def _check_key(key: str) -> None:
    if not (0 < len(key) <= 255 and all(33 <= ord(c) <= 126 for c in key)):
        raise ValueError("idempotency_key must be 1-255 visible ASCII characters")


def _model_path(model: str, version: str | None, action: str) -> str:
    if not model:
        raise ValueError("model must be a non-empty model name")
    path = f"/v2/models/{quote(model, safe='')}"
    if version is not None:
        path += f"/versions/{quote(version, safe='')}"
    return f"{path}/{action}"


def _request_bytes(request: httpx.Request, body_bytes: int) -> int:
    line = len(request.method) + len(request.url.raw_path) + len(" HTTP/1.1\r\n") + 1
    return line + sum(len(k) + len(v) + 4 for k, v in request.headers.raw) + 2 + body_bytes


def _response_head_bytes(response: httpx.Response) -> int:
    """The status line and headers as h11 parsed them: `HTTP/1.1 200 OK`, `name: value`."""
    line = len(f"{response.http_version} {response.status_code} \r\n") + len(response.reason_phrase)
    return line + sum(len(k) + len(v) + 4 for k, v in response.headers.raw) + 2


def _decoded(raw: bytes, response: httpx.Response) -> bytes:
    """The body without its Content-Encoding (gzip is all the client asks for); an encoding
    that cannot be undone leaves nothing, which reads as a bad answer."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    try:
        if encoding in ("gzip", "x-gzip"):
            return gzip.decompress(raw)
        if encoding == "deflate":
            return zlib.decompress(raw)
    except (OSError, EOFError, zlib.error):
        return b""
    return raw if encoding in ("", "identity") else b""


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
