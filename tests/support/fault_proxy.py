"""A fault-injecting TCP proxy for tests: cut, black-hole, delay, throttle and reset a real link.

netem is not available on the test machines. The proxy runs its own event loop in its own thread,
so sync tests, async tests and subprocess daemons can all be put behind it.

It reads the HTTP/1.1 requests that pass (request line, headers, Content-Length) without changing
them, so a fault can start at a named moment of an exchange (`Phase`): as a connection opens,
halfway through a request's bytes, or halfway through the first bytes of its response; and it
records each request it saw (`requests`: when, on which connection, its Idempotency-Key).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self, TypeVar

__all__ = ["ConnectionFault", "FaultProxy", "Phase", "ProxyEnds", "SeenRequest"]

T = TypeVar("T")
UP, DOWN = "to_target", "to_client"
_MAX_HEAD = 65536


class Phase(StrEnum):
    """When, in an exchange, a fault starts."""

    CONNECT = "connect"  # as the connection is accepted, before a byte is forwarded
    REQUEST = "request"  # once half of a request's bytes (head and body) went through
    RESPONSE = "response"  # once half of the first bytes of its response went through


class ConnectionFault(StrEnum):
    """What happens to a connection at the phase: each one a way real links fail."""

    RESET = "reset"  # TCP RST to both sides
    CUT_UPSTREAM = "cut_upstream"  # RST to the server; the client hears nothing more
    CUT_DOWNSTREAM = "cut_downstream"  # RST to the client; the server's side is closed cleanly
    SLOW_CLOSE = "slow_close"  # nothing more flows; a clean FIN to both after `close_delay_s`


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """A request head the proxy read on its way to the target."""

    connection: int
    method: str
    path: str
    key: str | None
    """Its Idempotency-Key header, if any."""
    monotonic: float
    wall: float


class _Stop(Exception):
    """The connection was ended by a fault: stop pumping."""


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Close with SO_LINGER 0, so the peer gets a TCP RST rather than a clean FIN."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Connection:
    handler: asyncio.Task[Any]
    client: asyncio.StreamWriter
    number: int = 0
    upstream: asyncio.StreamWriter | None = None
    held: bool = False
    """A fault took it: what still arrives is dropped and no end is passed on."""
    closing_slowly: bool = False
    # HTTP/1.1 bookkeeping of the upstream stream, for phases and the request log
    head: bytes = b""
    body_left: int = 0
    up_offset: int = 0
    mids: list[tuple[int, str | None]] = field(default_factory=list)
    requests: int = 0
    responses: int = 0
    last_key: str | None = None

    def kill(self) -> None:
        """Reset both sides and end the handler (it may be waiting out a black hole)."""
        _rst(self.client)
        _rst(self.upstream)
        if self.handler is not asyncio.current_task():
            self.handler.cancel()


class ProxyEnds:
    """What a proxy in this thread and one in a process of its own share: the URL of the port
    it listens on, and `with` to start and close it."""

    port: int

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class FaultProxy(ProxyEnds):
    """Forward 127.0.0.1:<port> to `target`, with faults switched on and off at run time.

    - `cut()`: existing connections are reset and new ones are reset as soon as accepted.
    - `black_hole()`: nothing is forwarded or answered; data is held (as a dead route would
      hold it in buffers and retransmissions) and flows again after `restore()`.
    - `delay(s)`: each chunk is delivered `s` seconds after it arrived, in each direction.
    - `throttle(bps)`: at most `bps` bytes per second each way, over all connections.
    - `reset()`: existing connections get a TCP RST; new ones are served normally.
    - `refuse()`: nothing listens: connecting is refused, as to a host whose server is down
      (existing connections are reset). The port is listened on again by `restore()`.
    - `slice(n)`: data is delivered in writes of `n` bytes (1: one byte per TCP segment).
    - `flap(period_s)`: cut for `period_s`, then up for `period_s`, over and over.
    - `on(fault, phase)`: every connection meets `fault` at `phase` (ConnectionFault).
    - `at(phase, change)`: the next exchange to reach `phase` switches on a link fault:
      `change` is one of "cut", "black_hole", "delay:<s>", "throttle:<bps>", "slice:<n>",
      "flap:<s>".
    - `restore()`: no faults; connections a fault holds are reset.

    `bytes_to_target` and `bytes_to_client` count what was passed on each way, every byte of
    the TCP streams (not TCP/IP headers): what an HTTP client wrote and read, when no fault
    held or dropped any of it.
    """

    def __init__(self, target_host: str, target_port: int, *, chunk_size: int = 16384) -> None:
        self.target = (target_host, target_port)
        self.chunk_size = chunk_size
        self.port = 0
        self.bytes = {UP: 0, DOWN: 0}
        self.connections_accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="proxy")
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        # Taken by SLOW_CLOSE: their handlers have ended, their sockets close on a timer.
        self._closing_slowly: set[_Connection] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._cut = False
        self._flowing: asyncio.Event | None = None
        self._delay = 0.0
        self._rate: float | None = None
        self._next_free = {UP: 0.0, DOWN: 0.0}
        self._slice: int | None = None
        self._fault: tuple[ConnectionFault, Phase] | None = None
        self.close_delay_s = 1.0
        self._armed: list[tuple[Phase, str]] = []
        self._flapper: asyncio.Task[None] | None = None
        self.requests: list[SeenRequest] = []
        self.hits: list[tuple[str, Phase, str | None]] = []
        """(fault, phase, the Idempotency-Key of the exchange it hit, if known)."""

    # --- life cycle, from the test's thread -------------------------------------------------

    def start(self) -> Self:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    @property
    def bytes_to_target(self) -> int:
        return self.bytes[UP]

    @property
    def bytes_to_client(self) -> int:
        return self.bytes[DOWN]

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    # --- faults ----------------------------------------------------------------------------

    def cut(self) -> None:
        self._call(self._set(cut=True, kill=True))

    def black_hole(self) -> None:
        self._call(self._set(flowing=False))

    def delay(self, seconds: float) -> None:
        self._call(self._set(delay=seconds))

    def throttle(self, bytes_per_second: float | None) -> None:
        self._call(self._set(rate=bytes_per_second, set_rate=True))

    def reset(self) -> None:
        self._call(self._set(kill=True))

    def refuse(self) -> None:
        self._call(self._stop_listening())

    def slice(self, size: int | None) -> None:
        self._call(self._apply_async(f"slice:{size or 0}"))

    def flap(self, period_s: float) -> None:
        self._call(self._apply_async(f"flap:{period_s}"))

    def on(self, fault: ConnectionFault | str, phase: Phase | str) -> None:
        self._call(self._set_fault((ConnectionFault(fault), Phase(phase))))

    def at(self, phase: Phase | str, change: str) -> None:
        self._call(self._arm(Phase(phase), change))

    def restore(self) -> None:
        self._call(self._restore())

    # --- the loop's side ------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        if self._server is not None:
            return
        # The same port again (0 the first time): clients keep the URL they were given.
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._server = None
        for connection in list(self._connections):
            connection.kill()

    async def _set(
        self,
        *,
        cut: bool | None = None,
        flowing: bool | None = None,
        delay: float | None = None,
        rate: float | None = None,
        set_rate: bool = False,
        kill: bool = False,
    ) -> None:
        assert self._flowing is not None
        if cut is not None:
            self._cut = cut
        if flowing is True:
            self._flowing.set()
        elif flowing is False:
            self._flowing.clear()
        if delay is not None:
            self._delay = max(0.0, delay)
        if set_rate:
            self._rate = rate
            self._next_free = {UP: 0.0, DOWN: 0.0}
        if kill:
            for connection in list(self._connections):
                connection.kill()

    async def _apply_async(self, change: str) -> None:
        self._apply(change)

    async def _set_fault(self, fault: tuple[ConnectionFault, Phase] | None) -> None:
        self._fault = fault
        if fault is not None and fault[1] is Phase.CONNECT:
            # Kept-alive connections were opened before: close them cleanly (FIN), so the
            # next exchange has to connect, and meets the fault.
            for connection in list(self._connections):
                _close(connection.client)
                _close(connection.upstream)

    async def _arm(self, phase: Phase, change: str) -> None:
        if phase is Phase.CONNECT:
            self._apply(change)  # no exchange to wait for: the next connection meets it
        else:
            self._armed.append((phase, change))

    def _apply(self, change: str) -> None:
        """Switch on a link fault, on the loop (from a phase point or a public method)."""
        assert self._flowing is not None
        kind, _, value = change.partition(":")
        if kind == "cut":
            self._cut = True
            for connection in list(self._connections):
                connection.kill()
        elif kind == "black_hole":
            self._flowing.clear()
        elif kind == "delay":
            self._delay = max(0.0, float(value))
        elif kind == "throttle":
            self._rate, self._next_free = float(value), {UP: 0.0, DOWN: 0.0}
        elif kind == "slice":
            self._slice = int(value) or None
        elif kind == "flap":
            if self._flapper is None:
                self._flapper = asyncio.ensure_future(self._flap(float(value)))
        else:
            raise ValueError(f"unknown link fault {change!r}")

    async def _flap(self, period_s: float) -> None:
        while True:
            self._apply("cut")
            await asyncio.sleep(period_s)
            self._cut = False
            await asyncio.sleep(period_s)

    async def _restore(self) -> None:
        if self._flapper is not None:
            self._flapper.cancel()
            self._flapper = None
        self._fault, self._armed, self._slice = None, [], None
        await self._set(cut=False, flowing=True, delay=0.0, set_rate=True)
        await self._listen()
        for connection in list(self._connections):
            if connection.held:
                connection.kill()

    async def _phase(self, connection: _Connection, phase: Phase, key: str | None) -> None:
        """An exchange reached `phase`: fire the link faults armed for it, and the connection
        fault if it is this phase's; raise _Stop when the connection is ended."""
        for armed in [a for a in self._armed if a[0] is phase]:
            self._armed.remove(armed)
            self.hits.append((armed[1], phase, key))
            self._apply(armed[1])
        if self._cut and phase is not Phase.CONNECT:
            raise _Stop()
        if self._fault is None or self._fault[1] is not phase or connection.held:
            return
        fault = self._fault[0]
        self.hits.append((fault.value, phase, key))
        connection.held = True
        if fault is ConnectionFault.RESET:
            connection.kill()
        elif fault is ConnectionFault.CUT_UPSTREAM:
            _rst(connection.upstream)
        elif fault is ConnectionFault.CUT_DOWNSTREAM:
            _rst(connection.client)
            _close(connection.upstream)
        else:  # SLOW_CLOSE
            connection.closing_slowly = True
            self._closing_slowly.add(connection)
            asyncio.get_running_loop().call_later(
                self.close_delay_s, self._close_slowly, connection
            )
        raise _Stop()

    # -- HTTP/1.1 bookkeeping: where requests and responses are in the two streams ---------

    def _read_up(self, connection: _Connection, data: bytes) -> list[tuple[int, Phase, str | None]]:
        """Requests in the client's bytes: log each head, mark the middle of each request."""
        base = connection.up_offset
        connection.up_offset += len(data)
        i = 0
        while i < len(data):
            if connection.body_left:
                took = min(connection.body_left, len(data) - i)
                connection.body_left -= took
                i += took
                continue
            connection.head += data[i:]
            end = connection.head.find(b"\r\n\r\n")
            if end < 0:
                connection.head = connection.head[-_MAX_HEAD:]
                break
            head, rest = connection.head[: end + 4], connection.head[end + 4 :]
            start = base + len(data) - len(rest) - len(head)
            connection.head = b""
            i = len(data) - len(rest)
            method, path, key, length = _parse_head(head)
            connection.requests += 1
            connection.last_key = key
            self.requests.append(
                SeenRequest(connection.number, method, path, key, time.monotonic(), time.time())
            )
            connection.body_left = length
            connection.mids.append((start + max(1, (len(head) + length) // 2), key))
        marks = []
        for mid, key in list(connection.mids):
            if mid < base + len(data):
                connection.mids.remove((mid, key))
                marks.append((max(0, mid - base), Phase.REQUEST, key))
        return marks

    def _read_down(
        self, connection: _Connection, data: bytes
    ) -> list[tuple[int, Phase, str | None]]:
        """The first bytes from the target after a request start its response."""
        if not data or connection.responses >= connection.requests:
            return []
        connection.responses = connection.requests
        return [(max(1, len(data) // 2), Phase.RESPONSE, connection.last_key)]

    def _close_slowly(self, connection: _Connection) -> None:
        self._closing_slowly.discard(connection)
        _close(connection.client)
        _close(connection.upstream)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._closing_slowly):  # their timers would never run
            self._close_slowly(connection)
        for connection in list(self._connections):
            connection.kill()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections_accepted += 1
        connection = _Connection(task, writer, self.connections_accepted)
        self._connections.add(connection)
        _nodelay(writer)
        try:
            if self._cut:
                return
            # In a black hole too: what the client sends is read (and logged) at once and held
            # until the hole closes, as a dead route holds it in buffers and retransmissions.
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return
            connection.upstream = up_writer
            _nodelay(up_writer)
            try:
                await self._phase(connection, Phase.CONNECT, None)
            except _Stop:
                await self._drain_held(connection, reader)
                return
            pumps = asyncio.gather(
                self._pump(connection, reader, up_writer, UP),
                self._pump(connection, up_reader, writer, DOWN),
            )
            try:
                await pumps
            finally:
                pumps.cancel()
            if not connection.held:
                for side in (writer, up_writer):  # both streams ended: close cleanly (FIN)
                    side.close()
        except asyncio.CancelledError:
            pass
        finally:
            if (
                not connection.held
                or self._fault is None
                or self._fault[0] is not ConnectionFault.SLOW_CLOSE
            ):
                connection.kill()
            self._connections.discard(connection)
            self._handlers.discard(task)

    async def _drain_held(self, connection: _Connection, reader: asyncio.StreamReader) -> None:
        """A connection a fault took at connect: read and drop until the client goes."""
        if not connection.held:
            return
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(self.chunk_size):
                pass

    async def _pump(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: str,
    ) -> None:
        """Read as it comes, deliver `delay` after arrival, in order, within the rate; stop at
        a phase point a fault ends, and drop what comes after it."""
        # b"" is the end of the stream; None means the source was reset, passed on as a reset
        queue: asyncio.Queue[tuple[float, bytes | None, list[Any]]] = asyncio.Queue(maxsize=64)
        marker = self._read_up if direction == UP else self._read_down

        async def read() -> None:
            while True:
                try:
                    data: bytes | None = await reader.read(self.chunk_size)
                except (ConnectionError, OSError):
                    data = None
                marks = marker(connection, data) if data else []
                await queue.put((asyncio.get_running_loop().time(), data, marks))
                if not data:
                    return

        reading = asyncio.ensure_future(read())
        try:
            while True:
                arrived, data, marks = await queue.get()
                if connection.held:
                    if not data:
                        return
                    continue
                if data is None:
                    _rst(writer)
                    return
                done = 0
                try:
                    for index, phase, key in sorted(marks, key=lambda m: m[0]):
                        if index > done:  # (an empty piece would be read as the end)
                            await self._deliver(writer, direction, arrived, data[done:index])
                            done = index
                        await self._phase(connection, phase, key)
                except _Stop:
                    continue  # held: later data is dropped; killed: the reads end
                if not data:
                    await self._deliver(writer, direction, arrived, data)
                    return
                if done < len(data):
                    await self._deliver(writer, direction, arrived, data[done:])
        except (ConnectionError, OSError):
            _rst(writer)
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await reading

    async def _deliver(
        self, writer: asyncio.StreamWriter, direction: str, arrived: float, data: bytes
    ) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        await self._flowing.wait()
        late = arrived + self._delay - loop.time()
        if late > 0:
            await asyncio.sleep(late)
        await self._flowing.wait()
        if not data:
            if writer.can_write_eof() and not writer.transport.is_closing():
                writer.write_eof()
            return
        piece = len(data) if self._rate is None else max(256, int(self._rate / 50))
        if self._slice is not None:
            piece = min(piece, self._slice)
        for start in range(0, len(data), piece):
            part = data[start : start + piece]
            if self._rate is not None:
                begin = max(loop.time(), self._next_free[direction])
                self._next_free[direction] = begin + len(part) / self._rate
                await asyncio.sleep(self._next_free[direction] - loop.time())
            writer.write(part)
            await writer.drain()
            self.bytes[direction] += len(part)
            if self._slice is not None:
                await asyncio.sleep(0)  # one write per segment: let the loop send it alone


def _close(writer: asyncio.StreamWriter | None) -> None:
    """A clean close: FIN."""
    if writer is not None and not writer.transport.is_closing():
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _parse_head(head: bytes) -> tuple[str, str, str | None, int]:
    """Method, path, Idempotency-Key and Content-Length of an HTTP/1.1 request head."""
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    path = rest.rpartition(" ")[0] or rest
    key, length = None, 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "idempotency-key":
            key = value.strip()
        elif name == "content-length":
            with contextlib.suppress(ValueError):
                length = max(0, int(value.strip()))
    return method, path, key, length
