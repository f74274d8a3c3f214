"""The REST side of edge_agent.access: an ASGI middleware that authenticates every request but
health checks, the kiosk page's files and CORS preflights, with the rules the gRPC side uses
(`Authorization: Bearer <token>`, or the name in a verified client certificate, which the
server puts in the scope as CERTIFICATE_NAME), and hands the caller to the routes.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from edge_agent.access import ANONYMOUS, AccessDenied, AccessPolicy, Caller
from edge_agent.rest.errors import error_response

__all__ = ["CERTIFICATE_NAME", "Authenticate", "caller_of"]

_CALLER = "edge_agent.caller"
CERTIFICATE_NAME = "edge_agent.certificate_name"
"""Scope key of the name in the client's verified certificate (edge_agent.rest.server)."""
# Probes carry no token; the page is public code and asks for the token itself; a browser sends
# a preflight without credentials by design (the Fetch standard), and CORS answers it.
_OPEN_PREFIXES = ("/v2/health/", "/kiosk/")
_OPEN_PATHS = frozenset({"/"})


def caller_of(request: Request) -> Caller:
    """The authenticated caller of this request (anonymous when none is required)."""
    caller = request.scope.get(_CALLER, ANONYMOUS)
    assert isinstance(caller, Caller)
    return caller


class Authenticate:
    def __init__(
        self, app: ASGIApp, *, policy: AccessPolicy, on_denied: Callable[[str], None]
    ) -> None:
        self.app = app
        self.policy = policy
        self.on_denied = on_denied

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _open(scope):
            headers = Headers(scope=scope)
            try:
                scope[_CALLER] = self.policy.authenticate(
                    authorization=headers.get("authorization"),
                    certificate_name=scope.get(CERTIFICATE_NAME),
                )
            except AccessDenied as exc:
                self.on_denied(exc.reason)
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _open(scope: Scope) -> bool:
    path: str = scope["path"]
    preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in Headers(
        scope=scope
    )
    return preflight or path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES)
