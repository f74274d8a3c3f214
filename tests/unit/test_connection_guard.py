"""The connection guard's pure parts: the cap under the open-files limit, the accept-error and
malformed-request logs."""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cloud_gateway.metrics import GatewayMetrics
from model_runtime import connection_guard as connections
from model_runtime.connection_guard import FD_RESERVE, ConnectionGuard, connection_cap


def test_the_cap_leaves_descriptors_free_under_the_open_files_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connections.resource, "getrlimit", lambda _: (1024, 1024))
    assert connection_cap(4096) == 1024 - FD_RESERVE
    assert connection_cap(100) == 100
    monkeypatch.setattr(connections.resource, "getrlimit", lambda _: (resource.RLIM_INFINITY,) * 2)
    assert connection_cap(4096) == 4096


class FakeLoop:
    """What the guard asks of a loop: the default handler, and timers the test runs itself."""

    def __init__(self) -> None:
        self.passed_on: list[dict[str, Any]] = []
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.passed_on.append(context)

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        self.timers.append((delay, callback))
        return callback  # a handle: the guard only checks that there is one

    def run_timers(self) -> None:
        timers, self.timers = self.timers, []
        for _, callback in timers:
            callback()


def _guard() -> tuple[ConnectionGuard, GatewayMetrics, list[float], FakeLoop]:
    """A guard, its counters, its clock (now[0], moved by the test) and a loop."""
    metrics = GatewayMetrics(CollectorRegistry())
    now = [100.0]
    guard = ConnectionGuard(
        10.0,
        100,
        metrics.connections_closed,
        metrics.accept_errors,
        metrics.malformed_requests,
        logging.getLogger("cloud_gateway"),
        monotonic=lambda: now[0],
    )
    return guard, metrics, now, FakeLoop()


def test_accept_errors_are_logged_once_a_second_with_their_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard, metrics, now, loop = _guard()
    error = {
        "message": "socket.accept() out of system resource",
        "exception": OSError(24, "Too many open files"),
    }
    with caplog.at_level(logging.WARNING, logger="cloud_gateway"):
        for _ in range(2048):  # what asyncio reports in one wake-up (issue 12)
            guard.handle_loop_exception(loop, error)  # type: ignore[arg-type]
        assert [delay for delay, _ in loop.timers] == [1.0]  # the rest, when the second ends
        now[0] += 1.0
        loop.run_timers()
        now[0] += 5.0
        guard.handle_loop_exception(loop, error)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("could not accept 1 connection(s): [Errno 24]")
    assert lines[1].startswith("could not accept 2047 connection(s)")
    assert lines[2].startswith("could not accept 1 connection(s)")  # a second later: at once
    assert loop.timers == []
    assert metrics.accept_errors._value.get() == 2049
    other = {"message": "Task exception was never retrieved"}
    guard.handle_loop_exception(loop, other)  # type: ignore[arg-type]
    assert loop.passed_on == [other]


def test_malformed_requests_are_counted_each_and_logged_once_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard, metrics, now, loop = _guard()
    with caplog.at_level(logging.WARNING, logger="cloud_gateway"):
        for i in range(300):
            reason = "unsupported_upgrade" if i % 3 == 0 else "invalid_http"
            guard.malformed_request(loop, reason, "192.0.2.7")  # type: ignore[arg-type]
        now[0] += 0.5
        guard.malformed_request(loop, "invalid_http", "192.0.2.8")  # type: ignore[arg-type]
        now[0] += 0.5
        loop.run_timers()
    assert [r.getMessage() for r in caplog.records] == [
        "malformed HTTP request(s), last from 192.0.2.7 (counted, logged once a second at "
        "most): 1 unsupported_upgrade",
        "malformed HTTP request(s), last from 192.0.2.8 (counted, logged once a second at "
        "most): 201 invalid_http, 99 unsupported_upgrade",
    ]
    counted = metrics.malformed_requests.labels
    assert counted("invalid_http")._value.get() == 201
    assert counted("unsupported_upgrade")._value.get() == 100


def test_uvicorn_s_own_line_for_each_malformed_request_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _guard()
    uvicorn_log = logging.getLogger("uvicorn.error")
    with caplog.at_level(logging.WARNING, logger="uvicorn.error"):
        uvicorn_log.warning("Invalid HTTP request received.")
        uvicorn_log.warning("Exception in ASGI application")
    assert [r.getMessage() for r in caplog.records] == ["Exception in ASGI application"]


def test_a_cap_lowered_under_the_open_files_limit_is_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(connections.resource, "getrlimit", lambda _: (1024, 1024))
    metrics = GatewayMetrics(CollectorRegistry())
    log = logging.getLogger("edge_agent")

    def guard(cap: int) -> ConnectionGuard:
        return ConnectionGuard.under_open_files_limit(
            1.0,
            cap,
            metrics.connections_closed,
            metrics.accept_errors,
            metrics.malformed_requests,
            log,
            server="the agent",
            cap_setting="rest_max_connections",
        )

    with caplog.at_level(logging.WARNING, logger="edge_agent"):
        assert guard(256).max_connections == 256
        assert caplog.records == []
        lowered = guard(4096)
    assert lowered.max_connections == 1024 - FD_RESERVE
    assert [r.getMessage() for r in caplog.records] == [
        "rest_max_connections lowered to 640 for the agent, to stay under the open-files limit "
        "(raise it: LimitNOFILE in the systemd unit, ulimit -n)"
    ]
    assert b"the agent has too many open connections" in lowered.refusal
