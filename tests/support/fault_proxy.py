"""A fault-injecting TCP proxy for tests: cut, black-hole, delay, throttle and reset a real link.

netem is not available on the test machines. The proxy runs its own event loop in its own thread,
so sync tests, async tests and subprocess daemons can all be put behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["FaultProxy"]

T = TypeVar("T")
UP, DOWN = "to_target", "to_client"


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
    upstream: asyncio.StreamWriter | None = None

    def kill(self) -> None:
        """Reset both sides and end the handler (it may be waiting out a black hole)."""
        _rst(self.client)
        _rst(self.upstream)
        if self.handler is not asyncio.current_task():
            self.handler.cancel()


class FaultProxy:
    """Forward 127.0.0.1:<port> to `target`, with faults switched on and off at run time.

    - `cut()`: existing connections are reset and new ones are reset as soon as accepted.
    - `black_hole()`: nothing is forwarded or answered; data is held (as a dead route would
      hold it in buffers and retransmissions) and flows again after `restore()`.
    - `delay(s)`: each chunk is delivered `s` seconds after it arrived, in each direction.
    - `throttle(bps)`: at most `bps` bytes per second each way, over all connections.
    - `reset()`: existing connections get a TCP RST; new ones are served normally.
    - `refuse()`: nothing listens: connecting is refused, as to a host whose server is down
      (existing connections are reset). The port is listened on again by `restore()`.
    - `restore()`: no faults.

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
        self._handlers: set[asyncio.Task[Any]] = set()
        self._cut = False
        self._flowing: asyncio.Event | None = None
        self._delay = 0.0
        self._rate: float | None = None
        self._next_free = {UP: 0.0, DOWN: 0.0}

    # --- life cycle, from the test's thread -------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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

    def restore(self) -> None:
        self._call(self._set(cut=False, flowing=True, delay=0.0, set_rate=True))
        self._call(self._listen())

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

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
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
        connection = _Connection(task, writer)
        self._connections.add(connection)
        self.connections_accepted += 1
        try:
            if self._cut:
                return
            await self._flowing.wait()  # black hole: accepted, never forwarded, until restored
            if self._cut:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return
            connection.upstream = up_writer
            pumps = asyncio.gather(
                self._pump(reader, up_writer, UP), self._pump(up_reader, writer, DOWN)
            )
            try:
                await pumps
            finally:
                pumps.cancel()
            for side in (writer, up_writer):  # both streams ended: close cleanly (FIN)
                side.close()
        except asyncio.CancelledError:
            pass
        finally:
            connection.kill()
            self._connections.discard(connection)
            self._handlers.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        """Read as it comes, deliver `delay` after arrival, in order, within the rate."""
        # b"" is the end of the stream; None means the source was reset, passed on as a reset
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(maxsize=64)

        async def read() -> None:
            while True:
                try:
                    data: bytes | None = await reader.read(self.chunk_size)
                except (ConnectionError, OSError):
                    data = None
                await queue.put((asyncio.get_running_loop().time(), data))
                if not data:
                    return

        reading = asyncio.ensure_future(read())
        try:
            while True:
                arrived, data = await queue.get()
                if data is None:
                    _rst(writer)
                    return
                await self._deliver(writer, direction, arrived, data)
                if not data:
                    return
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
        for start in range(0, len(data), piece):
            part = data[start : start + piece]
            if self._rate is not None:
                begin = max(loop.time(), self._next_free[direction])
                self._next_free[direction] = begin + len(part) / self._rate
                await asyncio.sleep(self._next_free[direction] - loop.time())
            writer.write(part)
            await writer.drain()
            self.bytes[direction] += len(part)
