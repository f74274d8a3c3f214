"""What the dashboard and alert checks stand on: the metric names the daemons really export
(from their registries, so a renamed metric fails the checks) and the names a PromQL query uses.

The other test_ops_* modules import `exported_names`, `recorded_names`, `metric_names`,
`rules` and `promtool` from here.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from cloud_gateway.metrics import GatewayMetrics
from cloud_gateway.supervisor import worker_replacements
from edge_agent.metrics import AgentMetrics
from model_runtime import ModelRepository
from model_runtime.demo import EDGE_REPOSITORY
from model_runtime.metrics_endpoint import scrape_refusals
from router.breaker import BreakerState
from router.budget import BudgetPeriod, PeriodUsage
from router.decision import LinkState
from router.metrics import RouterMetrics, StateReadings

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
GENERATED_BY_PROMETHEUS = frozenset({"up"})
"""Series Prometheus makes itself for every target."""

# Readings with every optional part present, so the state collector yields every gauge it has.
_FULL = StateReadings(
    cloud_configured=True,
    link_state=LinkState.UP,
    breaker_state=BreakerState.CLOSED,
    rtt_s=0.1,
    depth_by_priority={5: 1},
    queue_used_bytes=1,
    queue_cap_bytes=2,
    oldest_enqueued_at=0.0,
    budget=(PeriodUsage(BudgetPeriod.DAY, "2024-01-01", 1, 10),),
)
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
}


def promtool() -> str:
    """The promtool binary, or skip: it comes with Debian's `prometheus` package."""
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed (apt-get install prometheus); CI installs it")
    return found


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def _sample_names(family: Metric) -> set[str]:
    # By type, not from samples: a labelled metric with no children yet has no samples.
    names = {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
    return names | {s.name for s in family.samples if not s.name.endswith("_created")}


@functools.cache
def exported_names() -> frozenset[str]:
    """Every sample name the edge agent (with its router) and the gateway put on /metrics."""
    agent = CollectorRegistry()
    AgentMetrics(agent, ModelRepository.load(EDGE_REPOSITORY))
    RouterMetrics(agent, lambda: _FULL)
    gateway = CollectorRegistry()
    GatewayMetrics(gateway)
    # Registered by the /metrics endpoint itself, in the registry it serves.
    scrape_refusals(agent, "edge_agent")
    scrape_refusals(gateway, "cloud_gateway")
    worker_replacements(gateway)  # by the supervisor, beside its workers' metrics
    names: set[str] = set()
    for registry in (agent, gateway):
        for family in registry.collect():
            names |= _sample_names(family)
    return frozenset(names)


@functools.cache
def rules() -> list[dict[str, Any]]:
    """The rules of alerts.yml, recording and alerting."""
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "atan2", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression selects (Grafana's $variables allowed)."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _LABEL_LISTS.sub(" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.groups()
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def unknown_names(expr: str) -> set[str]:
    """Names in `expr` that neither the daemons, nor the recording rules, nor Prometheus make."""
    known = exported_names() | recorded_names() | GENERATED_BY_PROMETHEUS
    return metric_names(expr) - known


# -- the foundations themselves ----------------------------------------------------------------


def test_metric_names_finds_selectors_and_skips_functions_labels_and_variables() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(edge_agent_request_duration_seconds_bucket"
        '{model="digits", job=~"edge.*"}[$__rate_interval])) * on (job, instance) group_left '
        '(site) edge_agent_info{site="$site"}) > bool 1e3 or vector(0) '
        "unless on(job) edge_agent:offline:bool offset 5m"
    )
    assert metric_names(expr) == {
        "edge_agent_request_duration_seconds_bucket",
        "edge_agent_info",
        "edge_agent:offline:bool",
    }


def test_exported_names_come_from_the_registries() -> None:
    names = exported_names()
    # one of each kind, from each of the three metric classes
    assert {
        "edge_agent_info",
        "edge_agent_requests_total",
        "edge_agent_request_duration_seconds_bucket",
        "edge_agent_router_queue_depth_items",
        "edge_agent_router_routes_total",
        "edge_agent_router_budget_left_bytes",
        "cloud_gateway_requests_total",
        "cloud_gateway_model_runs_total",
        "edge_agent_scrapes_refused_total",
        "cloud_gateway_scrapes_refused_total",
    } <= names
    assert "edge_agent_requests" not in names  # counters are exported with _total
    assert unknown_names("rate(edge_agent_router_routes_totals[5m])") == {
        "edge_agent_router_routes_totals"
    }
