"""A TLS terminator for tests: TLS (optionally requiring a client certificate) on 127.0.0.1, plain
TCP to a target, as a load balancer or nginx in front of the cloud gateway would be.

It runs its own event loop in its own thread, like FaultProxy, so a subprocess daemon can talk to
it while the test's thread waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from typing import Any

__all__ = ["TlsTerminator"]


class TlsTerminator:
    """`with TlsTerminator(port, context) as t:` serves TLS on 127.0.0.1:`t.port`.

    `client_names` lists the common names of the client certificates of the handshakes that
    completed, in order (empty strings for clients without one).
    """

    def __init__(self, target_port: int, context: ssl.SSLContext) -> None:
        self.target_port = target_port
        self.context = context
        self.port = 0
        self.client_names: list[str] = []
        self.handshakes_failed = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="tls")
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def __enter__(self) -> TlsTerminator:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    async def _start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, ssl=self.context, ssl_handshake_timeout=10
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peercert") or {}
        names = [v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"]
        self.client_names.append(names[0] if names else "")
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()
