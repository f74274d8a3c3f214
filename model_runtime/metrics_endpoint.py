"""The /metrics endpoint of both daemons: prometheus-client's exposition behind an optional
bearer token and TLS, and the rule that keeps it on loopback unless scrapers must authenticate.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from model_runtime.private_files import SecretFileError, check_secret_file, read_secret_text
from model_runtime.sockets import is_loopback

__all__ = [
    "REFUSAL_REASONS",
    "check_metrics_bind",
    "check_metrics_tls",
    "metrics_secrets",
    "metrics_tls_context",
    "metrics_warning",
    "read_metrics_token",
    "scrape_refusals",
    "serve_metrics",
]

REFUSAL_REASONS = ("missing", "malformed", "wrong", "tls", "timeout")
"""Why a scrape was refused: no Authorization header, not `Bearer <token>`, another token (each
a 401), a connection to the TLS port whose handshake failed or timed out, or one that sent no
request (or read no answer) in time."""

CONNECTION_TIMEOUT_S = 10.0
"""How long a connection to /metrics has for its TLS handshake and then for each read and
write: one that sends nothing cannot hold its thread for ever."""

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


def check_metrics_tls(cert_file: Path | None, key_file: Path | None) -> None:
    """metrics_tls_cert_file and metrics_tls_key_file go together. Raises ValueError, which the
    settings layer prefixes with the name of metrics_tls_key_file."""
    if (cert_file is None) != (key_file is None):
        raise ValueError(
            "metrics_tls_cert_file and metrics_tls_key_file go together; give both or neither"
        )


def metrics_warning(
    host: str, *, token_file: Path | None, insecure: bool, tls: bool = False
) -> str | None:
    """What to log at every start while the opt-out is in effect, or while the token crosses
    the network in clear; else None."""
    if is_loopback(host):
        return None
    if token_file is not None and not tls:
        return (
            f"the /metrics token crosses the network to {host} in clear; set "
            "metrics_tls_cert_file and metrics_tls_key_file so /metrics speaks HTTPS"
        )
    if token_file is not None or not insecure:
        return None
    return (
        f"serving /metrics on {host} without authentication (metrics_insecure = true): anyone "
        "who can reach the port can read the traffic, queue depth, link state and device ids "
        "it shows"
    )


def metrics_secrets(
    token_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> tuple[str | None, ssl.SSLContext | None, list[str]]:
    """The bearer token /metrics asks for and its TLS server side (None: none asked for), read
    once at start, and a warning for each file others may read. Raises SecretFileError."""
    token = tls = None
    warnings: list[str] = []
    if token_file is not None:
        token, warning = read_metrics_token(token_file)
        warnings += [warning] if warning is not None else []
    if cert_file is not None and key_file is not None:
        tls, warning = metrics_tls_context(cert_file, key_file)
        warnings += [warning] if warning is not None else []
    return token, tls, warnings


def metrics_tls_context(cert_file: Path, key_file: Path) -> tuple[ssl.SSLContext, str | None]:
    """The server side of /metrics over TLS (TLS 1.2 at least), and a warning if others may
    read the key file. Raises SecretFileError naming the file: a key others may write, a file
    that cannot be read, or a certificate and key that do not load or do not match."""
    try:
        warning = check_secret_file(key_file, "metrics TLS key file")
    except OSError as exc:
        raise SecretFileError(
            f"cannot read metrics TLS key file {key_file}: {exc.strerror}"
        ) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    except OSError as exc:  # ssl.SSLError is one too: not PEM, or a key of another certificate
        why = exc.strerror or getattr(exc, "reason", None) or str(exc)
        raise SecretFileError(
            f"metrics_tls_cert_file {cert_file} with metrics_tls_key_file {key_file}: "
            f"cannot load them ({why})"
        ) from None
    return context, warning


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


def scrape_refusals(registry: CollectorRegistry, namespace: str) -> Counter:
    """`<namespace>_scrapes_refused_total{reason}` in `registry`, every reason at 0. Its own
    function so the alert rules' checks see the name the endpoint exports."""
    refused = Counter(
        f"{namespace}_scrapes_refused",
        "Requests to /metrics refused, by reason: missing, malformed or wrong bearer token "
        "(401), tls: a connection whose TLS handshake failed or timed out, or timeout: one that "
        "sent no request or read no answer in time.",
        ["reason"],
        registry=registry,
    )
    for reason in REFUSAL_REASONS:
        refused.labels(reason)
    return refused


def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    namespace: str,
    token: str | None = None,
    tls: ssl.SSLContext | None = None,
    timeout_s: float = CONNECTION_TIMEOUT_S,
) -> WSGIServer:
    """Serve `registry` on http://host:port/ (https:// with `tls`) in a daemon thread (the
    bound port is `server_port`). With `token`, every request must carry `Authorization:
    Bearer <token>`; the others get 401. Refusals, failed TLS handshakes and connections
    silent for `timeout_s` are counted in `<namespace>_scrapes_refused_total{reason}`. Raises
    OSError when the address cannot be bound."""
    refused = scrape_refusals(registry, namespace)
    app: WsgiApp = make_wsgi_app(registry)
    if token is not None:
        app = _bearer_gate(app, token, refused)
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class _Server(ThreadingWSGIServer):
        address_family = family  # an IPv6 host needs an AF_INET6 socket

        def finish_request(self, request: Any, client_address: Any) -> None:
            # In the connection's own thread: the handshake must not hold up accept().
            request.settimeout(timeout_s)  # kept for the request's reads and writes
            if tls is not None and not _handshake(request, refused):
                return
            try:
                super().finish_request(request, client_address)
            except TimeoutError:
                refused.labels("timeout").inc()
            except OSError:
                pass  # the scraper hung up: nothing to answer, and no traceback on stderr

    # Built before its thread starts, so no request is ever served without the gate.
    server = make_server(str(address[0]), port, app, _Server, handler_class=_QuietHandler)
    if tls is not None:
        # As prometheus-client's start_http_server wraps its socket, except that it shakes
        # hands in accept(), on the one thread that accepts: a client that connected and said
        # nothing would stop every scrape. Here each connection shakes hands in its own thread.
        server.socket = tls.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def _handshake(connection: ssl.SSLSocket, refused: Counter) -> bool:
    """Shake hands on an accepted TLS connection; False (counted) if it fails or times out:
    plain HTTP sent to the TLS port, a client that does not trust the certificate, silence."""
    try:
        connection.do_handshake()
    except OSError:  # ssl.SSLError and TimeoutError among them
        refused.labels("tls").inc()
        return False
    return True


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
