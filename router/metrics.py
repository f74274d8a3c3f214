"""The router's Prometheus metrics, on the injected registry the edge agent serves at /metrics.

Counters are bumped where things happen; gauges that mirror state (link, queue, budget) are read
at scrape time from a snapshot the router refreshes on its event loop, so a scrape (on the
exporter's thread) never touches the router's objects. Every label has a fixed, small set of values.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from model_runtime.loop_metrics import CounterChild, LoopCounter
from router.breaker import BreakerState
from router.budget import PeriodUsage, ProbeBudget
from router.cloud_client import AttemptRecord
from router.connectivity import LinkSnapshot
from router.decision import LinkState, Reason, Route
from router.durable_queue import QueueStats
from router.errors import (
    BudgetExhausted,
    CircuitOpen,
    CloudRejected,
    CloudUnavailable,
    RateLimited,
    StorageError,
)
from router.pacing import PACING_REASONS
from router.sqlite_files import STORES

__all__ = [
    "CALL_RESULTS",
    "HOLD_REASONS",
    "PATHS",
    "CallTally",
    "CloudMeter",
    "RouterMetrics",
    "StateReadings",
]

PATHS = ("live", "drain", "probe")
"""`live`: an escalation the caller waits for; `drain`: the forwarder delivering the queue;
`probe`: the link's readiness probes (attempts and bytes only)."""
CALL_RESULTS = (
    "ok",
    "unavailable",
    "rejected",
    "breaker_open",
    "rate_limited",  # not sent: the cloud's rate would have started it after its deadline
    "budget",
    "cancelled",
    "error",
)
HOLD_REASONS = ("retry_after", "setup", "failure", "budget", "storage")
"""Why the forwarder paused: the cloud's Retry-After, a 401/403/404, a failed delivery, the budget,
a failed write to the queue file."""

log = logging.getLogger("router")

NS = "edge_agent_router"
CALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_TALLY: ContextVar[CallTally | None] = ContextVar("router_call_tally", default=None)


@dataclass(frozen=True, slots=True)
class StateReadings:
    """What the state gauges show; replaced as a whole, never mutated, so a scrape reads one."""

    cloud_configured: bool = False
    link_state: LinkState | None = None
    breaker_state: BreakerState | None = None
    rtt_s: float | None = None
    depth_by_priority: dict[int, int] = field(default_factory=dict)
    queue_used_bytes: int = 0
    queue_cap_bytes: int | None = None
    oldest_enqueued_at: float | None = None
    """Wall time of the oldest waiting item; its age is taken at scrape time."""
    budget: tuple[PeriodUsage, ...] = ()
    results_evicted: int = 0

    @classmethod
    def of(
        cls,
        cloud_configured: bool,
        stats: QueueStats,
        link: LinkSnapshot | None,
        budget: Iterable[PeriodUsage],
    ) -> StateReadings:
        return cls(
            cloud_configured=cloud_configured,
            link_state=link.state if link is not None else None,
            breaker_state=link.breaker if link is not None else None,
            rtt_s=link.rtt_s if link is not None else None,
            depth_by_priority=dict(stats.depth_by_priority),
            queue_used_bytes=stats.used_bytes,
            queue_cap_bytes=stats.cap_bytes,
            oldest_enqueued_at=stats.oldest_enqueued_at,
            budget=tuple(budget),
            results_evicted=stats.results_evicted,
        )

    def with_link(self, link: LinkSnapshot) -> StateReadings:
        return replace(self, link_state=link.state, breaker_state=link.breaker, rtt_s=link.rtt_s)


@dataclass(slots=True)
class CallTally:
    """One cloud call's attempts and bytes, filled in by `CloudMeter.on_attempt`."""

    path: str
    attempts: int = 0
    sent: int = 0
    received: int = 0


class RouterMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        readings: Callable[[], StateReadings],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        # Bumped for every answered item, from the event loop's thread only: loop metrics.
        self.routes = LoopCounter(
            f"{NS}_routes",
            "Items (rows) routed, by route taken (edge, cloud, queue) and reason.",
            ["route", "reason"],
            registry=registry,
        )
        self.model_routes = LoopCounter(
            f"{NS}_model_routes",
            "Items (rows) routed, by model and route taken (edge, cloud, queue): the share not "
            "answered at the edge is each model's escalation rate.",
            ["model", "route"],
            registry=registry,
        )
        self.attempts = Counter(
            f"{NS}_cloud_attempts",
            "HTTP attempts at the cloud, by path (live, drain, probe) and outcome.",
            ["path", "outcome"],
            registry=registry,
        )
        self.calls = Counter(
            f"{NS}_cloud_calls",
            "Cloud calls (each with its retries), by path and result.",
            ["path", "result"],
            registry=registry,
        )
        self.retries = Counter(
            f"{NS}_cloud_retries",
            "Attempts beyond the first within a cloud call, by path.",
            ["path"],
            registry=registry,
        )
        self.call_seconds = Histogram(
            f"{NS}_cloud_call_duration_seconds",
            "Time a cloud call took, retries and waits included, by path.",
            ["path"],
            buckets=CALL_BUCKETS,
            registry=registry,
        )
        self.sent_bytes = Counter(
            f"{NS}_cloud_sent_bytes",
            "Bytes put on the wire to the cloud (request lines, headers, gzip bodies), by path "
            "(live, drain, probe); the data budget counts the same bytes.",
            ["path"],
            registry=registry,
        )
        self.received_bytes = Counter(
            f"{NS}_cloud_received_bytes",
            "Bytes received from the cloud (status lines, headers, bodies as sent), by path "
            "(live, drain, probe); the data budget counts the same bytes.",
            ["path"],
            registry=registry,
        )
        self.paced = Counter(
            f"{NS}_cloud_paced_calls",
            "Cloud calls that waited before they were sent, by path (live, drain) and reason: "
            "rate (the agent's cloud_requests_per_s) or retry_after (the cloud's Retry-After).",
            ["path", "reason"],
            registry=registry,
        )
        self.paced_seconds = Counter(
            f"{NS}_cloud_paced_seconds",
            "Seconds cloud calls waited before they were sent, by path and reason.",
            ["path", "reason"],
            registry=registry,
        )
        self.enqueued = Counter(
            f"{NS}_queue_enqueued_items",
            "Items committed to the durable queue.",
            registry=registry,
        )
        self.ended = Counter(
            f"{NS}_queue_ended_items",
            "Queued items that reached an end state: delivered, expired, dropped, rejected.",
            ["state"],
            registry=registry,
        )
        self.admission_rejected = Counter(
            f"{NS}_queue_admission_rejected_items",
            "Items refused at admission because the queue was at its disk cap.",
            registry=registry,
        )
        self.quarantined = Counter(
            f"{NS}_quarantined_files",
            "Corrupt database files moved aside at start-up, by file (queue, budget).",
            ["file"],
            registry=registry,
        )
        self.batches = Counter(
            f"{NS}_forwarder_batches",
            "Batches the forwarder claimed from the queue.",
            registry=registry,
        )
        self.holds = Counter(
            f"{NS}_forwarder_holds",
            "Times the forwarder paused sending, by reason.",
            ["reason"],
            registry=registry,
        )
        self.watchers = Gauge(
            f"{NS}_result_watchers",
            "WatchResults streams open now.",
            registry=registry,
        )
        self.watchers_refused = Counter(
            f"{NS}_result_watchers_refused",
            "WatchResults streams refused because max_watchers were open already.",
            registry=registry,
        )
        self.storage_errors = Counter(
            f"{NS}_storage_errors",
            "Writes to the state dir's files that failed and were undone, by store (the file: "
            "queue, budget, audit, hard_examples) and kind (disk_full, io_error).",
            ["store", "kind"],
            registry=registry,
        )
        for store in STORES:
            for kind in ("disk_full", "io_error"):
                self.storage_errors.labels(store, kind)
        for state in ("delivered", "expired", "dropped", "rejected"):
            self.ended.labels(state)
        for path in ("live", "drain"):
            for reason in PACING_REASONS:
                self.paced.labels(path, reason)
                self.paced_seconds.labels(path, reason)
        for reason in HOLD_REASONS:
            self.holds.labels(reason)
        # Exported at 0 from the start: the quarantine alert then tells "none" from "not scraped".
        for part in ("queue", "budget"):
            self.quarantined.labels(part)
        self._route_children: dict[tuple[Route, Reason], CounterChild] = {}
        self._model_route_children: dict[tuple[str, Route], CounterChild] = {}
        self._collector = _StateCollector(readings, wall)
        registry.register(self._collector)

    def close(self) -> None:
        """Stop exporting the state gauges (the counters keep their totals)."""
        self.registry.unregister(self._collector)

    def storage_error(self, error: StorageError) -> None:
        """Count a failed write (called on the store's SQLite thread)."""
        self.storage_errors.labels(error.store, error.kind).inc()

    def quarantine(self, part: str, moved: Iterable[object], problem: str) -> None:
        """Log and count each corrupt file of `part` (queue, budget) moved aside at start-up."""
        for path in moved:
            log.error(
                "%s file was corrupt (%s); moved aside to %s and started afresh",
                part,
                problem or "unreadable",
                path,
            )
            self.quarantined.labels(part).inc()

    def route(self, route: Route, reason: Reason, n: int = 1) -> None:
        child = self._route_children.get((route, reason))
        if child is None:
            child = self._route_children[route, reason] = self.routes.labels(
                route.value, reason.value
            )
        child.inc(n)

    def model_route(self, model: str, route: Route, n: int = 1) -> None:
        child = self._model_route_children.get((model, route))
        if child is None:
            child = self._model_route_children[model, route] = self.model_routes.labels(
                model, route.value
            )
        child.inc(n)


class CloudMeter:
    """The CloudClients' `on_attempt`, and `call(path)` around each call: attempts, retries,
    bytes (both ways: a metered link bills both) and results counted, the same bytes the
    clients settle in the data budget. A probe's bytes also tell `probes` how long to pause."""

    def __init__(self, metrics: RouterMetrics, probes: ProbeBudget | None = None) -> None:
        self.metrics = metrics
        self.probes = probes

    def on_paced(self, reason: str, seconds: float) -> None:
        """The RequestPacer held a call back for `seconds`, for `reason`."""
        tally = _TALLY.get()
        path = tally.path if tally is not None else "live"
        self.metrics.paced.labels(path, reason).inc()
        self.metrics.paced_seconds.labels(path, reason).inc(seconds)

    def on_attempt(self, record: AttemptRecord) -> None:
        tally = _TALLY.get()
        path = "probe" if record.probe else tally.path if tally is not None else "live"
        if record.probe and self.probes is not None:
            self.probes.spent(
                record.bytes_sent + record.bytes_received, answered=record.status is not None
            )
        m = self.metrics
        m.attempts.labels(path, record.outcome).inc()
        if record.bytes_sent:
            m.sent_bytes.labels(path).inc(record.bytes_sent)
        if record.bytes_received:
            m.received_bytes.labels(path).inc(record.bytes_received)
        if tally is not None and not record.probe:
            tally.attempts += record.outcome not in ("breaker_open", "budget")
            tally.sent += record.bytes_sent
            tally.received += record.bytes_received

    @contextmanager
    def call(self, path: str) -> Iterator[CallTally]:
        tally = CallTally(path)
        token = _TALLY.set(tally)
        started = time.perf_counter()
        result = "error"
        try:
            yield tally
            result = "ok"
        except CircuitOpen:
            result = "breaker_open"
            raise
        except RateLimited:
            result = "rate_limited"
            raise
        except BudgetExhausted:
            result = "budget"
            raise
        except CloudRejected:
            result = "rejected"
            raise
        except CloudUnavailable:
            result = "unavailable"
            raise
        except asyncio.CancelledError:
            result = "cancelled"
            raise
        finally:
            _TALLY.reset(token)
            m = self.metrics
            m.calls.labels(path, result).inc()
            if tally.attempts > 1:
                m.retries.labels(path).inc(tally.attempts - 1)
            if tally.attempts:
                m.call_seconds.labels(path).observe(time.perf_counter() - started)


class _StateCollector(Collector):
    def __init__(self, readings: Callable[[], StateReadings], wall: Callable[[], float]) -> None:
        self._readings = readings
        self._wall = wall

    def collect(self) -> Iterable[Metric]:
        r = self._readings()
        yield _gauge(
            "cloud_configured", "1 if a cloud URL is configured.", float(r.cloud_configured)
        )
        link = GaugeMetricFamily(
            f"{NS}_link_state",
            "1 for the link's current state (up, degraded, down).",
            labels=["state"],
        )
        for state in LinkState:
            link.add_metric([state.value], float(r.link_state is state))
        yield link
        breaker = GaugeMetricFamily(
            f"{NS}_breaker_state",
            "1 for the circuit breaker's current state (closed, open, half_open).",
            labels=["state"],
        )
        for b in BreakerState:
            breaker.add_metric([b.value], float(r.breaker_state is b))
        yield breaker
        if r.rtt_s is not None:
            yield _gauge("link_rtt_seconds", "Smoothed round-trip time to the cloud.", r.rtt_s)
        depth = GaugeMetricFamily(
            f"{NS}_queue_depth_items",
            "Items waiting or in flight, by priority level (1 most urgent).",
            labels=["priority"],
        )
        for p, n in sorted(r.depth_by_priority.items()):
            depth.add_metric([str(p)], float(n))
        yield depth
        yield _gauge("queue_used_bytes", "Disk the queue accounts for.", float(r.queue_used_bytes))
        yield CounterMetricFamily(
            f"{NS}_queue_results_evicted_items",
            "Ended items deleted before their retention, to keep a larger answer under the cap.",
            value=float(r.results_evicted),
        )
        if r.queue_cap_bytes is not None:
            yield _gauge("queue_cap_bytes", "The queue's disk cap.", float(r.queue_cap_bytes))
        age = 0.0 if r.oldest_enqueued_at is None else max(0.0, self._wall() - r.oldest_enqueued_at)
        yield _gauge("queue_oldest_age_seconds", "Age of the oldest waiting item (0: none).", age)
        used = GaugeMetricFamily(
            f"{NS}_budget_used_bytes", "Data budget used this period.", labels=["period"]
        )
        left = GaugeMetricFamily(
            f"{NS}_budget_left_bytes",
            "Data budget left this period (limited periods only).",
            labels=["period"],
        )
        for usage in r.budget:
            used.add_metric([usage.period.value], float(usage.used_bytes))
            if usage.left_bytes is not None:
                left.add_metric([usage.period.value], float(usage.left_bytes))
        yield used
        yield left


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NS}_{name}", doc, value=value)
