"""The composition root: build the gateway's parts from GatewaySettings and wire them into an
ASGI app whose lifespan starts and stops what needs the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from uvicorn.config import STARTUP_FAILURE

from cloud_gateway.auth import Authenticator
from cloud_gateway.backends.base import Backend
from cloud_gateway.backends.embedded import EmbeddedBackend
from cloud_gateway.backends.upstream import UpstreamBackend
from cloud_gateway.compression import GzipWhenAsked
from cloud_gateway.idempotency import (
    IdempotencyGuard,
    IdempotencyPolicy,
    IdempotencyStore,
    RedisIdempotencyStore,
    SqliteIdempotencyStore,
    StoreBounds,
)
from cloud_gateway.keys import KeyStore
from cloud_gateway.limits import BodyLimits, InFlight, RateLimiter
from cloud_gateway.metrics import GatewayMetrics, RequestMetricsMiddleware
from cloud_gateway.offload import Offloader
from cloud_gateway.openapi import DocumentLimits, openapi_document
from cloud_gateway.rate_limit import DeviceRateLimiter, RedisRateLimiter
from cloud_gateway.routes import V2Routes, exception_handlers
from cloud_gateway.service import GatewayService
from cloud_gateway.settings import GatewaySettings
from cloud_gateway.worker_threads import ThreadMetrics, start_worker_threads
from model_runtime import ModelRepository
from model_runtime.connection_guard import STATE_KEY, ConnectionGuard
from model_runtime.fault_points import FaultPlan
from model_runtime.v2_json import TensorLimits

__all__ = ["WorkerAppFactory", "create_app", "make_backend", "make_store_and_limiter"]

log = logging.getLogger("cloud_gateway")

WORKER_START = "gateway.worker_start"
"""Fault point: a worker process rebuilding its app factory, as it starts (WorkerAppFactory)."""


def make_backend(settings: GatewaySettings, offloader: Offloader | None = None) -> Backend:
    if settings.upstream is not None:
        return UpstreamBackend(
            settings.upstream,
            timeout_s=settings.upstream_timeout_s,
            retry_after_s=settings.retry_after_s,
            offloader=offloader,
        )
    # Loaded and warmed here, before the server accepts a connection.
    repository = ModelRepository.load(settings.model_repository, threads=settings.onnx_threads)
    return EmbeddedBackend(
        repository,
        inline_budget_s=settings.inline_run_budget_us / 1e6,
        single_threaded=settings.onnx_threads == 1,
    )


def make_store_and_limiter(
    settings: GatewaySettings, metrics: GatewayMetrics, faults: FaultPlan | None = None
) -> tuple[IdempotencyStore, DeviceRateLimiter]:
    """SQLite: the host's store, and a rate limit per worker. Redis: one client for the store and
    a rate limit shared by every worker and replica; the store closes the client."""
    rate, burst = settings.rate_limit_per_s, settings.rate_limit_burst
    bounds = StoreBounds(settings.idempotency_max_bytes, settings.max_answer_bytes)

    def evicted(reason: str, records: int) -> None:
        metrics.child(metrics.idempotency_evictions, reason).inc(records)

    if settings.idempotency_store == "sqlite":
        store = SqliteIdempotencyStore(
            settings.idempotency_db_path,
            bounds=bounds,
            on_evicted=evicted,
            retry_after_s=settings.retry_after_s,
            faults=faults,
            connections=settings.blocking_threads,
        )
        return store, RateLimiter(rate, burst)
    url = settings.idempotency_store
    client = aioredis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
    return (
        RedisIdempotencyStore(
            url,
            bounds=bounds,
            on_evicted=evicted,
            retry_after_s=settings.retry_after_s,
            client=client,
        ),
        RedisRateLimiter(client, rate, burst, errors=metrics.rate_limit_errors),
    )


def create_app(
    settings: GatewaySettings, *, registry: CollectorRegistry, faults: FaultPlan | None = None
) -> Starlette:
    """The gateway as an ASGI app; metrics go to `registry`. `faults`: tests only."""
    metrics = GatewayMetrics(registry)
    offloader = Offloader()  # one heavy parse or encoding at a time, on the worker's threads
    backend = make_backend(settings, offloader)
    store, limiter = make_store_and_limiter(settings, metrics, faults)
    keys = KeyStore(settings.key_db_path, connections=settings.blocking_threads)
    guard = IdempotencyGuard(
        store,
        IdempotencyPolicy(
            retention_s=settings.idempotency_retention_s,
            pending_ttl_s=settings.idempotency_pending_ttl_s,
            wait_s=settings.idempotency_wait_s,
        ),
        faults=faults,
    )
    service = GatewayService(
        backend, guard, metrics, max_answer_bytes=settings.max_answer_bytes, offloader=offloader
    )
    document = openapi_document(
        backend.served_models(),
        DocumentLimits(
            min(settings.max_body_bytes, settings.max_decompressed_bytes),
            settings.max_items_per_request,
            settings.max_tensor_elements,
            settings.max_answer_bytes,
        ),
    )
    routes = V2Routes(
        service,
        Authenticator(keys, cache_s=settings.key_cache_s),
        limiter,
        BodyLimits(settings.max_body_bytes, settings.max_decompressed_bytes),
        metrics,
        tensor_limits=TensorLimits(settings.max_items_per_request, settings.max_tensor_elements),
        in_flight=InFlight(settings.max_in_flight_per_device, settings.max_in_flight),
        offloader=offloader,
        openapi=document,
    )

    connections = ConnectionGuard.under_open_files_limit(
        settings.header_timeout_s,
        settings.max_connections,
        metrics.connections_closed,
        metrics.accept_errors,
        metrics.malformed_requests,
        log,
        server="the gateway",
        cap_setting="max_connections",
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(connections.handle_loop_exception)
        threads = start_worker_threads(
            loop,
            settings.blocking_threads,
            ThreadMetrics(
                metrics.blocking_threads,
                metrics.blocking_busy_seconds,
                metrics.blocking_wait_seconds,
            ),
        )
        await backend.start()
        cleaner = asyncio.create_task(
            _purge_periodically(store, settings.idempotency_cleanup_interval_s)
        )
        log.info(
            "serving %s models (%s idempotency store%s)",
            backend.name,
            store.name,
            "" if settings.idempotency_store == "sqlite" else f" at {settings.idempotency_store}",
        )  # a password in the store's URL is masked by the log handlers (RedactSecrets)
        # What start-up made (models, libraries, the app) lives as long as the worker: out of
        # the cyclic collector's reach, collections under load walk only what requests made
        # (at c16 they took ~22 µs of CPU per request, now ~10: BENCHMARKS.md).
        gc.collect()
        gc.freeze()
        try:
            yield {STATE_KEY: connections}  # read by every connection (connection_guard)
        finally:
            cleaner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cleaner
            await guard.aclose()
            await backend.aclose()
            await store.aclose()
            keys.close()
            threads.shutdown(wait=True)

    return Starlette(
        routes=routes.routes(),
        middleware=[
            Middleware(RequestMetricsMiddleware, metrics=metrics, model_label=backend.model_label),
            Middleware(GzipWhenAsked, minimum_size=settings.gzip_min_bytes, compresslevel=6),
        ],
        exception_handlers=exception_handlers(),
        lifespan=lifespan,
    )


async def _purge_periodically(store: IdempotencyStore, interval_s: float) -> None:
    """Delete expired idempotency records now and every `interval_s` after."""
    while True:
        try:
            purged = await store.purge_expired()
            if purged:
                log.info("purged %d expired idempotency records", purged)
        except Exception as exc:
            log.warning("could not purge expired idempotency records: %s", exc)
        await asyncio.sleep(interval_s)


@dataclass(frozen=True)
class WorkerAppFactory:
    """Builds the app inside each worker process; picklable, so uvicorn can hand it to them.

    In a worker the metrics registry is only a holder: multiprocess mode writes the values to
    the files the supervisor's `/metrics` reads.
    """

    settings: GatewaySettings
    faults: FaultPlan | None = None

    def __call__(self) -> Starlette:
        try:
            return create_app(self.settings, registry=CollectorRegistry(), faults=self.faults)
        except Exception as exc:
            # uvicorn's supervisor stops, rather than restarting a worker that can never start.
            log.error("worker cannot start: %s", exc)
            sys.exit(STARTUP_FAILURE)

    def __reduce__(
        self,
    ) -> tuple[
        Callable[[GatewaySettings, FaultPlan | None], WorkerAppFactory],
        tuple[GatewaySettings, FaultPlan | None],
    ]:
        # Rebuilt in each worker as it starts, before it can answer the supervisor's health
        # check: where a test holds a worker's start-up (WORKER_START), as slow imports would.
        return (_rebuilt_in_worker, (self.settings, self.faults))


def _rebuilt_in_worker(settings: GatewaySettings, faults: FaultPlan | None) -> WorkerAppFactory:
    if faults is not None:
        faults.hit(WORKER_START)
    return WorkerAppFactory(settings, faults)
