"""CloudClient: one v2 REST inference call to the cloud, with auth, idempotency, gzip and retries.

The body is compressed once and sent with the same Idempotency-Key on every attempt, so a retry
or a redelivery after a restart never runs the cloud model twice. A CloudRequest is that body
built ahead (pure CPU work: a caller may build it, and read the answer, on a thread of its
own). Every exchange, probes included, reserves its bytes in the data budget before it starts
and settles what it took (router.cloud_session says what a byte is); router.cloud_answers reads
what came back.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol
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
from router.clock import Clock, SystemClock
from router.cloud_answers import CloudAnswer, Reply, read_answer
from router.cloud_session import (
    ATTEMPT_OUTCOMES,
    AttemptRecord,
    ByteBudget,
    CloudSession,
    CloudTls,
    Exchange,
)
from router.errors import BudgetExhausted, CircuitOpen, CloudError, CloudUnavailable
from router.link_check import failure_cause
from router.pacing import RequestPacer
from router.retrying import RetryPolicy, retry_call

__all__ = [
    "ATTEMPT_OUTCOMES",
    "AttemptRecord",
    "ByteBudget",
    "CallObserver",
    "CloudAnswer",
    "CloudClient",
    "CloudRequest",
    "CloudTls",
    "encode_body",
]

log = logging.getLogger(__name__)

PROBE_PATH = "/v2/health/ready"
SERVER_PATH = "/v2"


class CallObserver(Protocol):
    """Who learns from each attempt: the ConnectivityMonitor (and through it the breaker)."""

    def allow_call(self) -> bool: ...

    def record_success(self, rtt_s: float, bytes_transferred: int, seconds: float) -> None: ...

    def record_failure(self, kind: str, cause: str | None = None) -> None: ...

    def record_neutral(self, rtt_s: float | None) -> None: ...


def encode_body(body: Mapping[str, Any]) -> bytes:
    """A v2 JSON request (as built by model_runtime.v2_json.encode_infer_request) as bytes;
    ValueError for NaN or infinities."""
    return json_codec.dumps(body)


@dataclass(frozen=True, slots=True)
class CloudRequest:
    """A call's request as it goes on the wire, every attempt the same: its body final (binary
    tensors, group framing and gzip done), so its length is the body's bytes on the wire."""

    method: str
    path: str
    payload: bytes
    headers: Mapping[str, str]


def infer_request(
    model: str,
    body: Mapping[str, Any] | bytes,
    *,
    idempotency_key: str,
    version: str | None = None,
    binary: bool = False,
    compress: bool = True,
) -> CloudRequest:
    """The request of `CloudClient.infer` (which says what the arguments mean); ValueError for
    a bad key or model name."""
    _check_key(idempotency_key)
    payload = body if isinstance(body, bytes) else encode_body(body)
    headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key}
    if binary:
        payload, header_length = json_to_binary(payload)
        headers.update(_framed_headers(header_length))
    return _finished("POST", _model_path(model, version, "infer"), payload, headers, compress)


def group_request(
    model: str,
    items: Sequence[GroupItem],
    *,
    version: str | None = None,
    binary: bool = False,
    compress: bool = True,
) -> CloudRequest:
    """One request of the infer_group extension (model_runtime.infer_group) for `items` (v2
    JSON bodies, each under its Idempotency-Key), their tensors as bytes if `binary`. The
    answer's `body` is the group's answer: read it with `decode_group_answer`. ValueError for
    no items, a bad key or model name."""
    if not items:
        raise ValueError("items: a group needs at least one item")
    for item in items:
        _check_key(item.key)
    if binary:
        items = [GroupItem(i.key, *json_to_binary(i.body)) for i in items]
    payload, header_length = encode_group_request(items)
    path = _model_path(model, version, GROUP_EXTENSION)
    return _finished("POST", path, payload, _framed_headers(header_length), compress)


def _finished(
    method: str, path: str, payload: bytes, headers: dict[str, str], compress: bool
) -> CloudRequest:
    if payload and compress:
        payload = gzip.compress(payload, mtime=0)  # mtime=0: equal bodies, equal bytes
        headers["Content-Encoding"] = "gzip"
    return CloudRequest(method, path, payload, headers)


@dataclass(slots=True)
class _Call:
    """One call's fixed request and its running totals over attempts."""

    request: CloudRequest
    sent: int = 0
    received: int = 0
    attempts: int = 0


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
        self._clock = clock or SystemClock()
        self._session = CloudSession(
            base_url,
            device_key,
            clock=self._clock,
            budget=budget,
            on_attempt=on_attempt,
            max_connections=max_connections,
            keepalive_expiry_s=keepalive_expiry_s,
            tls=tls,
        )
        self.retry = retry or RetryPolicy()
        self.observer = observer
        self.pacer = pacer
        self._compress = compress
        self._probe_timeout_s = probe_timeout_s
        self._key_refused = False

    async def __aenter__(self) -> CloudClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._session.aclose()

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
        request = self._session.request("GET", PROBE_PATH, b"", {}, self._probe_timeout_s)
        exchange = self._session.open(PROBE_PATH, request, 0, probe=True)
        start = self._clock.monotonic()
        status: int | None = None
        outcome = "network_error"
        try:
            async with asyncio.timeout(self._probe_timeout_s):
                response, _, _ = await self._session.send(request, exchange)
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
            self._session.close(PROBE_PATH, exchange, outcome, status, start, probe=True)
        if status != 200:
            why = "not ready" if status is not None else "its answer did not fit the data budget"
            raise CloudUnavailable(why, status=status)
        return True

    @property
    def compress(self) -> bool:
        """Whether request bodies are gzipped: what `infer_request` and `group_request` take."""
        return self._compress

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
        request = infer_request(
            model, body, idempotency_key=idempotency_key, version=version, binary=binary,
            compress=self._compress,
        )  # fmt: skip
        return await self.send(request, deadline=deadline)

    async def server_metadata(self, *, deadline: float | None = None) -> dict[str, Any]:
        """GET /v2: the server's name, version and `extensions` (what it can do beyond v2)."""
        answer = await self.send(CloudRequest("GET", SERVER_PATH, b"", {}), deadline=deadline)
        return answer.body

    async def send(
        self,
        request: CloudRequest,
        *,
        deadline: float | None = None,
        reader: Executor | None = None,
    ) -> CloudAnswer:
        """Send `request` (built by `infer_request` or `group_request` with this client's
        `compress`) as it is, with retries; raises as `infer` does. `reader`: where each
        answer's body is parsed (JSON) instead of the event loop, for large answers."""
        call = _Call(request)
        started = self._clock.monotonic()

        async def attempt(limit_s: float) -> Reply:
            return await self._attempt(call, limit_s, reader)

        pacer = self.pacer
        reply = await retry_call(
            attempt,
            policy=self.retry,
            clock=self._clock,
            deadline=deadline,
            # RateLimited if the rate would start the attempt too late for the deadline
            before_attempt=None if pacer is None else lambda latest: pacer.acquire(latest),
        )
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

    async def _attempt(self, call: _Call, limit_s: float, reader: Executor | None) -> Reply:
        fixed = call.request
        request = self._session.request(
            fixed.method, fixed.path, fixed.payload, fixed.headers, limit_s
        )
        exchange = self._session.open(fixed.path, request, len(fixed.payload))
        start = self._clock.monotonic()
        observer = self.observer
        if observer is not None and not observer.allow_call():
            self._session.close(fixed.path, exchange, "breaker_open", None, start)
            raise CircuitOpen()
        call.attempts += 1
        try:
            async with asyncio.timeout(limit_s):
                response, raw, rtt = await self._session.send(request, exchange)
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
        if reader is None:
            kind, outcome = read_answer(response, raw, rtt, self._clock)
        else:
            loop = asyncio.get_running_loop()
            try:
                kind, outcome = await loop.run_in_executor(
                    reader, read_answer, response, raw, rtt, self._clock
                )
            except asyncio.CancelledError:
                self._finish(call, exchange, "cancelled", None, start, None)
                raise
        self._finish(call, exchange, kind, response.status_code, start, rtt)
        if isinstance(outcome, CloudError):
            if self.pacer is not None and outcome.retry_after is not None and kind != "rejected":
                self.pacer.hold(outcome.retry_after, rate_limited=kind == "rate_limited")
            raise outcome
        return outcome

    def _finish(
        self,
        call: _Call,
        exchange: Exchange,
        kind: str,
        status: int | None,
        start: float,
        rtt: float | None,
        cause: str | None = None,
    ) -> None:
        """Settle and report the attempt, add it to the call's totals, and give the observer
        its verdict."""
        record = self._session.close(call.request.path, exchange, kind, status, start)
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


def _check_key(key: str) -> None:
    if not (0 < len(key) <= 255 and all(33 <= ord(c) <= 126 for c in key)):
        raise ValueError("idempotency_key must be 1-255 visible ASCII characters")


def _framed_headers(header_length: int) -> dict[str, str]:
    """A body of a JSON header then tensor bytes (binary tensors, infer_group)."""
    return {"Content-Type": GROUP_CONTENT_TYPE, HEADER_LENGTH: str(header_length)}


def _model_path(model: str, version: str | None, action: str) -> str:
    if not model:
        raise ValueError("model must be a non-empty model name")
    path = f"/v2/models/{quote(model, safe='')}"
    if version is not None:
        path += f"/versions/{quote(version, safe='')}"
    return f"{path}/{action}"
