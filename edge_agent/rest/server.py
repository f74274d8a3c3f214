"""The agent's REST server: uvicorn, on the agent's own event loop beside the gRPC server.

uvicorn is made for owning a process; here it is one part of one, so it neither installs
signal handlers (the agent's composition root owns SIGTERM) nor configures logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Generator

import uvicorn
from starlette.applications import Starlette

from edge_agent.rest.router_routes import RouterRoutes
from model_runtime.sockets import bind_socket

__all__ = ["RestServer"]


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class RestServer:
    """Binds at construction (so a taken port fails early), serves after `start`."""

    def __init__(self, app: Starlette, streams: RouterRoutes, host: str, port: int) -> None:
        self._streams = streams
        self._socket = bind_socket(host, port)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            # h11 refuses a request head over 16 KiB; httptools would buffer any amount of
            # headers (48 MB measured) before the app could refuse anything. It is also ~1.2x
            # faster (BENCHMARKS.md), which does not buy that back.
            http="h11",
            lifespan="off",
            log_config=None,
            log_level="warning",  # its start and stop lines would repeat the agent's own
            access_log=False,
            server_header=False,
            # Kiosks keep one connection open between requests a few seconds apart.
            timeout_keep_alive=30,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():  # it failed to start: say why
                await self._task
            await asyncio.sleep(0.01)

    async def stop(self, grace_seconds: float) -> None:
        """End the result streams, let answers in flight go out within the grace period, stop."""
        self._streams.close_streams()
        self._server.config.timeout_graceful_shutdown = max(1, math.ceil(grace_seconds))
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._socket.close()
