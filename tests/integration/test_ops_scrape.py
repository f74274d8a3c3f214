"""A real Prometheus scrapes a running edge agent and gateway through an outage; its HTTP API
shows the targets up and the series an operator relies on, the alert rules evaluate without
error, and every dashboard query runs."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import LINK_WORKS, start_agent_with_cloud
from tests.integration.gateway.helpers import Gateway
from tests.integration.test_ops_metrics import infer, link_state, queue_depth
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Daemon, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "edge-cloud-router.json"


class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The value of a query that yields at most one series."""
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def holds(self, expr: str) -> bool:
        return bool(self.query(expr))


def free_port() -> int:
    # Bind-then-close, for Prometheus alone: it cannot listen on port 0 and report the port
    # it got. Our daemons report theirs (--port-file).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def agent(tmp_path: Path, gateway: Gateway, proxy: FaultProxy) -> Iterator[Daemon]:
    (tmp_path / "agent").mkdir()
    daemon = start_agent_with_cloud(tmp_path / "agent", gateway, proxy)
    yield daemon
    daemon.stop()


@pytest.fixture
def prometheus(tmp_path: Path, agent: Daemon, gateway: Gateway) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (apt-get install prometheus); CI installs it")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "edge-agent", "static_configs": [{"targets": [agent.address("metrics")]}]},
            {
                "job_name": "cloud-gateway",
                "static_configs": [{"targets": [gateway.daemon.address("metrics")]}],
            },
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={address}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://{address}", process, log)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{log.read_text()}")
        return httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200

    try:
        wait_until(ready, timeout=30, interval=0.1, what="prometheus to be ready")
        yield server
    finally:
        process.terminate()
        process.wait(20)


def test_prometheus_sees_the_outage_and_the_drain(
    prometheus: Prometheus, agent: Daemon, gateway: Gateway, proxy: FaultProxy
) -> None:
    p = prometheus
    wait_until(
        lambda: (
            p.value('min(up{job=~"edge-agent|cloud-gateway"})') == 1 and len(p.query("up")) == 2
        ),
        timeout=20,
        what="both targets up",
    )
    wait_until(lambda: link_state(agent) in LINK_WORKS, timeout=20, what="the link to work")
    infer(agent, slice(0, 8))  # mostly confident: answered at the edge
    infer(agent, slice(8, 10), escalation="always")  # the cloud answers live

    proxy.cut()
    wait_until(lambda: link_state(agent) == "down", timeout=20, what="the link to go down")
    for i in range(10, 14):
        infer(agent, slice(i, i + 1), escalation="always")  # queued
    wait_until(
        lambda: p.value("sum(edge_agent_router_queue_depth_items)") == 4,
        timeout=20,
        what="prometheus to see four items waiting",
    )
    assert p.value('edge_agent_router_link_state{state="down"}') == 1
    link_down = 'sum(edge_agent_router_routes_total{reason="link_down"})'
    wait_until(lambda: p.value(link_down) == 4, timeout=20, what="four link_down routes")
    wait_until(
        lambda: p.value("edge_agent:offline:bool") == 1,
        timeout=20,
        what="the offline recording rule to see the outage",
    )

    proxy.restore()
    wait_until(lambda: queue_depth(agent) == 0, timeout=30, what="the queue to drain")
    wait_until(
        lambda: p.value("sum(edge_agent_router_queue_depth_items)") == 0,
        timeout=20,
        what="prometheus to see the queue empty",
    )
    # what an operator reads afterwards: the queue rose, then fell; the drain delivered
    assert p.value("max_over_time(sum(edge_agent_router_queue_depth_items)[2m:1s])") == 4
    delivered = 'sum(edge_agent_router_queue_ended_items_total{state="delivered"})'
    wait_until(lambda: p.value(delivered) == 4, timeout=20, what="four deliveries scraped")
    assert p.value('sum(edge_agent_router_routes_total{reason="escalation_always"})') == 2
    # 2 asked-for escalations, 4 drained, and the first batch's unsure rows; the gateway is
    # scraped on its own schedule, so wait for its figure too
    runs = 'sum(cloud_gateway_model_runs_total{model="digits-large"})'
    wait_until(lambda: (p.value(runs) or 0) >= 6, timeout=20, what="six model runs scraped")
    assert p.value('sum(cloud_gateway_requests_total{code="200", endpoint!="unmatched"})')
    assert p.value("max_over_time(edge_agent:offline:bool[2m])") == 1

    # The site join the dashboard and alerts use works on the real series.
    joined = p.query(
        "sum by (site) (edge_agent_router_queue_depth_items"
        " * on (job, instance) group_left (site) edge_agent_info)"
    )
    assert len(joined) == 1
    assert joined[0]["metric"]["site"]

    check_rules_evaluate(p)
    check_dashboard_queries_run(p, site=joined[0]["metric"]["site"])


def check_rules_evaluate(p: Prometheus) -> None:
    """Every rule of alerts.yml was evaluated against the real series without an error."""
    groups = p.api("rules")["groups"]
    evaluated = [rule for group in groups for rule in group["rules"]]
    assert len(evaluated) == ALERTS.read_text().count("- alert:") + ALERTS.read_text().count(
        "- record:"
    )
    for rule in evaluated:
        assert rule["health"] == "ok", rule
    # Nothing fires on a healthy pair; the offline rule's 6 h are far away.
    firing = [a for a in p.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []


def check_dashboard_queries_run(p: Prometheus, site: str) -> None:
    """Each panel's query is valid and, over this run, found data, unless this run had none
    for it to find (no data budget set, no retries, nothing refused)."""
    dashboard = json.loads(DASHBOARD.read_text())
    now = float(p.api("query", query="time()")["result"][0])
    empty = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$site", site)
            found = p.api("query_range", query=expr, start=str(now - 120), end=str(now), step="1")
            if not found["result"]:
                empty.append(f"{panel['title']}: {expr}")
    allowed = ("budget", "refused at the cap", "retries")
    unexpected = [e for e in empty if not any(a in e for a in allowed)]
    assert unexpected == [], "\n".join(unexpected)
