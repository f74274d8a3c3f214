"""The agent's REST application: v2 inference, tickets and results, the kiosk page, the browser
rules, who may call (edge_agent.access), and a count of every answer in
edge_agent_http_requests_total."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_agent.access import AccessPolicy
from edge_agent.inference import InferenceService
from edge_agent.metrics import AgentMetrics
from edge_agent.rest.auth import Authenticate
from edge_agent.rest.browser import browser_middleware
from edge_agent.rest.router_routes import RouterRoutes
from edge_agent.rest.v2_routes import V2Routes
from model_runtime.http_body import BodyLimits
from model_runtime.v2_json import error_body
from router import Router

__all__ = ["KIOSK_DIR", "create_app"]

KIOSK_DIR = Path(__file__).parent / "kiosk"


class _CountAnswers:
    """Outermost ASGI middleware: counts each answer by route name, model and status."""

    def __init__(self, app: ASGIApp, *, metrics: AgentMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def noting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            route = scope.get("route")
            endpoint = (route.name or "other") if isinstance(route, Route | Mount) else "other"
            name = scope.get("path_params", {}).get("name")
            model = name if isinstance(name, str) and endpoint != "kiosk" else ""
            self.metrics.count_http_request(endpoint, model, status)


async def _http_exception(request: Request, exc: Exception) -> Response:
    # Starlette's own refusals (no such path, wrong method) as v2 error bodies too.
    assert isinstance(exc, HTTPException)
    return JSONResponse(error_body(str(exc.detail)), exc.status_code, headers=exc.headers)


def create_app(
    service: InferenceService,
    router: Router,
    metrics: AgentMetrics,
    *,
    max_body_bytes: int,
    cors_origins: Sequence[str],
    loopback_only: bool,
    access: AccessPolicy | None = None,
) -> tuple[Starlette, RouterRoutes]:
    """The app, and its result streams (to end them when the agent stops). With `access` that
    requires credentials, every call but health checks and the kiosk page's files needs them."""
    v2 = V2Routes(service, metrics, BodyLimits(max_body_bytes, max_body_bytes))
    tickets = RouterRoutes(router)
    routes: list[BaseRoute] = [
        *v2.routes(),
        *tickets.routes(),
        Route("/", lambda request: RedirectResponse("/kiosk/"), name="root"),
        Mount("/kiosk", StaticFiles(directory=KIOSK_DIR, html=True), name="kiosk"),
    ]
    middleware = [
        Middleware(_CountAnswers, metrics=metrics),
        # Before authentication: a refusal carries CORS headers, so a page can read it.
        *browser_middleware(cors_origins, loopback_only=loopback_only),
    ]
    if access is not None and access.required:
        middleware.append(
            Middleware(Authenticate, policy=access, on_denied=metrics.count_auth_failure)
        )
    handlers: dict[Any, Any] = {HTTPException: _http_exception}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
    return app, tickets
