"""The gateway's Prometheus metrics, on an injected registry, and the ASGI middleware that counts
every request: endpoint, model, status code, latency, and bytes on the wire in both directions.

With several workers the CLI turns on prometheus-client's multiprocess mode before any worker
starts; these metrics then write to per-process files that `/metrics` adds up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_runtime.connection_guard import MALFORMED_REASONS

__all__ = ["GatewayMetrics", "RequestMetricsMiddleware"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


M = TypeVar("M", bound=MetricWrapperBase)
# requests, request_duration, request_bytes, response_bytes of one endpoint, model and code
_RequestChildren = tuple[Counter, Histogram, Counter, Counter]


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # Labelled children by (metric, label values): `labels()` validates and locks on every
        # call, a cost worth saving on the per-request path. Label values are bounded.
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
        self._request_children: dict[tuple[str, str, str], _RequestChildren] = {}
        ns = "cloud_gateway"
        self.requests = Counter(
            "requests",
            "HTTP requests answered, by endpoint, model and status code.",
            ["endpoint", "model", "code"],
            namespace=ns,
            registry=registry,
        )
        self.request_duration = Histogram(
            "request_duration_seconds",
            "Time from the request's arrival to the end of the response.",
            ["endpoint"],
            namespace=ns,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_bytes = Counter(
            "request_bytes",
            "Request body bytes received, as sent (compressed or not).",
            ["endpoint"],
            namespace=ns,
            registry=registry,
        )
        self.response_bytes = Counter(
            "response_bytes",
            "Response body bytes sent, after compression.",
            ["endpoint"],
            namespace=ns,
            registry=registry,
        )
        self.model_runs = Counter(
            "model_runs",
            "Inference runs of a model (embedded or upstream), by outcome.",
            ["model", "outcome"],
            namespace=ns,
            registry=registry,
        )
        self.model_run_duration = Histogram(
            "model_run_duration_seconds",
            "Time a model run took, including the upstream round trip in upstream mode.",
            ["model"],
            namespace=ns,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.replays = Counter(
            "idempotent_replays",
            "Requests answered with a stored answer instead of a model run.",
            ["model"],
            namespace=ns,
            registry=registry,
        )
        self.idempotency_refusals = Counter(
            "idempotency_refusals",
            "Requests refused by the idempotency rules: key_reused with another body (422), "
            "in_progress, its first request still running (409), store_full (503), or "
            "client_gone, a duplicate whose client left while it waited (499, not run).",
            ["reason"],
            namespace=ns,
            registry=registry,
        )
        self.unstored_answers = Counter(
            "idempotency_unstored_answers",
            "Answers sent without being stored for replay, because the idempotency store "
            "failed: a repeat of their key would run the model again.",
            ["model"],
            namespace=ns,
            registry=registry,
        )
        self.idempotency_evictions = Counter(
            "idempotency_evictions",
            "Stored answers and lapsed marks deleted: reason expired (the periodic purge; Redis "
            "expires its own) or full (deleted early, oldest first, to make room for a request).",
            ["reason"],
            namespace=ns,
            registry=registry,
        )
        self.auth_failures = Counter(
            "auth_failures",
            "Requests refused for a missing, malformed, unknown or revoked device key.",
            ["reason"],
            namespace=ns,
            registry=registry,
        )
        self.rate_limited = Counter(
            "rate_limited",
            "Requests refused with 429 because their device was over its rate.",
            namespace=ns,
            registry=registry,
        )
        self.rate_limit_errors = Counter(
            "rate_limit_errors",
            "Rate-limit checks that could not reach Redis; the worker's own bucket decided.",
            namespace=ns,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "upstream_errors",
            "Upstream calls that gave no answer: unavailable, timeout, bad_response.",
            ["kind"],
            namespace=ns,
            registry=registry,
        )
        self.bodies_too_large = Counter(
            "bodies_too_large",
            "Requests refused with 413, on the wire or once decompressed.",
            namespace=ns,
            registry=registry,
        )

        self.group_items = Counter(
            "group_items",
            "Items of infer_group requests answered, by the status each item got "
            "(200 for an answer run or replayed).",
            ["code"],
            namespace=ns,
            registry=registry,
        )
        self.limit_refusals = Counter(
            "limit_refusals",
            "Requests refused before the work they asked for: limit is items_per_request, "
            "elements_per_tensor, answer_bytes (413), device_in_flight (429) or in_flight (503).",
            ["limit"],
            namespace=ns,
            registry=registry,
        )

        self.connections_closed = Counter(
            "connections_closed",
            "Connections the gateway closed itself: reason header_timeout (no complete request "
            "headers within header_timeout_s), over_capacity (503 past max_connections) or "
            "head_too_large (431: a request line and headers over 16 KiB).",
            ["reason"],
            namespace=ns,
            registry=registry,
        )
        self.accept_errors = Counter(
            "accept_errors",
            "Connections the worker could not accept (out of file descriptors or memory).",
            namespace=ns,
            registry=registry,
        )
        self.malformed_requests = Counter(
            "malformed_requests",
            "Requests that were not HTTP/1.1, by reason: invalid_http (400, the connection "
            "closed) or unsupported_upgrade (an Upgrade header, ignored: served as plain HTTP).",
            ["reason"],
            namespace=ns,
            registry=registry,
        )
        for reason in MALFORMED_REASONS:
            self.malformed_requests.labels(reason)

        self.blocking_threads = Gauge(
            "blocking_threads",
            "Threads the workers run blocking work on (model runs, key lookups, SQLite waits): "
            "blocking_threads per live worker.",
            namespace=ns,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.blocking_busy_seconds = Counter(
            "blocking_busy_seconds",
            "Seconds those threads spent running jobs; its rate over cloud_gateway_blocking_threads "
            "is the share of them in use.",
            namespace=ns,
            registry=registry,
        )
        self.blocking_wait_seconds = Counter(
            "blocking_wait_seconds",
            "Seconds jobs waited for a free thread, summed over jobs; a steady rate means "
            "blocking_threads is too few for the load.",
            namespace=ns,
            registry=registry,
        )

    def child(self, metric: M, *labels: str) -> M:
        """`metric.labels(*labels)`, cached."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found  # type: ignore[return-value]

    def request_children(self, endpoint: str, model: str, code: str) -> _RequestChildren:
        """The children every answered request updates, found with one lookup."""
        key = (endpoint, model, code)
        found = self._request_children.get(key)
        if found is None:
            found = self._request_children[key] = (
                self.child(self.requests, endpoint, model, code),
                self.child(self.request_duration, endpoint),
                self.child(self.request_bytes, endpoint),
                self.child(self.response_bytes, endpoint),
            )
        return found


class RequestMetricsMiddleware:
    """Outermost ASGI middleware: sees the compressed bytes and the final status code."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: GatewayMetrics,
        model_label: Callable[[str], str],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self._metrics = metrics
        self._model_label = model_label
        self._monotonic = monotonic

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = self._monotonic()
        received = 0
        sent = 0
        status = 500

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal sent, status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            route = scope.get("route")
            endpoint = route.name if isinstance(route, Route) else "unmatched"
            name = scope.get("path_params", {}).get("name")
            model = self._model_label(name) if isinstance(name, str) else ""
            requests, duration, request_bytes, response_bytes = self._metrics.request_children(
                endpoint, model, str(status)
            )
            requests.inc()
            duration.observe(self._monotonic() - start)
            request_bytes.inc(received)
            response_bytes.inc(sent)
