"""The edge agent's Prometheus metrics, on an injected registry (served by
model_runtime.metrics_endpoint).

Label values are bounded: model names come from the repository (an unknown name is counted
as "unknown"), codes from gRPC's and HTTP's fixed sets, REST endpoints from the route
names, reasons from InvalidInput's fixed kinds.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from edge_agent import __version__
from edge_agent.access import AccessDenied
from edge_agent.settings import DEFAULT_DEVICE
from model_runtime import ModelRepository
from model_runtime.connection_guard import CLOSE_REASONS, MALFORMED_REASONS
from model_runtime.loop_metrics import CounterChild, HistogramChild, LoopCounter, LoopHistogram
from router.decision import DEFAULT_TTL_SECONDS

__all__ = ["AgentMetrics", "ModelMetrics"]

UNKNOWN_MODEL = "unknown"

# Latency buckets from 100 µs (a local answer) to 10 s (a slow escalation).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
CONFIDENCE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """The per-model children, bound once so the request path does no label lookups."""

    inference_seconds: HistogramChild
    request_seconds: HistogramChild
    confidence: HistogramChild
    items: CounterChild
    batch_runs: CounterChild
    batch_requests: CounterChild

    def count_batch_run(self, requests: int, items: int) -> None:
        """A run of the model's dynamic batcher, for `requests` requests of `items` in all."""
        self.batch_runs.inc()
        self.batch_requests.inc(requests)


class AgentMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        repository: ModelRepository,
        *,
        site: str | None = None,
        device: str = DEFAULT_DEVICE,
        default_ttl_seconds: float = DEFAULT_TTL_SECONDS,
    ) -> None:
        """`site` (default: the host name) and `device` identify this agent in every query that
        joins on edge_agent_info; `default_ttl_seconds` is the queue's TTL, for the alert on
        items about to expire."""
        self.registry = registry
        # An info metric: dashboards and alerts join on it to name the site of any series.
        Gauge(
            "edge_agent_info",
            "Always 1; its labels name this agent's site, device and software version.",
            ["site", "device", "version"],
            registry=registry,
        ).labels(site or socket.gethostname(), device, __version__).set(1)
        Gauge(
            "edge_agent_queue_default_ttl_seconds",
            "How long a queued request waits for the cloud before it expires, unless its "
            "caller set another time-to-live.",
            registry=registry,
        ).set(default_ttl_seconds)
        # The metrics every answered call updates are loop metrics (model_runtime.loop_metrics):
        # they are only ever updated from the event loop's thread.
        self.requests = LoopCounter(
            "edge_agent_requests",
            "gRPC calls answered, by method, model and gRPC status code.",
            ["method", "model", "code"],
            registry=registry,
        )
        self.http_requests = LoopCounter(
            "edge_agent_http_requests",
            "REST calls answered, by endpoint, model and HTTP status code; a result stream "
            "counts when it ends.",
            ["endpoint", "model", "code"],
            registry=registry,
        )
        self.rest_connections_closed = Counter(
            "edge_agent_rest_connections_closed",
            "REST connections the agent closed itself, by reason: header_timeout (no complete "
            "request headers within rest_header_timeout_seconds), over_capacity (503 past "
            "rest_max_connections) or head_too_large (431: a request line and headers over "
            "16 KiB).",
            ["reason"],
            registry=registry,
        )
        for reason in CLOSE_REASONS:
            self.rest_connections_closed.labels(reason)
        self.rest_accept_errors = Counter(
            "edge_agent_rest_accept_errors",
            "REST connections the agent could not accept (out of file descriptors or memory).",
            registry=registry,
        )
        self.rest_malformed_requests = Counter(
            "edge_agent_rest_malformed_requests",
            "REST requests that were not HTTP/1.1, by reason: invalid_http (400, the connection "
            "closed) or unsupported_upgrade (an Upgrade header, ignored: served as plain HTTP).",
            ["reason"],
            registry=registry,
        )
        for reason in MALFORMED_REASONS:
            self.rest_malformed_requests.labels(reason)
        self.invalid_requests = Counter(
            "edge_agent_invalid_requests",
            "Inference requests refused as invalid, by model and what was wrong.",
            ["model", "reason"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "edge_agent_auth_failures",
            "Calls refused with UNAUTHENTICATED, by reason: missing, malformed or unknown "
            "credentials.",
            ["reason"],
            registry=registry,
        )
        for reason in AccessDenied.REASONS:
            self.auth_failures.labels(reason)
        self.items = LoopCounter(
            "edge_agent_items",
            "Items (rows of a batch) answered, by model.",
            ["model"],
            registry=registry,
        )
        self.in_flight = 0
        """Inference requests being answered now; read at scrape time, so no lock per call."""
        Gauge(
            "edge_agent_requests_in_flight",
            "Inference requests being answered now.",
            registry=registry,
        ).set_function(lambda: self.in_flight)
        self._request_children: dict[tuple[int, str, str, str], CounterChild] = {}
        inference = LoopHistogram(
            "edge_agent_inference_duration_seconds",
            "Time the local model took to run one request's batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        request = LoopHistogram(
            "edge_agent_request_duration_seconds",
            "Time from receiving an inference request to having its answer, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        confidence = LoopHistogram(
            "edge_agent_confidence",
            "Confidence of each answered item, after temperature scaling, by model.",
            ["model"],
            buckets=CONFIDENCE_BUCKETS,
            registry=registry,
        )
        batch_runs = LoopCounter(
            "edge_agent_batch_runs",
            "Model runs made by the dynamic batcher of a model with [batching] on, by model.",
            ["model"],
            registry=registry,
        )
        batch_requests = LoopCounter(
            "edge_agent_batch_requests",
            "Requests answered by those runs, by model: divided by edge_agent_batch_runs_total, "
            "the mean number of requests per run.",
            ["model"],
            registry=registry,
        )
        self.model_info = Gauge(
            "edge_agent_model_info",
            "Models loaded: 1 per model version, with its confidence method.",
            ["model", "version", "method"],
            registry=registry,
        )
        self.threshold = Gauge(
            "edge_agent_model_threshold",
            "Escalation threshold in force for each model.",
            ["model"],
            registry=registry,
        )
        self.temperature = Gauge(
            "edge_agent_model_temperature",
            "Temperature in force for each model's confidence.",
            ["model"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "edge_agent_config_reloads",
            "Model config reloads on SIGHUP, by result (applied or refused).",
            ["result"],
            registry=registry,
        )
        self.models: dict[str, ModelMetrics] = {}
        for model in repository:
            self.models[model.name] = ModelMetrics(
                inference.labels(model.name),
                request.labels(model.name),
                confidence.labels(model.name),
                self.items.labels(model.name),
                batch_runs.labels(model.name),
                batch_requests.labels(model.name),
            )
        self.show_configs(repository)

    def show_configs(self, repository: ModelRepository) -> None:
        """Publish each model's config in force: at start-up and after every reload."""
        self.model_info.clear()
        for model in repository:
            method = model.config.confidence_method
            self.model_info.labels(model.name, str(model.version), method).set(1)
            self.threshold.labels(model.name).set(model.config.threshold)
            self.temperature.labels(model.name).set(model.config.temperature)

    def model_label(self, name: str) -> str:
        """A served model's name; "" for calls about no model; "unknown" for any other name."""
        return name if not name or name in self.models else UNKNOWN_MODEL

    def count_auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def count_request(self, method: str, model: str, code: str) -> None:
        """A gRPC call answered, with its status code's name."""
        self._count(self.requests, method, model, code)

    def count_http_request(self, endpoint: str, model: str, code: int) -> None:
        """A REST call answered, with its HTTP status."""
        self._count(self.http_requests, endpoint, model, str(code))

    def _count(self, counter: LoopCounter, call: str, model: str, code: str) -> None:
        key = (id(counter), call, self.model_label(model), code)
        child = self._request_children.get(key)
        if child is None:  # label sets are bounded, so this cache is too
            child = self._request_children[key] = counter.labels(*key[1:])
        child.inc()
