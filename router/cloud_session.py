"""CloudSession: the kept-alive HTTP pool to the cloud, and the bytes each exchange takes.

What counts as a byte here: the HTTP/1.1 messages as they go on the wire, request and status
lines, headers, chunk framing and bodies as sent (gzip): a request's from what httpx will write,
an answer's as read from the connection. TCP/IP and TLS framing and the TLS handshake are below what the client can see, and not
counted. An answer is reserved at the size of the largest recent one from its endpoint; one
whose Content-Length does not fit what is left is not read (the connection is closed), and one
without a length is read while it fits, so only that last read (at most 64 KiB) can pass it.
"""

from __future__ import annotations

import gzip
import ssl
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpcore
import httpx

from router.budget import Reservation
from router.clock import Clock
from router.errors import BudgetExhausted

__all__ = [
    "ATTEMPT_OUTCOMES",
    "AttemptRecord",
    "ByteBudget",
    "CloudSession",
    "CloudTls",
    "Exchange",
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
    "cancelled",  # the caller went away mid-attempt
    "budget",  # not attempted, or its answer left unread: the data budget would be overspent
)
# How a v2 server marks an answer replayed from its idempotency store: the project's gateway
# sets this response parameter; the header is the common HTTP convention (Stripe and others).
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


@dataclass(slots=True)
class Exchange:
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


class CloudSession:
    """One httpx pool to a v2 REST server, the device's key on every request. Each exchange
    reserves its bytes in `budget` before it starts (`open`), reads the answer only while it
    fits (`send`), and settles what it took and reports it to `on_attempt` (`close`)."""

    def __init__(
        self,
        base_url: str,
        device_key: str,
        *,
        clock: Clock,
        budget: ByteBudget | None = None,
        on_attempt: Callable[[AttemptRecord], None] | None = None,
        max_connections: int = 4,
        keepalive_expiry_s: float = 60.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not device_key or not device_key.isprintable() or any(c.isspace() for c in device_key):
            raise ValueError("device_key must be non-empty printable text without spaces")
        self._clock = clock
        self.budget = budget
        self.on_attempt = on_attempt
        # The largest recent answers per endpoint: what the next answer there is reserved at.
        self._answers: dict[str, deque[int]] = {}
        transport = httpx.AsyncHTTPTransport(
            verify=tls if tls is not None else True,
            trust_env=False,  # a library does not read proxies from the environment
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=keepalive_expiry_s,
            ),
        )
        # httpx has no argument for httpcore's network backend; its pool is the one place
        # where what comes off the connection can be counted (h11 hides chunk framing).
        pool = transport._pool
        assert isinstance(pool, httpcore.AsyncConnectionPool)
        pool._network_backend = _CountingBackend(pool._network_backend)
        self._http = httpx.AsyncClient(
            transport=transport,
            base_url=base_url,
            headers={"Authorization": f"Bearer {device_key}", "Accept-Encoding": "gzip"},
            trust_env=False,
            follow_redirects=False,
        )
        # Every byte is paid for on a metered link: httpx's Accept: */* and Connection:
        # keep-alive say what HTTP/1.1 means anyway, and no server reads its User-Agent (70
        # bytes of every request's ~500).
        for name in ("Accept", "Connection", "User-Agent"):
            self._http.headers.pop(name, None)

    async def aclose(self) -> None:
        await self._http.aclose()

    def request(
        self, method: str, path: str, payload: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> httpx.Request:
        return self._http.build_request(
            method, path, content=payload or None, headers=headers, timeout=timeout_s
        )

    def open(
        self, endpoint: str, request: httpx.Request, body_bytes: int, *, probe: bool = False
    ) -> Exchange:
        """Reserve the request's bytes and the endpoint's expected answer; BudgetExhausted if
        they do not fit (counted as a `budget` attempt, nothing sent)."""
        exchange = Exchange(_request_bytes(request, body_bytes), None)
        request.extensions["trace"] = exchange.trace
        if self.budget is not None:
            answers = self._answers.get(endpoint)
            expected = max(answers) if answers else _ANSWER_GUESS
            try:
                exchange.reservation = self.budget.reserve(exchange.request_bytes + expected)
            except BudgetExhausted:
                self.emit(AttemptRecord("budget", None, 0.0, 0, 0, probe))
                raise
        return exchange

    async def send(
        self, request: httpx.Request, exchange: Exchange
    ) -> tuple[httpx.Response, bytes, float]:
        """Send, then read the answer while it fits the reservation: the response, its body
        (decoded) and the time to its headers."""
        start = self._clock.monotonic()
        reading = _reading.set(exchange)
        try:
            try:
                response = await self._http.send(request, stream=True)
            except AttributeError as error:
                # anyio asks a pooled connection's closed transport for its socket, gets None
                # and calls getpeername() on it: the link cut that connection, which is a
                # network error (seen under the fault proxy), not the agent's own failure.
                raise httpx.ReadError(f"connection closed under the client: {error}") from error
            rtt = self._clock.monotonic() - start
            try:
                length = response.headers.get("Content-Length", "")
                if length.isascii() and length.isdigit():
                    head = _response_head_bytes(response)
                    try:
                        exchange.expect(self.budget, head + int(length))
                    except BudgetExhausted:
                        exchange.received = head  # what came with the head is dropped unread
                        raise
                parts = []
                async for piece in response.aiter_raw():
                    parts.append(piece)
                    exchange.expect(self.budget, exchange.received)
                return response, _decoded(b"".join(parts), response), rtt
            finally:
                await response.aclose()
        finally:
            _reading.reset(reading)

    def close(
        self,
        endpoint: str,
        exchange: Exchange,
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
        self.emit(record)
        return record

    def emit(self, record: AttemptRecord) -> None:
        if self.on_attempt is not None:
            self.on_attempt(record)


_reading: ContextVar[Exchange | None] = ContextVar("cloud_exchange_reading", default=None)
"""The exchange whose answer this task is reading: what comes off a connection counts to it
(HTTP/1.1 carries one exchange at a time per connection, read by the task that sent it)."""


# httpcore's interface takes `timeout` arguments (ASYNC109 is waived for its methods).
class _CountingStream(httpcore.AsyncNetworkStream):
    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        data = await self._stream.read(max_bytes, timeout)
        exchange = _reading.get()
        if exchange is not None:
            exchange.received += len(data)
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        # Counted above TLS: the HTTP messages, as for plain connections.
        return _CountingStream(await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _CountingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, backend: httpcore.AsyncNetworkBackend) -> None:
        self._backend = backend

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return _CountingStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _CountingStream(
            await self._backend.connect_unix_socket(path, timeout, socket_options)
        )

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


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
