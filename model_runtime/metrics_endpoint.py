"""The /metrics endpoint of both daemons: prometheus-client's exposition behind an optional
bearer token, and the rule that keeps it on loopback unless scrapers must authenticate.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from model_runtime.private_files import SecretFileError, read_secret_text
from model_runtime.sockets import is_loopback

__all__ = [
    "REFUSAL_REASONS",
    "check_metrics_bind",
    "metrics_warning",
    "read_metrics_token",
    "serve_metrics",
]

REFUSAL_REASONS = ("missing", "malformed", "wrong")
"""Why a scrape got 401: no Authorization header, not `Bearer <token>`, another token."""

_MIN_TOKEN_CHARS = 16
_BEARER = re.compile(r"bearer[ \t]+(\S+)[ \t]*", re.IGNORECASE)
_UNAUTHORIZED_BODY = b"401 Unauthorized: /metrics needs Authorization: Bearer <token>\n"

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def check_metrics_bind(host: str, *, token_file: Path | None, insecure: bool) -> None:
    """The rule of `metrics_host`: beyond loopback, scrapers authenticate with
    metrics_token_file, or the operator opts out with metrics_insecure. Raises ValueError,
    whose message the settings layer prefixes with the setting's name and flag."""
    if not is_loopback(host) and token_file is None and not insecure:
        raise ValueError(
            f"{host} is beyond loopback: give metrics_token_file (--metrics-token-file) so "
            "scrapers must send a bearer token, or metrics_insecure = true "
            "(--metrics-insecure) to let anyone who can reach the port read the metrics"
        )


def metrics_warning(host: str, *, token_file: Path | None, insecure: bool) -> str | None:
    """What to log at every start while the opt-out is in effect, else None."""
    if is_loopback(host) or token_file is not None or not insecure:
        return None
    return (
        f"serving /metrics on {host} without authentication (metrics_insecure = true): anyone "
        "who can reach the port can read the traffic, queue depth, link state and device ids "
        "it shows"
    )


def read_metrics_token(path: Path) -> tuple[str, str | None]:
    """The bearer token in `path` (the whole file, whitespace trimmed: what Prometheus sends
    from `authorization: {credentials_file: ...}`), and a warning if others may read the file.
    Raises SecretFileError (its message never holds the token)."""
    token, warning = read_secret_text(path, "metrics token file")
    if len(token) < _MIN_TOKEN_CHARS or not token.isprintable() or re.search(r"\s", token):
        raise SecretFileError(
            f"metrics token file {path}: it must hold one token of at least {_MIN_TOKEN_CHARS} "
            "printable characters without spaces (make one with `openssl rand -hex 32`)"
        )
    return token, warning


def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    namespace: str,
    token: str | None = None,
) -> WSGIServer:
    """Serve `registry` on http://host:port/ in a daemon thread (the bound port is
    `server_port`). With `token`, every request must carry `Authorization: Bearer <token>`;
    the others get 401 and are counted in `<namespace>_scrapes_refused_total{reason}`.
    Raises OSError when the address cannot be bound."""
    refused = Counter(
        f"{namespace}_scrapes_refused",
        "Requests to /metrics refused with 401, by reason: missing, malformed or wrong "
        "bearer token.",
        ["reason"],
        registry=registry,
    )
    for reason in REFUSAL_REASONS:
        refused.labels(reason)
    app: WsgiApp = make_wsgi_app(registry)
    if token is not None:
        app = _bearer_gate(app, token, refused)
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class _Server(ThreadingWSGIServer):
        address_family = family  # an IPv6 host needs an AF_INET6 socket

    # Built before its thread starts, so no request is ever served without the gate.
    server = make_server(str(address[0]), port, app, _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def _bearer_gate(app: WsgiApp, token: str, refused: Counter) -> WsgiApp:
    expected = hashlib.sha256(token.encode()).digest()

    def gate(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        header = environ.get("HTTP_AUTHORIZATION")
        match = _BEARER.fullmatch(header) if header is not None else None
        # Digests of equal length: the comparison takes the same time whatever was sent.
        given = hashlib.sha256(match[1].encode()).digest() if match else b""
        if match is not None and hmac.compare_digest(given, expected):
            return app(environ, start_response)
        reason = "missing" if header is None else "malformed" if match is None else "wrong"
        refused.labels(reason).inc()
        start_response(
            "401 Unauthorized",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(_UNAUTHORIZED_BODY))),
                ("WWW-Authenticate", 'Bearer realm="metrics"'),
            ],
        )
        return [_UNAUTHORIZED_BODY]

    return gate


class _QuietHandler(WSGIRequestHandler):
    """No line per scrape on stderr (the daemons log in their own format)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
