"""The composition root: load the models, wire the service, serve until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry, disable_created_metrics

from edge_agent import __version__
from edge_agent.grpc.server import GrpcServer, ListenError
from edge_agent.grpc.v2_servicer import V2Servicer
from edge_agent.inference import InferenceService, ServerInfo
from edge_agent.logs import configure_logging
from edge_agent.metrics import AgentMetrics, serve_metrics
from edge_agent.settings import AgentSettings
from model_runtime import ModelLoadError, ModelRepository

__all__ = ["run"]

log = logging.getLogger("edge_agent")


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line the operator sees."""


def run(settings: AgentSettings) -> int:
    """Serve until SIGTERM or SIGINT; the process exit code."""
    configure_logging(settings.log_level)
    try:
        return asyncio.run(_serve(settings))
    except StartupError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2


async def _serve(settings: AgentSettings) -> int:
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
    metrics = AgentMetrics(registry, repository)
    service = InferenceService(repository, metrics, ServerInfo("edge-cloud-router", __version__))
    v2 = V2Servicer(service, metrics, settings.max_message_bytes)
    address = f"{settings.host}:{settings.port}"
    try:
        server = GrpcServer(v2, address, settings.max_message_bytes)
        metrics_server = serve_metrics(registry, settings.metrics_host, settings.metrics_port)
    except ListenError as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc.strerror}"
        ) from None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_configs, repository, metrics)

    await server.start()
    if settings.port_file is not None:
        _write_port_file(settings.port_file, grpc=server.port, metrics=metrics_server.server_port)
    log.info(
        "serving",
        extra={
            "fields": {
                "grpc": f"{settings.host}:{server.port}",
                "metrics": f"{settings.metrics_host}:{metrics_server.server_port}",
                "models": [m.describe() for m in repository],
            }
        },
    )
    await stop.wait()
    log.info("stopping", extra={"fields": {"grace_seconds": settings.grace_seconds}})
    await server.stop(settings.grace_seconds)
    metrics_server.shutdown()
    log.info("stopped")
    return 0


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
