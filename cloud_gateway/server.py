"""The processes of `cloud-gateway serve`: bind the sockets, start uvicorn with one or several
workers sharing the API socket, serve `/metrics` on its own port, report the ports.

With several workers this supervisor process turns on prometheus-client's multiprocess mode in a
temporary directory it owns, before any worker starts, and serves the sum of their metrics.
"""

from __future__ import annotations

import copy
import json
import logging
import logging.config
import os
import shutil
import signal
import sqlite3
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from uvicorn.config import LOGGING_CONFIG, STARTUP_FAILURE

from cloud_gateway.app import WorkerAppFactory, create_app
from cloud_gateway.settings import GatewaySettings
from cloud_gateway.supervisor import GatewaySupervisor
from model_runtime import ModelLoadError
from model_runtime.command_line import EXIT_USAGE, StartupError
from model_runtime.connection_guard import (
    ACCEPT_BATCH,
    MAX_HEAD_BYTES,
    GuardedH11Protocol,
    GuardedHttpToolsProtocol,
    raise_open_files_limit,
)
from model_runtime.fault_points import FaultPlan
from model_runtime.metrics_endpoint import metrics_secrets, metrics_warning, serve_metrics
from model_runtime.private_files import SecretFileError, private_dir
from model_runtime.sockets import bind_socket

__all__ = ["bind_socket", "run", "write_port_file"]

log = logging.getLogger("cloud_gateway")

# The HTTP stack, chosen by measurement (BENCHMARKS.md, benchmarks/gateway.py): the parser of
# requests, each with the connection guard (model_runtime.connection_guard), and the event loop.
HTTP_PARSER = "httptools"
EVENT_LOOP = "asyncio"
_PROTOCOLS: dict[str, type[Any]] = {
    "h11": GuardedH11Protocol,
    "httptools": GuardedHttpToolsProtocol,
}
# Read by prometheus-client when it is first imported in a worker: set before workers spawn.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_HEALTHCHECK_S = 60


def write_port_file(path: Path, ports: dict[str, int]) -> None:
    """Write the bound ports as JSON atomically: a reader sees all of them or no file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(ports, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _log_config(level: str) -> dict[str, Any]:
    config = copy.deepcopy(LOGGING_CONFIG)
    if not sys.stderr.isatty():
        # JSON lines for the journal and log shippers, as the edge agent writes them;
        # uvicorn's own colourful lines stay for a terminal.
        for name in ("default", "access"):
            config["formatters"][name] = {"()": "model_runtime.logs.JsonFormatter"}
    config["loggers"]["cloud_gateway"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    # Credentials in URLs (a Redis password, an upstream's user) are masked on every handler,
    # and the libraries' loggers (redis, httpx, httpcore) reach a handler through the root
    # logger rather than Python's last-resort one, which no filter would see.
    config["filters"] = {"redact_secrets": {"()": "model_runtime.logs.RedactSecrets"}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact_secrets"]
    config["root"] = {"handlers": ["default"], "level": level.upper()}
    # httpx logs every upstream call at INFO; per-call lines belong to DEBUG, as on the agent.
    per_call = "DEBUG" if level.upper() == "DEBUG" else "WARNING"
    for name in ("httpx", "httpcore"):
        config["loggers"][name] = {"level": per_call}
    return config


def _uvicorn_config(settings: GatewaySettings, app: Any, *, factory: bool) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        factory=factory,
        http=_PROTOCOLS[HTTP_PARSER],
        loop=EVENT_LOOP,
        # No WebSocket route: an Upgrade is ignored and counted (connection_guard), whatever
        # WebSocket library happens to be installed beside uvicorn.
        ws="none",
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        backlog=ACCEPT_BATCH,
        workers=settings.workers,
        lifespan="on",
        log_config=_log_config(settings.log_level),
        log_level=settings.log_level,
        access_log=settings.access_log,
        server_header=False,
        timeout_graceful_shutdown=10,
        # The supervisor pings each worker and replaces one that does not answer in time. A
        # worker answers only once its imports are done (onnxruntime, numpy...), which on a
        # loaded machine can take longer than uvicorn's default 5 s: it would then be killed
        # and restarted over and over. One that dies meanwhile is replaced at once
        # (cloud_gateway.supervisor).
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
    )


def _single_app(
    settings: GatewaySettings, registry: CollectorRegistry, faults: FaultPlan | None
) -> Any:
    try:
        return create_app(settings, registry=registry, faults=faults)
    except ModelLoadError as exc:
        raise StartupError(str(exc)) from None
    except (OSError, sqlite3.Error) as exc:  # the key or idempotency database
        raise StartupError(
            f"cannot open the gateway's databases in {settings.state_dir}: {exc}"
        ) from None


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _metrics_access(settings: GatewaySettings) -> tuple[str | None, ssl.SSLContext | None]:
    """The token /metrics asks for and its TLS server side (None: none), read once; warnings
    logged at every start."""
    try:
        token, tls, warnings = metrics_secrets(
            settings.metrics_token_file,
            settings.metrics_tls_cert_file,
            settings.metrics_tls_key_file,
        )
    except SecretFileError as exc:
        raise StartupError(str(exc)) from None
    bind = metrics_warning(
        settings.metrics_host,
        token_file=settings.metrics_token_file,
        insecure=settings.metrics_insecure,
        tls=tls is not None,
    )
    for warning in [bind, *warnings]:
        if warning is not None:
            log.warning(warning)
    return token, tls


def run(
    settings: GatewaySettings, *, port_file: Path | None = None, faults: FaultPlan | None = None
) -> int:
    """Serve until SIGTERM or SIGINT; returns the process exit code. Raises StartupError, with
    the one line the operator sees, when start-up cannot go on. `faults`: tests only, counted
    in each worker on its own."""
    logging.config.dictConfig(_log_config(settings.log_level))
    raise_open_files_limit()
    metrics_token, metrics_tls = _metrics_access(settings)
    try:
        private_dir(settings.state_dir)
    except OSError as exc:
        raise StartupError(f"cannot use state dir {settings.state_dir}: {exc.strerror}") from None
    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError:
        raise StartupError(
            f"cannot listen on {settings.host}:{settings.port}: address in use or not available"
        ) from None
    multiproc_dir: Path | None = None
    registry = CollectorRegistry()
    try:
        if settings.workers > 1:
            multiproc_dir = Path(tempfile.mkdtemp(prefix="cloud-gateway-metrics-"))
            os.environ[MULTIPROC_ENV] = str(multiproc_dir)
            MultiProcessCollector(registry, path=str(multiproc_dir))  # type: ignore[no-untyped-call]
            config = _uvicorn_config(settings, WorkerAppFactory(settings, faults), factory=True)
        else:
            config = _uvicorn_config(
                settings, _single_app(settings, registry, faults), factory=False
            )
        try:
            metrics_server = serve_metrics(
                registry,
                settings.metrics_host,
                settings.metrics_port,
                namespace="cloud_gateway",
                token=metrics_token,
                tls=metrics_tls,
            )
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: "
                f"{exc.strerror}"
            ) from None
        try:
            ports = {"http": sock.getsockname()[1], "metrics": metrics_server.server_port}
            if port_file is not None:
                try:
                    write_port_file(port_file, ports)
                except OSError as exc:
                    raise StartupError(
                        f"cannot write port file {port_file}: {exc.strerror}"
                    ) from None
            log.info(
                "v2 API on %s:%d, metrics on %s://%s:%d/metrics, %d worker(s)",
                settings.host,
                ports["http"],
                "https" if metrics_tls is not None else "http",
                settings.metrics_host,
                ports["metrics"],
                settings.workers,
            )
            if settings.workers > 1:
                supervisor = GatewaySupervisor(config, [sock], registry)
                supervisor.run()
                failed = any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
                return EXIT_USAGE if failed else 0  # a worker's own line says why
            # uvicorn re-raises SIGTERM after its graceful shutdown; exiting through SystemExit
            # (rather than the default handler's abrupt end) lets the cleanup below run.
            signal.signal(signal.SIGTERM, _exit_cleanly)
            uvicorn.Server(config).run(sockets=[sock])
            return 0
        finally:
            metrics_server.shutdown()
            metrics_server.server_close()
    finally:
        sock.close()
        if multiproc_dir is not None:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
        if port_file is not None:
            port_file.unlink(missing_ok=True)
