"""The connection guard's pure parts: the cap under the open-files limit, the accept-error log."""

from __future__ import annotations

import logging
import resource
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
    def __init__(self) -> None:
        self.passed_on: list[dict[str, Any]] = []

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.passed_on.append(context)


def test_accept_errors_are_logged_once_a_second_with_their_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    now = [100.0]
    guard = ConnectionGuard(
        10.0,
        100,
        metrics.connections_closed,
        metrics.accept_errors,
        logging.getLogger("cloud_gateway"),
        monotonic=lambda: now[0],
    )
    loop = FakeLoop()
    error = {
        "message": "socket.accept() out of system resource",
        "exception": OSError(24, "Too many open files"),
    }
    with caplog.at_level(logging.WARNING, logger="cloud_gateway"):
        for _ in range(2048):  # what asyncio reports in one wake-up (issue 12)
            guard.handle_loop_exception(loop, error)  # type: ignore[arg-type]
        now[0] += 1.0
        guard.handle_loop_exception(loop, error)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("could not accept 1 connection(s): [Errno 24]")
    assert lines[1].startswith("could not accept 2048 connection(s)")
    assert metrics.accept_errors._value.get() == 2049
    other = {"message": "Task exception was never retrieved"}
    guard.handle_loop_exception(loop, other)  # type: ignore[arg-type]
    assert loop.passed_on == [other]


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
