"""The agent's grpc.aio server: v2 inference, standard health checking and server reflection."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge_agent.grpc._generated import grpc_service_pb2 as pb
from edge_agent.grpc._generated import grpc_service_pb2_grpc as pb_grpc
from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from edge_agent.grpc.router_servicer import RouterServicer
from edge_agent.grpc.v2_servicer import V2Servicer

__all__ = ["GrpcServer", "ListenError"]

V2_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ROUTER_SERVICE = rpb.DESCRIPTOR.services_by_name["RouterService"].full_name


class ListenError(Exception):
    def __init__(self, address: str, tls: bool = False) -> None:
        why = "address in use or not available" + (
            ", or the TLS certificate and key are unusable" if tls else ""
        )
        super().__init__(f"cannot listen on {address}: {why}")


class GrpcServer:
    """Binds at construction (so a taken port fails early), serves after `start`."""

    def __init__(
        self,
        v2: V2Servicer,
        router: RouterServicer,
        address: str,
        max_message_bytes: int,
        *,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        """`credentials`: TLS (edge_agent.grpc.auth.server_credentials); None: plaintext."""
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
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(v2, self._server)
        rpb_grpc.add_RouterServiceServicer_to_server(router, self._server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        services = (V2_SERVICE, ROUTER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, self._server)
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError:
            raise ListenError(address, credentials is not None) from None
        if self.port == 0:
            raise ListenError(address, credentials is not None)

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
