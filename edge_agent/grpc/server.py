"""The agent's grpc.aio server: v2 inference, standard health checking and server reflection,
on TCP, on a Unix-domain socket, or both."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge_agent.grpc._generated import POOL
from edge_agent.grpc._generated import grpc_service_pb2 as pb
from edge_agent.grpc._generated import grpc_service_pb2_grpc as pb_grpc
from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from edge_agent.grpc.router_servicer import RouterServicer
from edge_agent.grpc.v2_servicer import V2Servicer

__all__ = ["GrpcServer", "ListenError"]

V2_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ROUTER_SERVICE = rpb.DESCRIPTOR.services_by_name["RouterService"].full_name


SOCKET_MODE = 0o660
"""The Unix socket's mode: the agent's group may call it (every other file the agent makes is
private to its user); connecting to a Unix socket needs write permission on it."""


class ListenError(Exception):
    def __init__(self, address: str, tls: bool = False, why: str = "") -> None:
        why = why or "address in use or not available" + (
            ", or the TLS certificate and key are unusable" if tls else ""
        )
        super().__init__(f"cannot listen on {address}: {why}")


class _HandlerTable:
    """Stands in for a server to the generated add_*_to_server function, keeping the table of
    method handlers it builds."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = dict(handlers)


def _add_v2_service(v2: V2Servicer, server: grpc.aio.Server) -> None:
    """The v2 service as generated, except that ModelInfer's requests are read by
    `v2.read_infer_request`, which sees their size on the wire."""
    table = _HandlerTable()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(v2, table)
    handlers = table.handlers
    handlers["ModelInfer"] = handlers["ModelInfer"]._replace(
        request_deserializer=v2.read_infer_request
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V2_SERVICE, handlers),))
    server.add_registered_method_handlers(V2_SERVICE, handlers)


class GrpcServer:
    """Binds at construction (so a taken port fails early), serves after `start`."""

    def __init__(
        self,
        v2: V2Servicer,
        router: RouterServicer,
        address: str | None,
        max_message_bytes: int,
        *,
        uds: Path | None = None,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        """`address`: host:port, None for no TCP listener; `uds`: a Unix socket path to listen
        on as well (both get the same `credentials`: TLS from
        edge_agent.grpc.auth.server_credentials, None for plaintext)."""
        self._server = grpc.aio.server(
            interceptors=list(interceptors),
            options=[
                # grpc-core drops anything beyond twice the limit before it reaches us;
                # between the limit and that, V2Servicer answers RESOURCE_EXHAUSTED and counts it.
                ("grpc.max_receive_message_length", 2 * max_message_bytes),
                ("grpc.max_send_message_length", -1),
                # Without this a second agent could bind the same port and steal half the calls.
                ("grpc.so_reuseport", 0),
            ],
        )
        _add_v2_service(v2, self._server)
        rpb_grpc.add_RouterServiceServicer_to_server(router, self._server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        services = (V2_SERVICE, ROUTER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, self._server, pool=POOL)
        self._credentials = credentials
        self.port = 0
        """The TCP port bound (0: no TCP listener)."""
        if address is not None:
            self.port = self._listen(address)
        self.uds = uds
        if uds is not None:
            _refuse_a_socket_in_use(uds)
            self._listen(f"unix:{uds}")
            os.chmod(uds, SOCKET_MODE)

    def _listen(self, address: str) -> int:
        tls = self._credentials is not None
        try:
            if self._credentials is None:
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, self._credentials)
        except RuntimeError:
            raise ListenError(address, tls) from None
        if port == 0:
            raise ListenError(address, tls)
        return int(port)

    async def start(self) -> None:
        await self._server.start()
        for service in ("", V2_SERVICE, ROUTER_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self) -> None:
        """Tell health checkers the agent is going (NOT_SERVING), before it stops."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_seconds: float) -> None:
        """Refuse new calls, let calls in flight finish within the grace period, then stop."""
        await self._server.stop(grace_seconds)
        if self.uds is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.uds)


def _refuse_a_socket_in_use(path: Path) -> None:
    """grpc replaces a socket file at `path`: fine for one left by an agent that died, not for
    one another process still serves. Any other kind of file is left alone (bind fails)."""
    try:
        if not stat.S_ISSOCK(path.stat().st_mode):
            return
    except OSError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return  # nobody answers: a leftover
    raise ListenError(f"unix:{path}", why="another process is serving on this socket")
