"""Every router knob an operator may need is a setting of the agent: reachable from the TOML file,
the environment and a `serve` flag alike, validated with the key named, carried into the
RouterConfig, and with the same default as the router's own."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import typer.main
from typer.testing import CliRunner

from edge_agent.cli import app
from edge_agent.router_settings import router_config as from_settings
from edge_agent.settings import AgentSettings, SettingsError, load_settings
from edge_agent.settings_flags import ROUTER_FLAGS
from router import PriorityScale, RouterConfig

# setting -> a value other than its default, and where it lands in the RouterConfig
SAMPLES: dict[str, tuple[Any, Callable[[RouterConfig], Any], Any]] = {
    "queue_cap_bytes": (1000, lambda c: c.queue_cap_bytes, 1000),
    "queue_full_policy": (
        "drop_oldest_lowest",
        lambda c: c.full_policy.value,
        "drop_oldest_lowest",
    ),
    "default_ttl_seconds": (60.0, lambda c: c.default_ttl_s, 60.0),
    "priority_levels": (7, lambda c: c.priorities, PriorityScale(7, 5)),
    "default_priority": (2, lambda c: c.priorities.default, 2),
    "queue_ageing_seconds": (30.0, lambda c: c.queue_ageing_s, 30.0),
    "queue_lease_seconds": (45.0, lambda c: c.queue_lease_s, 45.0),
    "results_retention_seconds": (3600.0, lambda c: c.results_retention_s, 3600.0),
    "budget_day_bytes": (5000, lambda c: c.budget_day_bytes, 5000),
    "budget_month_bytes": (90000, lambda c: c.budget_month_bytes, 90000),
    "budget_mode": ("edge", lambda c: c.budget_mode.value, "edge"),
    "probe_budget_share": (0.5, lambda c: c.probe_budget_share, 0.5),
    "bandwidth_cap_bytes_per_s": (2000, lambda c: c.bandwidth_cap_bytes_per_s, 2000),
    "bandwidth_burst_seconds": (2.0, lambda c: c.bandwidth_burst_s, 2.0),
    "live_timeout_seconds": (1.5, lambda c: c.live_timeout_s, 1.5),
    "live_retry_attempts": (2, lambda c: c.live_retry.max_attempts, 2),
    "cloud_requests_per_s": (5.0, lambda c: c.cloud_requests_per_s, 5.0),
    "cloud_burst": (7, lambda c: c.cloud_burst, 7),
    "cloud_rate_recovery_seconds": (10.0, lambda c: c.cloud_rate_recovery_s, 10.0),
    "cloud_max_connections": (2, lambda c: c.max_connections, 2),
    "cloud_gzip": (False, lambda c: c.compress, False),
    "probe_interval_seconds": (90.0, lambda c: c.monitor.probe_interval_s, 90.0),
    "probe_timeout_seconds": (3.0, lambda c: c.monitor.probe_timeout_s, 3.0),
    "recovery_probe_cap_seconds": (5.0, lambda c: c.monitor.recovery_probe_cap_s, 5.0),
    "link_backoff_seconds": (2.0, lambda c: c.link_backoff_s, 2.0),
    "link_backoff_cap_seconds": (600.0, lambda c: c.link_backoff_cap_s, 600.0),
    "breaker_failures": (5, lambda c: c.breaker_failures, 5),
    "degraded_rtt_seconds": (4.0, lambda c: c.monitor.degraded_rtt_s, 4.0),
    "drain_batch_items": (8, lambda c: c.drain_batch, 8),
    "drain_batch_bytes": (4096, lambda c: c.drain_batch_bytes, 4096),
    "drain_group_items": (16, lambda c: c.drain_group_items, 16),
    "drain_group_bytes": (8192, lambda c: c.drain_group_bytes, 8192),
    "drain_concurrency": (12, lambda c: c.drain_concurrency, 12),
    "drain_timeout_seconds": (90.0, lambda c: c.drain_retry.attempt_timeout_s, 90.0),
    "failure_backoff_seconds": (1.0, lambda c: c.failure_backoff_s, 1.0),
    "failure_backoff_cap_seconds": (30.0, lambda c: c.failure_backoff_cap_s, 30.0),
    "setup_backoff_seconds": (120.0, lambda c: c.setup_backoff_s, 120.0),
    "audit_share": (0.05, lambda c: c.audit_share, 0.05),
    "audit_max_waiting": (10, lambda c: c.audit_max_waiting, 10),
}

# RouterConfig fields that are not settings, and why.
INTERNAL = {
    "cloud_url": "the setting cloud_url, checked by the settings' own URL rule",
    "device_key": "read from device_key_file",
    "state_dir": "the setting state_dir",
    "max_ttl_s": "bound to the gateway's idempotency retention (7 days): longer would let a "
    "late redelivery run the model twice",
    "live_margin_s": "internal timing margin",
    "policy_margin_s": "internal timing margin",
    "idle_poll_s": "how often an idle forwarder looks; new items wake it anyway",
    "expire_interval_s": "housekeeping period",
    "purge_interval_s": "housekeeping period",
    "hard_examples_retention_s": "the setting hard_examples_retention_days",
    "hard_examples_cap_bytes": "the setting of that name (0 for none)",
    "max_watchers": "the setting of that name, among the security settings",
    "cloud_tls": "from the files cloud_ca_file, cloud_client_cert and cloud_client_key name",
    "keyring": "from the files encryption_key_file and encryption_old_key_files name",
}
COVERED = {  # RouterConfig fields carried by the settings in SAMPLES (names differ)
    "full_policy", "default_ttl_s", "queue_cap_bytes", "priority_levels", "default_priority",
    "queue_ageing_s", "queue_lease_s", "results_retention_s", "budget_day_bytes",
    "budget_month_bytes", "budget_mode", "probe_budget_share", "bandwidth_cap_bytes_per_s",
    "bandwidth_burst_s", "live_timeout_s", "live_retry", "drain_retry", "cloud_requests_per_s",
    "cloud_burst", "cloud_rate_recovery_s", "max_connections", "compress", "monitor",
    "link_backoff_s", "link_backoff_cap_s", "breaker_failures", "drain_batch",
    "drain_batch_bytes", "drain_group_items", "drain_group_bytes", "drain_concurrency", "failure_backoff_s", "failure_backoff_cap_s",
    "setup_backoff_s", "audit_share", "audit_max_waiting",
}  # fmt: skip


def router_config(settings: AgentSettings) -> RouterConfig:
    return from_settings(settings, device_key="device-key")


def test_every_router_knob_is_a_setting_or_said_why_not() -> None:
    fields = {f.name for f in dataclasses.fields(RouterConfig)}
    assert fields == COVERED | set(INTERNAL)
    assert set(SAMPLES) == set(ROUTER_FLAGS)


def test_the_settings_defaults_are_the_routers() -> None:
    ours, theirs = router_config(AgentSettings()), RouterConfig()
    for name in COVERED - {"queue_cap_bytes"}:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.queue_cap_bytes == theirs.queue_cap_bytes


def flag_args(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [flag, str(value)]


def parse_serve_flags(args: list[str]) -> dict[str, Any]:
    """What `edge-agent serve ARGS` would pass on as settings, without serving."""
    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    ctx = command.make_context("serve", args)
    return {k: v for k, v in ctx.params.items() if k != "config"}


@pytest.mark.parametrize("name", ROUTER_FLAGS)
@pytest.mark.parametrize("layer", ["toml", "env", "flag"])
def test_each_setting_reaches_the_router_from_every_layer(
    name: str, layer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    value, where, expected = SAMPLES[name]
    extra = {"priority_levels": 3} if name == "default_priority" else {}  # 2 of 3 levels
    config = None
    flags: dict[str, Any] = dict(extra)
    if layer == "toml":
        config = tmp_path / "agent.toml"
        config.write_text(tomli_w.dumps({name: value}), encoding="utf-8")
    elif layer == "env":
        text = str(value).lower() if isinstance(value, bool) else str(value)
        monkeypatch.setenv(f"EDGE_AGENT_{name.upper()}", text)
    else:
        flags.update(parse_serve_flags(flag_args(name, value)))
    settings = load_settings(config, **flags)
    assert getattr(settings, name) == value
    assert where(router_config(settings)) == expected


def test_serve_help_lists_each_router_flag() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in ROUTER_FLAGS:
        assert "--" + name.replace("_", "-") in result.output, name


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"priority_levels": 0}, "priority_levels"),
        ({"priority_levels": 33}, "priority_levels"),
        (
            {"priority_levels": 3, "default_priority": 4},
            "default_priority: .*at most priority_levels",
        ),
        ({"queue_ageing_seconds": -1}, "queue_ageing_seconds"),
        ({"probe_budget_share": 0}, "probe_budget_share"),
        ({"probe_budget_share": 1.5}, "probe_budget_share"),
        ({"cloud_requests_per_s": -1}, "cloud_requests_per_s"),
        ({"cloud_burst": 0}, "cloud_burst"),
        ({"recovery_probe_cap_seconds": 0}, "recovery_probe_cap_seconds"),
        ({"link_backoff_seconds": 5, "link_backoff_cap_seconds": 2}, "link_backoff_cap_seconds"),
        ({"drain_concurrency": 0}, "drain_concurrency"),
        ({"live_retry_attempts": 0}, "live_retry_attempts"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(flags: dict[str, Any], words: str) -> None:
    with pytest.raises(SettingsError, match=words):
        load_settings(**flags)
