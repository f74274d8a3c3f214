"""deploy/grafana: the dashboard's queries use only metrics the daemons export (or the recording
rules of alerts.yml), parse as PromQL, and it has a fleet view and a per-site view."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.unit.test_ops_promql import ROOT, metric_names, run_promtool, unknown_names

DASHBOARD = ROOT / "deploy" / "grafana" / "edge-cloud-router.json"


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query, and of the template variables."""
    found = [
        (panel["title"], target["expr"])
        for panel in panels()
        for target in panel.get("targets", [])
    ]
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            # label_values(metric, label): the metric is what matters
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query["query"])
            assert match, query
            found.append((f"variable {variable['name']}", match.group(1)))
    return found


def test_every_query_uses_only_exported_metrics() -> None:
    assert len(queries()) > 20
    for title, expr in queries():
        assert metric_names(expr), f"{title}: no metric in {expr!r}"
        assert unknown_names(expr) == set(), f"{title}: {expr}"


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses rule files: make each query a recording rule, with Grafana's variables
    # replaced by values Prometheus would see.
    def concrete(expr: str) -> str:
        for variable, value in (("$__rate_interval", "1m"), ("$site", "clinic-1")):
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        return expr

    records = [
        {"record": f"dashboard:query:{i}", "expr": concrete(expr)}
        for i, (_, expr) in enumerate(queries())
    ]
    rules = tmp_path / "dashboard_queries.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = run_promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


def test_fleet_view_and_site_view() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36  # Grafana 9 and later
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["site"]["definition"] == "label_values(edge_agent_info, site)"
    assert variables["datasource"]["type"] == "datasource"

    rows = [p for p in board["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == ["Fleet", "Site $site"]
    site_row_y = rows[1]["gridPos"]["y"]
    fleet = [p for p in panels() if p["type"] != "row" and p["gridPos"]["y"] < site_row_y]
    site = [p for p in panels() if p["type"] != "row" and p["gridPos"]["y"] > site_row_y]

    fleet_text = json.dumps(fleet)
    for metric in (
        "up",  # sites up
        "edge_agent_router_queue_depth_items",
        "edge_agent:escalation_share:ratio_rate1h",
        "edge_agent_router_budget_left_bytes",
        "edge_agent_router_link_state",
    ):
        assert re.search(rf"\b{re.escape(metric)}\b", fleet_text), metric
    for panel in site:
        for target in panel["targets"]:
            assert 'site=\\"$site\\"' in json.dumps(target["expr"]), panel["title"]
    site_text = json.dumps(site)
    for metric in (
        "edge_agent_request_duration_seconds_bucket",
        "edge_agent_router_routes_total",
        "edge_agent_router_queue_depth_items",
        "edge_agent_router_cloud_calls_total",
        "edge_agent_router_breaker_state",
    ):
        assert metric in site_text, metric


def test_panels_are_well_formed() -> None:
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    for panel in panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
