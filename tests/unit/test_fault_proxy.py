"""The fault proxy against a tiny echo server on real sockets: every fault is observable."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.fault_proxy import FaultProxy
from tests.support.processes import wait_until


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield str(host), int(port)
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def proxy(echo: tuple[str, int]) -> Iterator[FaultProxy]:
    with FaultProxy(*echo) as proxy:
        yield proxy


def connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def round_trip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_forwards_both_ways_and_counts_bytes(proxy: FaultProxy) -> None:
    assert proxy.port > 0
    with connect(proxy) as sock:
        assert round_trip(sock, b"hello" * 1000) == b"hello" * 1000
        assert round_trip(sock, b"again") == b"again"
    wait_until(lambda: proxy.bytes_to_target == 5005 and proxy.bytes_to_client == 5005, 5)
    assert proxy.connections_accepted == 1


def test_cut_resets_existing_and_new_connections_until_restored(proxy: FaultProxy) -> None:
    with connect(proxy) as live:
        assert round_trip(live, b"x") == b"x"
        proxy.cut()
        with pytest.raises(ConnectionResetError):
            round_trip(live, b"y")
    with pytest.raises(ConnectionResetError), connect(proxy) as fresh:  # the RST may beat connect
        round_trip(fresh, b"z")
    before = proxy.bytes_to_target
    proxy.restore()
    with connect(proxy) as back:
        assert round_trip(back, b"back") == b"back"
    assert proxy.bytes_to_target == before + 4


def test_black_hole_holds_everything_and_restore_releases_it(proxy: FaultProxy) -> None:
    with connect(proxy) as live:
        assert round_trip(live, b"a") == b"a"
        proxy.black_hole()
        live.sendall(b"held")
        with connect(proxy, timeout=0.3) as fresh:  # accepted, never answered
            fresh.sendall(b"new")
            live.settimeout(0.3)
            with pytest.raises(TimeoutError):
                live.recv(10)
            with pytest.raises(TimeoutError):
                fresh.recv(10)
            assert proxy.bytes_to_target == 1
            proxy.restore()
            fresh.settimeout(5)
            live.settimeout(5)
            assert fresh.recv(10) == b"new"
            assert live.recv(10) == b"held"


def test_delay_adds_latency_each_way(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        start = time.monotonic()
        round_trip(sock, b"fast")
        fast = time.monotonic() - start
        proxy.delay(0.15)
        start = time.monotonic()
        assert round_trip(sock, b"slow") == b"slow"
        slow = time.monotonic() - start
    assert slow >= 0.3  # 0.15 s out, 0.15 s back
    assert slow < 2.0
    assert fast < slow - 0.25


def test_throttle_caps_bytes_per_second(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * 40  # 10,240 bytes
    proxy.throttle(20_000)
    with connect(proxy) as sock:
        start = time.monotonic()
        assert round_trip(sock, payload) == payload
        elapsed = time.monotonic() - start
    assert elapsed >= 0.45  # 10 KB at 20 KB/s is at least half a second each way, pipelined
    assert elapsed < 3.0
    proxy.restore()
    with connect(proxy) as sock:
        start = time.monotonic()
        assert round_trip(sock, payload) == payload
        assert time.monotonic() - start < elapsed / 2


def test_reset_sends_rst_to_existing_connections_only(proxy: FaultProxy) -> None:
    with connect(proxy) as live:
        assert round_trip(live, b"1") == b"1"
        wait_until(lambda: proxy.open_connections == 1, 5)
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            live.recv(10)
    with connect(proxy) as fresh:
        assert round_trip(fresh, b"2") == b"2"
    assert proxy.connections_accepted == 2


def test_target_down_resets_the_client(echo: tuple[str, int]) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connections are refused
        with (
            FaultProxy("127.0.0.1", port) as proxy,
            pytest.raises(ConnectionResetError),
            connect(proxy) as sock,
        ):
            round_trip(sock, b"anyone?")
        assert proxy.connections_accepted == 1


def test_refuse_stops_listening_and_restore_listens_on_the_same_port(proxy: FaultProxy) -> None:
    port = proxy.port
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    proxy.restore()
    assert proxy.port == port
    with connect(proxy) as sock:
        assert round_trip(sock, b"back") == b"back"
