"""The agent's REST server: uvicorn, on the agent's own event loop beside the gRPC server.

uvicorn is made for owning a process; here it is one part of one, so it neither installs
signal handlers (the agent's composition root owns SIGTERM) nor configures logging. Its
connections are guarded as the gateway's are (model_runtime.connection_guard).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from ssl import CERT_REQUIRED
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from edge_agent.rest.auth import CERTIFICATE_NAME
from edge_agent.rest.router_routes import RouterRoutes
from model_runtime.connection_guard import (
    ACCEPT_BATCH,
    STATE_KEY,
    ConnectionGuard,
    GuardedH11Protocol,
)
from model_runtime.sockets import bind_socket

__all__ = ["RestServer", "ServerTls"]


@dataclass(frozen=True, slots=True)
class ServerTls:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    """With it, a client must present a certificate it signed, as on the gRPC API."""

    def uvicorn_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "ssl_certfile": str(self.cert_file),
            "ssl_keyfile": str(self.key_file),
        }
        if self.client_ca_file is not None:
            options |= {"ssl_ca_certs": str(self.client_ca_file), "ssl_cert_reqs": CERT_REQUIRED}
        return options


class _NamingH11Protocol(GuardedH11Protocol):
    """uvicorn's h11 protocol, guarded, that tells the app the name in a client's verified
    certificate (uvicorn itself does not), so REST names mTLS callers as gRPC does
    (edge_agent.rest.auth)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        name = certificate_name(transport.get_extra_info("peercert"))
        if name is not None:
            app = self.app

            async def naming(scope: Scope, receive: Receive, send: Send) -> None:
                scope[CERTIFICATE_NAME] = name
                await app(scope, receive, send)

            self.app = naming


def certificate_name(peercert: dict[str, Any] | None) -> str | None:
    """The common name of a verified client certificate, else its first alternative name."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    for _kind, value in peercert.get("subjectAltName", ()):
        if value:
            return str(value)
    return None


class _EmbeddedServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, connections: ConnectionGuard) -> None:
        super().__init__(config)
        self._connections = connections

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # The channel to every connection's protocol; with lifespan off, nothing else is in it.
        self.lifespan.state[STATE_KEY] = self._connections
        config = self.config
        if config.ssl is None or not sockets:
            await super().startup(sockets)
            return
        # uvicorn leaves a TLS handshake asyncio's 60 s, and a connection counts (and its
        # header time runs) only once the handshake is done: listen here instead, giving a
        # handshake the header timeout, and let uvicorn do the rest of its start-up.
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            made: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=loop,
            )
            return made

        servers = [
            await loop.create_server(
                protocol,
                sock=sock,
                ssl=config.ssl,
                backlog=config.backlog,
                ssl_handshake_timeout=self._connections.header_timeout_s,
            )
            for sock in sockets
        ]
        await super().startup(sockets=[])
        self.servers.extend(servers)  # closed by uvicorn's shutdown, as its own are


class RestServer:
    """Binds at construction (so a taken port fails early), serves after `start`."""

    def __init__(
        self,
        app: Starlette,
        streams: RouterRoutes,
        host: str,
        port: int,
        *,
        connections: ConnectionGuard,
        tls: ServerTls | None = None,
    ) -> None:
        """With `tls`, HTTPS only (the gRPC API's certificate and key, and its client CA);
        `connections`: the header deadline, the cap and their counters."""
        self._streams = streams
        self._connections = connections
        self._socket = bind_socket(host, port)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            # h11, which refuses a request head over 16 KiB; httptools would buffer any amount of
            # headers (48 MB measured) before the app could refuse anything. It is also 1.5-1.7x
            # faster (BENCHMARKS.md), which does not buy that back.
            http=_NamingH11Protocol,
            backlog=ACCEPT_BATCH,  # accepted in one go, before the cap can count them
            # No WebSocket route: an Upgrade is ignored and counted (connection_guard), whatever
            # WebSocket library happens to be installed beside uvicorn.
            ws="none",
            lifespan="off",
            log_config=None,
            log_level="warning",  # its start and stop lines would repeat the agent's own
            access_log=False,
            server_header=False,
            # Kiosks keep one connection open between requests a few seconds apart.
            timeout_keep_alive=30,
            **(tls.uvicorn_options() if tls is not None else {}),
        )
        try:
            config.load()  # reads the TLS certificate and key now: a bad one fails at start-up
        except BaseException:
            self._socket.close()
            raise
        self._server = _EmbeddedServer(config, connections)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Accept errors (out of descriptors) counted and logged once a second, not a traceback
        # each; the agent's loop has no other handler.
        asyncio.get_running_loop().set_exception_handler(self._connections.handle_loop_exception)
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
