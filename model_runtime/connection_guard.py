"""HTTP/1.1 connections a server can afford: closed when a request's headers do not arrive in
time, capped in number (503 beyond), request heads bounded (431), accept errors and malformed
requests counted and logged once a second.

uvicorn closes idle keep-alive connections, but not one that never sends a request or stops in
the middle of its headers, and asyncio logs a traceback for every failed accept (up to the
backlog's 2,048 per wake-up, issue 12: 68 MB in 13 s). `GuardedHttpToolsProtocol` (the gateway's)
and `GuardedH11Protocol` (the agent's REST API's) are uvicorn's own HTTP/1.1 protocols with a
header deadline, the cap and a bounded head; uvicorn takes one as its `http` class. uvicorn
would also write a warning line for every malformed request (anyone who can connect could fill
the disk with them): here they are counted, and summed up in one line a second at most. Their
settings and counters come from uvicorn's app state (`ConnectionGuard` under STATE_KEY), the
channel uvicorn hands to every protocol it creates.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import h11
from prometheus_client import Counter
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from model_runtime import json_codec
from model_runtime.log_throttle import LogThrottle

__all__ = [
    "ACCEPT_BATCH",
    "CLOSE_REASONS",
    "FD_RESERVE",
    "MALFORMED_REASONS",
    "MAX_HEAD_BYTES",
    "STATE_KEY",
    "ConnectionGuard",
    "GuardedH11Protocol",
    "GuardedHttpToolsProtocol",
    "connection_cap",
    "raise_open_files_limit",
]

STATE_KEY = "connection_guard"
CLOSE_REASONS = ("header_timeout", "over_capacity", "head_too_large")
"""Why the guard closed a connection: the `reason` label of its `closed` counter."""
MALFORMED_REASONS = ("invalid_http", "unsupported_upgrade")
"""What was wrong with a request uvicorn could not take (the `reason` label of the guard's
`malformed` counter): not HTTP/1.1 (answered 400, the connection closed), or an Upgrade header
to a protocol the server does not speak (the request is served as plain HTTP)."""
# Connections asyncio accepts in one go, before any of them is counted (uvicorn's `backlog`,
# which is also the listen queue's length).
ACCEPT_BATCH = 256
# Descriptors kept free below the open-files limit for what is not a counted connection: a
# batch being accepted, refused connections lingering, SQLite files (3 per connection, one
# connection per worker thread), Redis, pipes; in the agent, its gRPC API and cloud link.
FD_RESERVE = ACCEPT_BATCH + 128
# An over-capacity connection gets its 503 and this long to read it and hang up, so that its
# request, if already sent, is read rather than answered with a reset...
_REFUSED_LINGER_S = 1.0
# ...unless this many over-capacity connections are lingering already: then it is closed at
# once (its 503 may be lost to a reset), so that a flood cannot use up the descriptors either.
_MAX_LINGERING = 64
_ACCEPT_ERROR = "socket.accept() out of system resource"  # asyncio's message
# A request's line and headers: h11's own default bound, for either parser.
MAX_HEAD_BYTES = 16 * 1024
# uvicorn's logger and its line for each malformed request, which the guard's count replaces.
_UVICORN_LOG = "uvicorn.error"
_INVALID_REQUEST_LINE = "Invalid HTTP request received."


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (children inherit it); the new soft limit.

    systemd's default soft limit is 1,024 however high the hard one, and each client connection
    takes a descriptor: the cap on connections (connection_cap) stays below what is left.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def connection_cap(max_connections: int) -> int:
    """`max_connections`, lowered if need be to leave FD_RESERVE descriptors under the soft
    open-files limit, so that the process never runs out of them (EMFILE) serving clients."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft - FD_RESERVE))


def _over_capacity_response(server: str, retry_after_s: int) -> bytes:
    body = json_codec.dumps({"error": f"{server} has too many open connections; retry later"})
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "content-type: application/json\r\n"
        f"retry-after: {retry_after_s}\r\n"
        "connection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _head_too_large_response() -> bytes:
    body = json_codec.dumps(
        {"error": f"the request's line and headers take more than {MAX_HEAD_BYTES} bytes"}
    )
    head = (
        "HTTP/1.1 431 Request Header Fields Too Large\r\n"
        "content-type: application/json\r\n"
        "connection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


_HEAD_TOO_LARGE = _head_too_large_response()


def _drop_invalid_request_line(record: logging.LogRecord) -> bool:
    """A filter for uvicorn's logger: its line for each malformed request goes, since the guard
    counts those requests (every one, whatever the log level) and sums them up itself."""
    return record.msg != _INVALID_REQUEST_LINE


@dataclass
class ConnectionGuard:
    """What every connection of one server (a gateway worker, the agent's REST API) shares:
    the limits, the counters, the log throttles."""

    header_timeout_s: float
    max_connections: int
    closed: Counter
    """by reason: header_timeout, over_capacity, head_too_large"""
    accept_errors: Counter
    malformed: Counter
    """by reason: MALFORMED_REASONS"""
    log: logging.Logger
    """Where accept errors and malformed requests are reported."""
    server: str = "the server"
    """Who answers, in the 503's message ("the gateway")."""
    cap_setting: str = "max_connections"
    """The setting that caps connections, named in the accept-error line."""
    monotonic: Callable[[], float] = time.monotonic
    refusal: bytes = field(init=False)
    """What an over-capacity connection is sent."""
    lingering: int = 0
    _accept_log: LogThrottle = field(init=False)
    _last_accept_error: object = None
    _malformed_log: LogThrottle = field(init=False)
    _last_malformed_from: str = "?"

    def __post_init__(self) -> None:
        self.refusal = _over_capacity_response(self.server, 1)
        self._accept_log = LogThrottle(self._report_accept_errors, self.monotonic)
        self._malformed_log = LogThrottle(self._report_malformed, self.monotonic)
        # Idempotent: a process may build several guards (a test, several servers).
        logging.getLogger(_UVICORN_LOG).addFilter(_drop_invalid_request_line)

    @classmethod
    def under_open_files_limit(
        cls,
        header_timeout_s: float,
        max_connections: int,
        closed: Counter,
        accept_errors: Counter,
        malformed: Counter,
        log: logging.Logger,
        *,
        server: str,
        cap_setting: str,
    ) -> ConnectionGuard:
        """A guard whose cap is `max_connections` lowered if need be (connection_cap), and a
        warning saying so: the operator asked for more than the process can hold."""
        guard = cls(
            header_timeout_s,
            connection_cap(max_connections),
            closed,
            accept_errors,
            malformed,
            log,
            server=server,
            cap_setting=cap_setting,
        )
        if guard.max_connections < max_connections:
            log.warning(
                "%s lowered to %d for %s, to stay under the open-files limit "
                "(raise it: LimitNOFILE in the systemd unit, ulimit -n)",
                cap_setting,
                guard.max_connections,
                server,
            )
        return guard

    def handle_loop_exception(
        self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]
    ) -> None:
        """The event loop's exception handler: accept errors counted, and logged once a second
        with how many there were; everything else as asyncio would."""
        if context.get("message") != _ACCEPT_ERROR:
            loop.default_exception_handler(context)
            return
        self.accept_errors.inc()
        self._last_accept_error = context.get("exception")
        self._accept_log.note(loop, "accept")

    def malformed_request(
        self, loop: asyncio.AbstractEventLoop, reason: str, client: str | None
    ) -> None:
        """A request uvicorn could not take (`reason`: one of MALFORMED_REASONS), from the
        `client` address: counted, and logged once a second with how many there were."""
        self.malformed.labels(reason).inc()
        if client is not None:
            self._last_malformed_from = client
        self._malformed_log.note(loop, reason)

    def _report_accept_errors(self, counts: dict[str, int]) -> None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.log.warning(
            "could not accept %d connection(s): %s (open-files limit %d; raise LimitNOFILE "
            "or lower %s)",
            counts["accept"],
            self._last_accept_error,
            soft,
            self.cap_setting,
        )

    def _report_malformed(self, counts: dict[str, int]) -> None:
        self.log.warning(
            "malformed HTTP request(s), last from %s (counted, logged once a second at most): %s",
            self._last_malformed_from,
            ", ".join(
                f"{counts[reason]} {reason}" for reason in MALFORMED_REASONS if reason in counts
            ),
        )


class _Guard:
    """One connection's side of the guard, shared by the protocols below: the cap checked as
    it opens, and a deadline for each request's head (armed when the connection opens or an
    answer ends, disarmed when the head is complete)."""

    __slots__ = ("_guard", "_loop", "_timer", "_transport", "refused")

    def __init__(self, guard: ConnectionGuard, loop: asyncio.AbstractEventLoop) -> None:
        self._guard = guard
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self.refused = False

    def opened(self, transport: asyncio.Transport, open_connections: int) -> None:
        self._transport = transport
        guard = self._guard
        if open_connections > guard.max_connections:
            # Answered at once, before the request: waiting for it would keep the descriptor
            # the cap is there to save.
            self.refused = True
            guard.closed.labels("over_capacity").inc()
            transport.write(guard.refusal)
            if guard.lingering >= _MAX_LINGERING:
                transport.close()
            else:
                guard.lingering += 1
                self._timer = self._loop.call_later(_REFUSED_LINGER_S, transport.close)
            return
        self.arm()

    def arm(self) -> None:
        """The next request's head must be complete within header_timeout_s."""
        self.disarm()
        self._timer = self._loop.call_later(self._guard.header_timeout_s, self._too_late)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def armed(self) -> bool:
        return self._timer is not None

    def refuse_head(self) -> None:
        """A head over MAX_HEAD_BYTES: 431, and the connection closed."""
        assert self._transport is not None
        self._guard.closed.labels("head_too_large").inc()
        self._transport.write(_HEAD_TOO_LARGE)
        self._transport.close()

    def malformed(self, reason: str, client: tuple[str, int] | None) -> None:
        self._guard.malformed_request(self._loop, reason, None if client is None else client[0])

    def lost(self) -> None:
        if self.refused and self._timer is not None:
            self._guard.lingering -= 1
        self.disarm()

    def _too_late(self) -> None:
        self._timer = None
        if self._transport is None or self._transport.is_closing():
            return
        self._guard.closed.labels("header_timeout").inc()
        # No answer: the client has not finished asking, and an answer costs more than silence.
        self._transport.close()


class _GuardedProtocol:
    """What both protocols below add to uvicorn's, ahead of it in their bases: a `_Guard` per
    connection, the cap checked as it opens, a refused one closed when its client hangs up,
    malformed requests counted rather than logged one by one."""

    # Set by uvicorn's protocol, which follows this class in the bases.
    loop: asyncio.AbstractEventLoop
    connections: set[Any]
    transport: asyncio.Transport
    client: tuple[str, int] | None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)  # type: ignore[call-arg]
        self._guarded = _Guard(app_state[STATE_KEY], self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        # A stream server's transports are always full ones (uvicorn's protocols say so too).
        self._guarded.opened(cast(asyncio.Transport, transport), len(self.connections))

    def eof_received(self) -> None:
        if self._guarded.refused:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guarded.lost()
        super().connection_lost(exc)  # type: ignore[misc]

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to what its parser refused, right after its (filtered) log line.
        self._guarded.malformed("invalid_http", self.client)
        super().send_400_response(msg)  # type: ignore[misc]

    def _unsupported_upgrade_warning(self) -> None:
        # In place of uvicorn's one or two lines; the request is then served as plain HTTP.
        self._guarded.malformed("unsupported_upgrade", self.client)


class _HeadBoundConnection(h11.Connection):
    """h11's server side, which calls `too_large` when a request head outgrows MAX_HEAD_BYTES
    instead of raising: uvicorn would answer that with a 400 and a warning line each time."""

    def __init__(self, too_large: Callable[[], None]) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._too_large = too_large

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint != 431:
                raise
            self._too_large()  # the 431, and the connection closed
            return h11.NEED_DATA  # uvicorn waits for data that will not come


class GuardedH11Protocol(_GuardedProtocol, H11Protocol):
    """uvicorn's h11 protocol, plus: a request's headers must be complete `header_timeout_s`
    after the connection opens, or after the first bytes of a later request arrive (between
    requests, uvicorn's keep-alive timeout closes an idle connection, so that it may be longer
    than the header timeout); connections past the cap get a 503 and are closed; a head over
    MAX_HEAD_BYTES gets a 431 (h11 bounds the head it buffers, pipelined requests one by one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _HeadBoundConnection(self._guarded.refuse_head)

    def data_received(self, data: bytes) -> None:
        if self._guarded.refused:
            return  # the request it answers; the connection closes when the client hangs up
        if not self._guarded.armed and self.conn.their_state is h11.IDLE:
            self._guarded.arm()  # a request's first bytes: its head has the time from now
        super().data_received(data)
        if self._guarded.armed and self.conn.their_state is not h11.IDLE:
            self._guarded.disarm()  # the headers are in: the request runs as long as it needs

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if (
            not self.transport.is_closing()
            and self.conn.their_state is h11.IDLE
            and self.conn.trailing_data[0]
        ):
            self._guarded.arm()  # part of the next request came with this one: its time runs


class GuardedHttpToolsProtocol(_GuardedProtocol, HttpToolsProtocol):
    """uvicorn's httptools protocol (the gateway's) with the same guard as GuardedH11Protocol,
    except that a later request's header time runs from the previous answer's end (the
    gateway's keep-alive timeout, 5 s, closes an idle connection before that), and a bound on
    the request head, which httptools alone does not have: it would buffer a head of any size
    (issue 16: 48 MB of headers taken in a test, the process growing by as much). The reads
    that fall wholly inside one incomplete head are counted; past MAX_HEAD_BYTES the connection
    gets a 431 and is closed. A read in which a head begins after other bytes (a body, requests
    pipelined before it) is not counted, since where the head begins in it is unknown: counted
    whole, it made small pipelined heads look large. So a head takes at most MAX_HEAD_BYTES
    plus two reads (asyncio reads up to 256 KiB at once) of memory."""

    _in_head = True  # from the connection's start or a message's end to the next headers' end
    _head_bytes = 0
    _head_edges = 0  # how often a head began or ended: did one within a read?

    def data_received(self, data: bytes) -> None:
        if self._guarded.refused:
            return  # the request it answers; the connection closes when the client hangs up
        edges = self._head_edges
        super().data_received(data)
        if self._in_head and self._head_edges == edges and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._guarded.refuse_head()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_edges += 1
        self._guarded.disarm()  # the headers are in: the request runs as long as it needs
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # What follows is the next request's head (a body never follows a message's end).
        self._in_head = True
        self._head_bytes = 0
        self._head_edges += 1

    def on_response_complete(self) -> None:
        waiting = bool(self.pipeline)  # a further request, its headers in, starts now
        super().on_response_complete()
        if not self.transport.is_closing() and not waiting:
            self._guarded.arm()
