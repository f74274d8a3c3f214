"""The router's config from the agent's settings: one setting, one RouterConfig field, with the
agent's units (seconds, days, 0 for none) turned into the router's.
"""

from __future__ import annotations

from edge_agent.settings import AgentSettings
from model_runtime.encryption import Keyring
from router import BudgetMode, FullPolicy, MonitorConfig, RetryPolicy, RouterConfig
from router.cloud_client import CloudTls

__all__ = ["router_config"]


def router_config(
    settings: AgentSettings,
    *,
    device_key: str | None,
    cloud_tls: CloudTls | None = None,
    keyring: Keyring | None = None,
) -> RouterConfig:
    """The router's config from the agent's settings and the secrets read from the files they
    name (edge_agent.credentials); ValueError names a value the router refuses."""
    s = settings
    return RouterConfig(
        cloud_url=s.cloud_url,
        device_key=device_key,
        cloud_tls=cloud_tls,
        keyring=keyring,
        max_watchers=s.max_watchers,
        state_dir=s.state_dir,
        queue_cap_bytes=s.queue_cap_bytes or None,
        full_policy=FullPolicy(s.queue_full_policy),
        default_ttl_s=s.default_ttl_seconds,
        results_retention_s=s.results_retention_seconds,
        budget_day_bytes=s.budget_day_bytes or None,
        budget_month_bytes=s.budget_month_bytes or None,
        budget_mode=BudgetMode(s.budget_mode),
        probe_budget_share=s.probe_budget_share,
        bandwidth_cap_bytes_per_s=s.bandwidth_cap_bytes_per_s or None,
        bandwidth_burst_s=s.bandwidth_burst_seconds,
        live_timeout_s=s.live_timeout_seconds,
        drain_batch=s.drain_batch_items,
        drain_batch_bytes=s.drain_batch_bytes,
        drain_group_items=s.drain_group_items,
        drain_group_bytes=s.drain_group_bytes,
        drain_concurrency=s.drain_concurrency,
        live_retry=RetryPolicy(max_attempts=s.live_retry_attempts),
        drain_retry=RetryPolicy(
            max_attempts=1,
            attempt_timeout_s=s.drain_timeout_seconds,
            max_total_s=s.drain_timeout_seconds,
        ),
        monitor=MonitorConfig(
            probe_interval_s=s.probe_interval_seconds,
            probe_timeout_s=s.probe_timeout_seconds,
            degraded_rtt_s=s.degraded_rtt_seconds,
            recovery_probe_cap_s=s.recovery_probe_cap_seconds,
        ),
        breaker_failures=s.breaker_failures,
        link_backoff_s=s.link_backoff_seconds,
        link_backoff_cap_s=s.link_backoff_cap_seconds,
        failure_backoff_s=s.failure_backoff_seconds,
        failure_backoff_cap_s=s.failure_backoff_cap_seconds,
        setup_backoff_s=s.setup_backoff_seconds,
        queue_ageing_s=s.queue_ageing_seconds or None,
        queue_lease_s=s.queue_lease_seconds,
        priority_levels=s.priority_levels,
        default_priority=s.default_priority,
        cloud_requests_per_s=s.cloud_requests_per_s or None,
        cloud_burst=s.cloud_burst,
        cloud_rate_recovery_s=s.cloud_rate_recovery_seconds,
        max_connections=s.cloud_max_connections,
        compress=s.cloud_gzip,
        audit_share=s.audit_share,
        audit_max_waiting=s.audit_max_waiting,
        hard_examples_retention_s=s.hard_examples_retention_days * 86400.0,
        hard_examples_cap_bytes=s.hard_examples_cap_bytes or None,
    )
