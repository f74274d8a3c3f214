"""The gRPC side of edge_agent.access: server TLS credentials, and an interceptor that
authenticates every call but health checks and hands the caller to the servicers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

from edge_agent.access import ANONYMOUS, AccessDenied, AccessPolicy, Caller

__all__ = ["AuthInterceptor", "current_caller", "server_credentials"]

# Each call runs in a task of its own, so a value set for one call is seen by that call only.
_CALLER: ContextVar[Caller] = ContextVar("edge_agent_caller", default=ANONYMOUS)
OPEN_PREFIX = f"/{health.SERVICE_NAME}/"
"""Health checks need no credentials: load balancers and probes carry none."""


def current_caller() -> Caller:
    """The authenticated caller of the call being served (anonymous when none is required)."""
    return _CALLER.get()


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None
) -> grpc.ServerCredentials:
    """TLS with this certificate; with `client_ca_file`, clients must present a certificate it
    signed (grpc's Python server cannot ask for one without requiring it)."""
    ca = client_ca_file.read_bytes() if client_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(key_file.read_bytes(), cert_file.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _certificate_name(context: grpc.aio.ServicerContext) -> str | None:
    auth = context.auth_context()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        values = auth.get(key)
        if values and values[0]:
            return bytes(values[0]).decode("utf-8", errors="replace")
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without acceptable credentials (UNAUTHENTICATED, counted by reason via
    `on_denied`) and makes the caller known to the servicer through `current_caller`."""

    def __init__(self, policy: AccessPolicy, on_denied: Callable[[str], None]) -> None:
        self.policy = policy
        self.on_denied = on_denied

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIX):
            return handler
        return _wrap(handler, self._authenticate)

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode("latin-1")
        try:
            caller = self.policy.authenticate(
                authorization=authorization, certificate_name=_certificate_name(context)
            )
        except AccessDenied as exc:
            self.on_denied(exc.reason)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        _CALLER.set(caller)


Check = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


def _wrap(handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:
    """`handler` with `check(context)` run before its behaviour, whatever its kind."""

    def unary(inner: Any) -> Any:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            return await inner(request, context)

        return behaviour

    def streaming(inner: Any) -> Any:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(context)
            async for response in inner(request, context):
                yield response

        return behaviour

    if handler.unary_unary is not None:
        kind, behaviour = grpc.unary_unary_rpc_method_handler, unary(handler.unary_unary)
    elif handler.stream_unary is not None:
        kind, behaviour = grpc.stream_unary_rpc_method_handler, unary(handler.stream_unary)
    elif handler.unary_stream is not None:
        kind, behaviour = grpc.unary_stream_rpc_method_handler, streaming(handler.unary_stream)
    else:
        kind, behaviour = grpc.stream_stream_rpc_method_handler, streaming(handler.stream_stream)
    wrapped: grpc.RpcMethodHandler = kind(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return wrapped
