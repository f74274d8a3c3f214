"""The composition root: load the models, wire the service, serve until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

import uvloop
from prometheus_client import CollectorRegistry, disable_created_metrics

from edge_agent import __version__
from edge_agent.access import AccessPolicy
from edge_agent.credentials import Credentials, CredentialsError, load_credentials
from edge_agent.grpc.auth import AuthInterceptor, server_credentials
from edge_agent.grpc.router_servicer import RouterServicer
from edge_agent.grpc.server import GrpcServer, ListenError
from edge_agent.grpc.v2_servicer import V2Servicer
from edge_agent.inference import InferenceService, ServerInfo
from edge_agent.metrics import AgentMetrics
from edge_agent.rest import RestServer, ServerTls, create_rest_app
from edge_agent.router_settings import router_config
from edge_agent.settings import AgentSettings, is_loopback, settings_warnings
from model_runtime import ModelLoadError, ModelRepository
from model_runtime.command_line import EXIT_FAILURE, EXIT_USAGE, StartupError
from model_runtime.connection_guard import ConnectionGuard, raise_open_files_limit
from model_runtime.encryption import DataKeyError
from model_runtime.fault_points import FaultPlan
from model_runtime.logs import configure_logging, redact
from model_runtime.metrics_endpoint import serve_metrics
from router import Router, RouterConfig
from router.errors import StorageError
from router.state_lock import StateDirInUse

__all__ = ["run"]

log = logging.getLogger("edge_agent")


class DiskTrouble(Exception):
    """The state dir's disk is full or failing at start-up: worth another try later."""


def run(settings: AgentSettings, faults: FaultPlan | None = None) -> int:
    """Serve until SIGTERM or SIGINT; the process exit code. `faults`: tests only."""
    configure_logging(settings.log_level.upper(), site=settings.site, device=settings.device)
    # Watchers, REST connections and gRPC callers each hold a descriptor; outside systemd's
    # LimitNOFILE the soft limit is often 1,024 and the REST cap is lowered to fit under it.
    raise_open_files_limit()
    for warning in settings_warnings(settings):
        log.warning(warning)
    try:
        # uvloop: grpc.aio hands every call between its poller thread and the loop, and on
        # libuv's loop that costs a fraction of what asyncio's own does (BENCHMARKS.md).
        return uvloop.run(_serve(settings, faults))
    except StartupError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StorageError, DiskTrouble) as exc:
        # Not EXIT_USAGE: a full or failing disk may recover, and systemd should try again.
        print(f"edge-agent: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE


async def _serve(settings: AgentSettings, faults: FaultPlan | None) -> int:
    try:
        credentials = load_credentials(settings)
    except CredentialsError as exc:
        raise StartupError(str(exc)) from None
    for warning in credentials.warnings:  # at every start, so it is never forgotten
        log.warning(warning)
    try:
        repository = ModelRepository.load(
            settings.model_repository,
            threads=settings.onnx_threads,
            inline_budget_s=settings.inline_run_budget_us / 1e6,
        )
    except ModelLoadError as exc:
        raise StartupError(str(exc)) from None

    # The _created series double the scrape and answer no operator's question.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    metrics = AgentMetrics(
        registry,
        repository,
        site=settings.site,
        device=settings.device,
        default_ttl_seconds=settings.default_ttl_seconds,
    )
    try:
        router = await Router.open(_router_config(settings, credentials), registry, faults=faults)
    except StateDirInUse as exc:
        raise StartupError(_in_use(exc)) from None
    except DataKeyError as exc:  # data sealed with a key that is not configured
        raise StartupError(str(exc)) from None
    except OSError as exc:  # a state dir that cannot be made or written
        if exc.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT):  # may pass: not exit code 2
            raise DiskTrouble(f"state dir {settings.state_dir}: {exc.strerror}") from None
        raise StartupError(f"cannot use state dir {settings.state_dir}: {exc.strerror}") from None
    try:
        code = await _serve_with(settings, credentials, repository, router, registry, metrics)
    finally:
        await router.close()
    log.info("stopped")
    return code


async def _serve_with(
    settings: AgentSettings,
    credentials: Credentials,
    repository: ModelRepository,
    router: Router,
    registry: CollectorRegistry,
    metrics: AgentMetrics,
) -> int:
    service = InferenceService(
        repository,
        router,
        metrics,
        ServerInfo("edge-cloud-router", __version__),
        default_ttl_seconds=settings.default_ttl_seconds,
    )
    v2 = V2Servicer(service, metrics, settings.max_message_bytes)
    address = f"{settings.host}:{settings.port}" if settings.tcp_enabled else None
    access = credentials.access
    tls = None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        try:
            tls = server_credentials(
                settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
            )
        except OSError as exc:
            raise StartupError(f"cannot read {exc.filename}: {exc.strerror}") from None
    try:
        server = GrpcServer(
            v2,
            RouterServicer(router, metrics),
            address,
            settings.max_message_bytes,
            uds=settings.uds,
            credentials=tls,
            # Without credentials to ask for, no interceptor: every caller is anonymous.
            interceptors=[AuthInterceptor(access, metrics.count_auth_failure)]
            if access.required
            else [],
        )
        metrics_server = serve_metrics(
            registry,
            settings.metrics_host,
            settings.metrics_port,
            namespace="edge_agent",
            token=credentials.metrics_token,
            tls=credentials.metrics_tls,
        )
    except ListenError as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc.strerror}"
        ) from None
    try:
        rest = _rest_server(settings, service, router, metrics, access)
    except OSError as exc:
        metrics_server.shutdown()
        raise StartupError(
            f"cannot serve REST on {settings.rest_host}:{settings.rest_port}: {exc.strerror or exc}"
        ) from None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_configs, repository, metrics)

    await server.start()
    ports = {"metrics": metrics_server.server_port}
    if address is not None:
        ports["grpc"] = server.port
    if rest is not None:
        await rest.start()
        ports["rest"] = rest.port
    if settings.port_file is not None:
        _write_port_file(settings.port_file, **ports)
    log.info(
        "serving",
        extra={
            "fields": {
                "grpc": f"{settings.host}:{server.port}" if address is not None else "off",
                "uds": str(settings.uds) if settings.uds is not None else "off",
                "rest": f"{settings.rest_host}:{rest.port}" if rest is not None else "off",
                "metrics": f"{settings.metrics_host}:{metrics_server.server_port}",
                "metrics_auth": "token" if credentials.metrics_token is not None else "none",
                "metrics_tls": credentials.metrics_tls is not None,
                "models": [m.describe() for m in repository],
                "cloud": redact(settings.cloud_url) if settings.cloud_url else "none",
                "tls": settings.tls_cert_file is not None,
                "auth": _auth_mode(settings),
                "encryption": credentials.keyring.encrypting,
            }
        },
    )
    if sys.stderr.isatty():
        rest_port = rest.port if rest is not None else None
        line = _human_line(settings, server.port, rest_port, metrics_server.server_port)
        print(line, file=sys.stderr)
    await stop.wait()
    service.stop_accepting()  # before the log line: from then on, every new call is refused
    log.info("stopping", extra={"fields": {"grace_seconds": settings.grace_seconds}})
    deadline = loop.time() + settings.grace_seconds
    await server.not_serving()
    await service.wait_idle(settings.grace_seconds)
    left = max(0.0, deadline - loop.time())
    # Then the streams: gRPC's WatchResults within the grace left, REST's result streams at
    # once (a browser's EventSource reconnects and resumes by itself).
    await asyncio.gather(server.stop(left), *([rest.stop(left)] if rest is not None else []))
    metrics_server.shutdown()
    metrics_server.server_close()
    return 0


def _auth_mode(settings: AgentSettings) -> str:
    modes = [
        name
        for name, on in (("mtls", settings.tls_client_ca_file), ("token", settings.token_file))
        if on is not None
    ]
    return "+".join(modes) or ("insecure" if settings.insecure else "none (loopback)")


def _rest_server(
    settings: AgentSettings,
    service: InferenceService,
    router: Router,
    metrics: AgentMetrics,
    access: AccessPolicy,
) -> RestServer | None:
    """The REST API, under the gRPC API's rules: its tokens, its TLS certificate and client CA."""
    if not settings.rest_enabled:
        return None
    app, streams = create_rest_app(
        service,
        router,
        metrics,
        max_body_bytes=settings.max_message_bytes,
        cors_origins=settings.rest_cors_origins,
        loopback_only=is_loopback(settings.rest_host),
        access=access,
    )
    tls = None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        tls = ServerTls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    connections = ConnectionGuard.under_open_files_limit(
        settings.rest_header_timeout_seconds,
        settings.rest_max_connections,
        metrics.rest_connections_closed,
        metrics.rest_accept_errors,
        metrics.rest_malformed_requests,
        log,
        server="the agent",
        cap_setting="rest_max_connections",
    )
    return RestServer(
        app, streams, settings.rest_host, settings.rest_port, connections=connections, tls=tls
    )


def _human_line(
    settings: AgentSettings, grpc_port: int, rest_port: int | None, metrics_port: int
) -> str:
    """What a person at a terminal wants to know once the agent serves: where to call it (every
    listener), where its metrics are, where its state is, and which cloud it escalates to."""
    grpc_at = [f"{settings.host}:{grpc_port}"] if grpc_port else []
    if settings.uds is not None:
        grpc_at.append(f"unix:{settings.uds}")
    scheme = "https" if settings.tls_cert_file is not None else "http"
    rest = f"{scheme}://{settings.rest_host}:{rest_port}" if rest_port is not None else "none"
    metrics_scheme = "https" if settings.metrics_tls_cert_file is not None else "http"
    cloud = redact(settings.cloud_url) if settings.cloud_url else "none, all answered here"
    return (
        f"edge-agent {__version__} serving gRPC on {' and '.join(grpc_at)}, "
        f"REST on {rest}, metrics on "
        f"{metrics_scheme}://{settings.metrics_host}:{metrics_port}/metrics, state in "
        f"{settings.state_dir.resolve()}, cloud: {cloud} (Ctrl-C stops)"
    )


def _router_config(settings: AgentSettings, credentials: Credentials) -> RouterConfig:
    try:
        return router_config(
            settings,
            device_key=credentials.device_key,
            cloud_tls=credentials.cloud_tls,
            keyring=credentials.keyring,
        )
    except ValueError as exc:
        raise StartupError(f"invalid router settings: {redact(str(exc))}") from None


def _in_use(exc: StateDirInUse) -> str:
    """Another agent (a systemd restart racing the old one, a second start by mistake) has it."""
    who = "another edge-agent" + ("" if exc.holder is None else f" (pid {exc.holder})")
    return f"state dir {exc.path} is in use by {who}; stop it or give --state-dir another directory"


def _reload_configs(repository: ModelRepository, metrics: AgentMetrics) -> None:
    """SIGHUP: put edited model configs (a new calibration) in force without a restart."""
    try:
        changed = repository.reload_configs()
    except ModelLoadError as exc:
        log.error("config reload refused; the previous configs stay in force: %s", exc)
        metrics.config_reloads.labels("refused").inc()
        return
    metrics.show_configs(repository)
    metrics.config_reloads.labels("applied").inc()
    log.info("configs reloaded", extra={"fields": {"changed": changed}})


def _write_port_file(path: Path, **ports: int) -> None:
    """Atomically, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(ports, f)
    os.replace(tmp, path)
