"""Slow, idle and too many connections on the agent's REST port (issue 12, the gateway's guard):
a connection that sends nothing or stops mid-header is closed after the header timeout,
connections past the cap get 503 with Retry-After (the cap held by result streams, open as long
as the test says); a normal request is served throughout. A head over 16 KiB gets 431:
test_rest_bad_input.py::test_an_endless_request_head_is_cut_off_with_431.
"""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import agent_args, agent_metric, start_agent
from tests.integration.rest.helpers import rest_ready
from tests.support.processes import Daemon, start_daemon, wait_until
from tests.support.sse import EventStream

pytestmark = pytest.mark.integration

HEADER_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 3
# Room for a loaded machine between the agent's timer and this process seeing the close.
SLACK_S = 5.0
CLOSED = "edge_agent_rest_connections_closed_total"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = start_agent(
        tmp_path_factory.mktemp("agent"),
        env={
            "EDGE_AGENT_REST_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT_S),
            "EDGE_AGENT_REST_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        },
        ready=rest_ready,
    )
    yield daemon
    daemon.stop()


def _address(agent: Daemon) -> tuple[str, int]:
    host, port = agent.address("rest").rsplit(":", 1)
    return host, int(port)


def _ready(agent: Daemon) -> int:
    """A health check on a connection of its own, closed after it."""
    return httpx.get(f"http://{agent.address('rest')}/v2/health/ready", timeout=10).status_code


def _closed_after(sock: socket.socket, started: float) -> float:
    """How long after `started` the agent closed `sock`, which it must not answer."""
    sock.settimeout(HEADER_TIMEOUT_S + SLACK_S)
    assert sock.recv(1024) == b""
    return time.monotonic() - started


def test_silent_and_half_sent_connections_are_closed_after_the_header_timeout(
    agent: Daemon,
) -> None:
    before = agent_metric(agent, CLOSED, reason="header_timeout")
    started = time.monotonic()
    with (
        socket.create_connection(_address(agent)) as silent,
        socket.create_connection(_address(agent)) as half,
    ):
        half.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        assert _ready(agent) == 200  # beside them, within the cap
        for sock in (silent, half):
            assert _closed_after(sock, started) >= HEADER_TIMEOUT_S * 0.9
    assert agent_metric(agent, CLOSED, reason="header_timeout") == before + 2

    # A kept-alive connection may idle between requests, but once a request has begun its
    # head has the same time.
    with socket.create_connection(_address(agent)) as kept:
        kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while not answer.endswith(b'{"live":true}'):
            answer += kept.recv(1024)
        assert answer.startswith(b"HTTP/1.1 200 ")
        kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 1")
        started = time.monotonic()
        assert _closed_after(kept, started) >= HEADER_TIMEOUT_S * 0.9
    assert agent_metric(agent, CLOSED, reason="header_timeout") == before + 3
    assert _ready(agent) == 200


def test_connections_past_the_cap_get_503_with_retry_after(agent: Daemon) -> None:
    before = agent_metric(agent, CLOSED, reason="over_capacity")
    url = f"http://{agent.address('rest')}/router/v1/results"
    streams = [EventStream(url) for _ in range(MAX_CONNECTIONS)]  # held as long as the test says
    try:
        assert [s.response.status_code for s in streams] == [200] * MAX_CONNECTIONS
        with socket.create_connection(_address(agent), timeout=10) as extra:
            answer = extra.recv(4096)  # at once, before it sends anything
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), answer
        assert b"retry-after: 1" in head.lower()
        assert b"too many open connections" in body
        assert agent_metric(agent, CLOSED, reason="over_capacity") == before + 1
    finally:
        streams.pop().close()
    # One place free again: a normal request is served, beside the streams still open.
    wait_until(lambda: _ready(agent) == 200, timeout=10, what="a place freed by a closed stream")
    for stream in streams:
        stream.close()
    assert agent_metric(agent, CLOSED, reason="over_capacity") == before + 1


def test_a_refused_connection_is_told_so_even_if_it_sent_its_request(agent: Daemon) -> None:
    url = f"http://{agent.address('rest')}/router/v1/results"
    streams = [EventStream(url) for _ in range(MAX_CONNECTIONS)]
    try:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            httpx.get(f"http://{agent.address('rest')}/v2", timeout=10).raise_for_status()
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["retry-after"] == "1"
    finally:
        for stream in streams:
            stream.close()
    wait_until(lambda: _ready(agent) == 200, timeout=10, what="places freed by closed streams")


def _soft_open_files(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open-files limit in /proc/{pid}/limits")


def test_the_agent_raises_its_open_files_limit_to_the_hard_one(tmp_path: Path) -> None:
    """Started with `ulimit -Sn 512`, as a shell or systemd's default 1,024 would: the REST cap
    and the watchers need more, and the hard limit allows it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"the open-files hard limit ({hard}) leaves nothing to raise")

    def soft_512() -> None:  # in the agent's process, before it starts
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))

    daemon = start_daemon("edge-agent", agent_args(tmp_path), tmp_path, preexec_fn=soft_512)
    try:
        assert _soft_open_files(daemon.process.pid) == hard
    finally:
        daemon.stop()
