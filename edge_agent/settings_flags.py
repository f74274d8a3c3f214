"""Flags of `edge-agent serve` made from AgentSettings fields, so that every router setting is
a flag with the field's own type, default and meaning, and none can drift from the settings.

typer reads a command's options from its signature; `with_setting_flags` adds one keyword-only
parameter per listed setting to the signature it shows typer, and the command receives them in
its `**settings` (None: not given).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

import typer

from edge_agent.settings import AgentSettings

__all__ = ["ROUTER_FLAGS", "with_setting_flags"]

F = TypeVar("F", bound=Callable[..., Any])

ROUTER_FLAGS = (
    "queue_cap_bytes",
    "queue_full_policy",
    "default_ttl_seconds",
    "priority_levels",
    "default_priority",
    "queue_ageing_seconds",
    "queue_lease_seconds",
    "results_retention_seconds",
    "budget_day_bytes",
    "budget_month_bytes",
    "budget_mode",
    "probe_budget_share",
    "bandwidth_cap_bytes_per_s",
    "bandwidth_burst_seconds",
    "live_timeout_seconds",
    "live_retry_attempts",
    "cloud_requests_per_s",
    "cloud_burst",
    "cloud_rate_recovery_seconds",
    "cloud_max_connections",
    "cloud_gzip",
    "probe_interval_seconds",
    "probe_timeout_seconds",
    "recovery_probe_cap_seconds",
    "link_backoff_seconds",
    "link_backoff_cap_seconds",
    "breaker_failures",
    "degraded_rtt_seconds",
    "drain_batch_items",
    "drain_batch_bytes",
    "drain_group_items",
    "drain_group_bytes",
    "drain_concurrency",
    "drain_timeout_seconds",
    "failure_backoff_seconds",
    "failure_backoff_cap_seconds",
    "setup_backoff_seconds",
    "audit_share",
    "audit_max_waiting",
)
"""The router's settings (queue, budget, link, delivery, the cloud's limits) as flags."""


def with_setting_flags(names: Sequence[str]) -> Callable[[F], F]:
    """Give the command a `--<name>` option for each setting in `names`, help from its
    docstring, default None (then the environment, the file or the default decides)."""

    def add(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        kept = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        flags = [_flag(name) for name in names]
        command.__signature__ = signature.replace(parameters=[*kept, *flags])  # type: ignore[attr-defined]
        return command

    return add


def _flag(name: str) -> inspect.Parameter:
    field = AgentSettings.model_fields[name]
    help_text = " ".join((field.description or "").split())
    default = field.get_default(call_default_factory=False)
    shown = (
        f"{help_text} (default: {str(default).lower() if isinstance(default, bool) else default})"
    )
    option = typer.Option(help=shown, show_default=False)
    kind: Any = field.annotation
    annotation = Annotated[kind | None, option]
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
    )
