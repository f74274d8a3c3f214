"""The API's connections: closed when a request's headers do not arrive in time, capped in number
(503 beyond), and accept errors logged at most once a second.

uvicorn closes idle keep-alive connections, but not one that never sends a request or stops in
the middle of its headers, and asyncio logs a traceback for every failed accept (up to the
backlog's 2,048 per wake-up, issue 12: 68 MB in 13 s). `GuardedH11Protocol` is uvicorn's own
HTTP/1.1 protocol with a header deadline and the cap; uvicorn takes it as its `http` class. Its
settings and counters come from the app's lifespan state (`ConnectionGuard`), the channel uvicorn
hands to every protocol it creates.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
from prometheus_client import Counter
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from model_runtime import json_codec

__all__ = ["STATE_KEY", "ConnectionGuard", "GuardedH11Protocol", "connection_cap"]

log = logging.getLogger("cloud_gateway")

STATE_KEY = "connection_guard"
# Connections asyncio accepts in one go, before any of them is counted (uvicorn's `backlog`,
# which is also the listen queue's length).
ACCEPT_BATCH = 256
# Descriptors kept free below the open-files limit for what is not a counted connection: a
# batch being accepted, refused connections lingering, SQLite files (3 per connection, one
# connection per worker thread), Redis, pipes.
FD_RESERVE = ACCEPT_BATCH + 128
# An over-capacity connection gets its 503 and this long to read it and hang up, so that its
# request, if already sent, is read rather than answered with a reset...
_REFUSED_LINGER_S = 1.0
# ...unless this many over-capacity connections are lingering already: then it is closed at
# once (its 503 may be lost to a reset), so that a flood cannot use up the descriptors either.
_MAX_LINGERING = 64
_ACCEPT_ERROR = "socket.accept() out of system resource"  # asyncio's message


def connection_cap(max_connections: int) -> int:
    """`max_connections`, lowered if need be to leave FD_RESERVE descriptors under the soft
    open-files limit, so that the worker never runs out of them (EMFILE) serving clients."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft - FD_RESERVE))


def _over_capacity_response(retry_after_s: int) -> bytes:
    body = json_codec.dumps({"error": "the gateway has too many open connections; retry later"})
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "content-type: application/json\r\n"
        f"retry-after: {retry_after_s}\r\n"
        "connection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class ConnectionGuard:
    """What every connection of one worker shares: the limits, the counters, the log throttle."""

    header_timeout_s: float
    max_connections: int
    closed: Counter
    """by reason: header_timeout, over_capacity"""
    accept_errors: Counter
    monotonic: Callable[[], float] = time.monotonic
    refusal: bytes = field(default_factory=lambda: _over_capacity_response(1))
    """What an over-capacity connection is sent."""
    lingering: int = 0
    _unlogged_errors: int = 0
    _last_logged: float = float("-inf")

    def handle_loop_exception(
        self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]
    ) -> None:
        """The event loop's exception handler: accept errors counted, and logged once a second
        with how many there were; everything else as asyncio would."""
        if context.get("message") != _ACCEPT_ERROR:
            loop.default_exception_handler(context)
            return
        self.accept_errors.inc()
        self._unlogged_errors += 1
        now = self.monotonic()
        if now - self._last_logged < 1.0:
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.warning(
            "could not accept %d connection(s): %s (open-files limit %d; raise LimitNOFILE "
            "or lower max_connections)",
            self._unlogged_errors,
            context.get("exception"),
            soft,
        )
        self._unlogged_errors = 0
        self._last_logged = now


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a request's headers must be complete `header_timeout_s`
    after the connection opens or the previous answer ends; connections past the cap get a 503
    and are closed."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._guard: ConnectionGuard = app_state[STATE_KEY]
        self._header_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self._guard
        if len(self.connections) > guard.max_connections:
            # Answered at once, before the request: waiting for it would keep the descriptor
            # the cap is there to save.
            self._refused = True
            guard.closed.labels("over_capacity").inc()
            transport.write(guard.refusal)
            if guard.lingering >= _MAX_LINGERING:
                transport.close()
            else:
                guard.lingering += 1
                self._header_timer = self.loop.call_later(_REFUSED_LINGER_S, transport.close)
            return
        self._arm(guard.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the request it answers; the connection closes when the client hangs up
        super().data_received(data)
        if self._header_timer is not None and self.conn.their_state is not h11.IDLE:
            self._disarm()  # the headers are in: the request runs as long as it needs

    def eof_received(self) -> None:
        if self._refused:
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            # The next request's headers get the same time (uvicorn's keep-alive timeout
            # closes an idle connection; this one also a half-sent request).
            self._arm(self._guard.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused and self._header_timer is not None:
            self._guard.lingering -= 1
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(seconds, self._headers_too_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        self._guard.closed.labels("header_timeout").inc()
        # No answer: the client has not finished asking, and an answer costs more than silence.
        self.transport.close()
