"""The fault proxy against a tiny echo server on real sockets: every fault is observable."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.fault_proxy import ConnectionFault, FaultProxy, Phase
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
        proxy.delay(1.0)
        start = time.monotonic()
        assert round_trip(sock, b"slow") == b"slow"
        slow = time.monotonic() - start
    assert slow >= 2.0  # 1 s out, 1 s back
    # Not delayed twice, nor once for each chunk; wide margins, as a busy machine needs.
    assert slow < 3.9
    assert fast < slow - 1.5


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


def http_request(key: str, body: bytes = b"x" * 100) -> bytes:
    head = f"POST /infer HTTP/1.1\r\nHost: t\r\nIdempotency-Key: {key}\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def read_all(sock: socket.socket) -> tuple[bytes, type[BaseException] | None]:
    """Everything the socket gives until its end, and how it ended (None: a clean FIN)."""
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except OSError as exc:
        return got, type(exc)
    return got, None


def test_requests_are_logged_with_their_keys_and_one_byte_slices_arrive_whole(
    proxy: FaultProxy,
) -> None:
    proxy.slice(1)
    with connect(proxy) as sock:
        for key in ("a-1", "b-2"):
            data = http_request(key)
            assert round_trip(sock, data) == data
    assert [(r.key, r.method, r.path, r.connection) for r in proxy.requests] == [
        ("a-1", "POST", "/infer", 1),
        ("b-2", "POST", "/infer", 1),
    ]


def test_a_reset_mid_request_delivers_half_of_it_then_resets(proxy: FaultProxy) -> None:
    proxy.on(ConnectionFault.RESET, Phase.REQUEST)
    data = http_request("k", b"y" * 1000)
    with connect(proxy) as sock:
        sock.sendall(data)
        got, ended = read_all(sock)
    assert ended is ConnectionResetError
    assert got == b""  # reset before the echo could come back
    assert 0 < proxy.bytes_to_target < len(data)  # about half went through
    assert proxy.hits == [("reset", Phase.REQUEST, "k")]


def test_cut_downstream_mid_response_resets_the_client_only_after_part_of_the_answer(
    proxy: FaultProxy,
) -> None:
    proxy.on("cut_downstream", "response")
    data = http_request("k")
    with connect(proxy) as sock:
        sock.sendall(data)
        got, ended = read_all(sock)
    assert ended is ConnectionResetError
    assert 0 < len(got) < len(data)
    proxy.restore()
    with connect(proxy) as sock:
        assert round_trip(sock, data) == data


def test_slow_close_holds_then_closes_cleanly(proxy: FaultProxy) -> None:
    proxy.close_delay_s = 0.3
    proxy.on(ConnectionFault.SLOW_CLOSE, Phase.CONNECT)
    with connect(proxy) as sock:
        sock.sendall(http_request("k"))
        start = time.monotonic()
        assert sock.recv(100) == b""  # a FIN, not a reset, and nothing before it
        assert time.monotonic() - start >= 0.25


def test_a_link_fault_armed_for_a_phase_starts_there(proxy: FaultProxy) -> None:
    proxy.at(Phase.REQUEST, "black_hole")
    data = http_request("k", b"z" * 1000)
    with connect(proxy, timeout=0.5) as sock:
        sock.sendall(data)
        got, ended = read_all(sock)
        assert ended is TimeoutError
        assert got == b""  # the echo of the first half is held on its way back
        assert 0 < proxy.bytes_to_target < len(data)  # half went through before the hole
        proxy.restore()
        sock.settimeout(5)
        while len(got) < len(data):
            got += sock.recv(65536)
    assert got == data


def test_flapping_cuts_and_restores_in_turn(proxy: FaultProxy) -> None:
    proxy.flap(0.2)

    def answers() -> bool:
        try:
            with connect(proxy, timeout=0.5) as sock:
                return round_trip(sock, b"ping") == b"ping"
        except OSError:
            return False

    seen = set()
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        seen.add(answers())
        time.sleep(0.05)
    assert seen == {True, False}
    proxy.restore()
    wait_until(answers, 5)
