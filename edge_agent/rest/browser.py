"""What a browser may do with the agent's REST API: which pages may call it (Origin), by what
name it may be reached (Host), and the CORS answers and preflights for the allowed origins.

CORS alone only stops a page from reading an answer; a page can still send a request. So a
request that carries an Origin (browsers add it to every cross-origin call) is refused unless
the origin is the agent's own or one the operator allowed. While the API listens only on
loopback, a Host header must name loopback too, so a page on a domain that re-resolves to
127.0.0.1 (DNS rebinding) cannot pass for the agent's own origin.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from edge_agent.rest.errors import ForbiddenHost, ForbiddenOrigin, error_response
from edge_agent.settings import is_loopback

__all__ = ["BrowserGuard", "browser_middleware"]

# What a page may send: JSON bodies, a bearer token, the deadline, EventSource's resume header.
ALLOWED_HEADERS = ("Content-Type", "Authorization", "Request-Timeout", "Last-Event-ID")


class BrowserGuard:
    """ASGI middleware: refuses (403) a foreign Origin and, when loopback-only, a foreign Host."""

    def __init__(self, app: ASGIApp, *, origins: Sequence[str], loopback_only: bool) -> None:
        self.app = app
        self.origins = frozenset(origins)
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host = headers.get("host", "")
            origin = headers.get("origin")
            refusal: Exception | None = None
            if self.loopback_only and not is_loopback(_host_name(host)):
                refusal = ForbiddenHost(host)
            elif origin is not None and not self._allowed(origin, f"{scope['scheme']}://{host}"):
                refusal = ForbiddenOrigin(origin)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _allowed(self, origin: str, own: str) -> bool:
        return origin == own or origin in self.origins or "*" in self.origins


def _host_name(host: str) -> str:
    """The name in a Host header, without its port: `[::1]:8002` -> `::1`."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def browser_middleware(origins: Sequence[str], *, loopback_only: bool) -> list[Middleware]:
    """The guard, then CORS headers and preflights for the allowed origins (if any)."""
    middleware = [Middleware(BrowserGuard, origins=origins, loopback_only=loopback_only)]
    if origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(origins),
                allow_methods=["GET", "POST"],
                allow_headers=list(ALLOWED_HEADERS),
                # The operator named these origins: pages from them may reach the agent on this
                # machine's loopback even when they come from a public site (Chrome asks first).
                allow_private_network=True,
                max_age=600,
            )
        )
    return middleware
