"""deploy/prometheus: the alert rules pass promtool's checks and unit tests, use only metrics
the daemons export, and each alert says how bad it is and what to do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trustme
import yaml

from tests.unit.test_ops_promql import ALERTS, rules, run_promtool, unknown_names

TESTS = ALERTS.with_name("alerts_test.yml")
EXAMPLE_CONFIG = ALERTS.with_name("prometheus.example.yml")
SEVERITIES = {"critical", "warning", "info"}
_QUERY_IN_TEMPLATE = re.compile(r'printf\s+"((?:[^"\\]|\\.)*)"')


def alerts() -> list[dict[str, object]]:
    return [rule for rule in rules() if "alert" in rule]


def test_promtool_check_rules_passes() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", str(TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_alert_is_tested_firing_and_quiet() -> None:
    document = yaml.safe_load(TESTS.read_text(encoding="utf-8"))
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in document["tests"]:
        for case in test["alert_rule_test"]:
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {str(rule["alert"]) for rule in alerts()}
    assert names - firing == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown staying quiet"


def test_example_prometheus_config_is_valid(tmp_path: Path) -> None:
    # The example points at the installed rules file; check it against the one here.
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    assert "/etc/prometheus/edge-cloud-router/alerts.yml" in text
    config = tmp_path / "prometheus.yml"
    text_here = text.replace("/etc/prometheus/edge-cloud-router/alerts.yml", str(ALERTS))
    # promtool wants the token files to exist (the daemons' metrics_token_file copies), and
    # the CA files that signed their metrics_tls_cert_file.
    (tmp_path / "secrets").mkdir()
    text_here = text_here.replace("/etc/prometheus/secrets/", f"{tmp_path}/secrets/")
    for job in yaml.safe_load(text_here)["scrape_configs"]:
        Path(job["authorization"]["credentials_file"]).write_text("0123456789abcdef\n")
        assert job["scheme"] == "https", job["job_name"]
        trustme.CA().cert_pem.write_to_path(job["tls_config"]["ca_file"])
    config.write_text(text_here)
    result = run_promtool("check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"] for job in yaml.safe_load(text)["scrape_configs"]}
    assert jobs == {"edge-agent", "cloud-gateway"}  # the names the rules select on


def test_rules_use_only_exported_metrics() -> None:
    for rule in rules():
        name = rule.get("alert") or rule.get("record")
        assert unknown_names(str(rule["expr"])) == set(), name
        # queries inside annotation templates, e.g. the site lookup of the offline alerts
        templates = " ".join(str(v) for v in rule.get("annotations", {}).values())
        for query in _QUERY_IN_TEMPLATE.findall(templates):
            assert unknown_names(query.replace("%q", '"x"').replace('\\"', '"')) == set(), name


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: str(rule["alert"]))
def test_alert_has_severity_and_says_what_to_do(rule: dict[str, object]) -> None:
    labels = rule.get("labels")
    annotations = rule.get("annotations")
    assert isinstance(labels, dict)
    assert isinstance(annotations, dict)
    assert labels.get("severity") in SEVERITIES
    assert {"summary", "description"} <= annotations.keys()
    assert len(str(annotations["description"])) > 80
    # a condition that must hold for a while, except a quarantined file: it is reported once
    assert "for" in rule or rule["alert"] == "EdgeQueueFileQuarantined"
