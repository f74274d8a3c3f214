"""RouterConfig: every knob of the router as one small immutable value, with named defaults.

The edge agent builds it once from its settings; the router never reads the environment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from model_runtime.encryption import Keyring
from router.cloud_client import CloudTls
from router.connectivity import MonitorConfig
from router.decision import (
    DEFAULT_PRIORITY,
    DEFAULT_TTL_SECONDS,
    MAX_TTL_SECONDS,
    PRIORITY_LEVELS,
    PriorityScale,
)
from router.durable_queue import FullPolicy
from router.policy import BudgetMode
from router.retrying import RetryPolicy
from router.sqlite_files import STORES

__all__ = [
    "AFTER_COMMIT_BEFORE_ANSWER",
    "AFTER_SEND_BEFORE_MARK",
    "AUDIT_FILE",
    "BUDGET_FILE",
    "FAULT_POINTS",
    "HARD_EXAMPLES_FILE",
    "QUEUE_FILE",
    "RouterConfig",
]

AFTER_COMMIT_BEFORE_ANSWER = "router.after_commit_before_answer"
"""Fault point: a request's items are committed to the queue, its answer not yet returned."""
AFTER_SEND_BEFORE_MARK = "forwarder.after_send_before_mark"
"""Fault point: the cloud answered a queued item, the answer is not yet stored under it."""
FAULT_POINTS = {
    AFTER_COMMIT_BEFORE_ANSWER: False,
    AFTER_SEND_BEFORE_MARK: False,
    **{f"{store}.commit": True for store in STORES},
}
"""The agent's fault points (model_runtime.fault_points), and whether each is a write."""

QUEUE_FILE = "queue.sqlite"
BUDGET_FILE = "budget.sqlite"
AUDIT_FILE = "audit.sqlite"
HARD_EXAMPLES_FILE = "hard_examples.sqlite"


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """What the router needs to know; every field is checked at construction (ValueError names it)."""

    cloud_url: str | None = None
    """Base URL of the cloud's v2 REST endpoint; None answers everything at the edge
    (reason no_cloud_configured)."""
    device_key: str | None = None
    """Bearer key of this device at the cloud; required with `cloud_url`."""
    cloud_tls: CloudTls | None = None
    """CA bundle and client certificate for an https:// cloud; None: the system's CAs."""
    state_dir: Path = Path("var/edge-agent")
    """Directory of the queue file and the data budget's file."""
    queue_cap_bytes: int | None = 256 * 2**20
    """Disk the queue may account for (see DurableQueue); None or 0: no cap."""
    full_policy: FullPolicy = FullPolicy.REFUSE
    default_ttl_s: float = DEFAULT_TTL_SECONDS
    max_ttl_s: float = MAX_TTL_SECONDS
    results_retention_s: float = 7 * 86400.0
    """How long an ended ticket (and the cloud's answer) stays readable."""
    budget_day_bytes: int | None = None
    """Bytes per UTC day to and from the cloud; None or 0: unlimited."""
    budget_month_bytes: int | None = None
    budget_mode: BudgetMode = BudgetMode.QUEUE
    probe_budget_share: float = 0.1
    """Link probes spend at most this share of what is left of each limited budget period,
    spread over the rest of the period (router.budget.ProbeBudget); probes that cannot connect
    cost nothing and are not slowed."""
    bandwidth_cap_bytes_per_s: int | None = None
    """The forwarder sends at most this many bytes per second (requests as they go on the
    wire: request line, headers and gzip body); None or 0: uncapped. Live escalations are not
    capped: they are what the caller waits for."""
    bandwidth_burst_s: float = 0.25
    """The bucket holds this many seconds of the cap (at least one request's worth)."""
    live_timeout_s: float = 2.0
    """A live escalation's time limit when the caller set no deadline (and its upper bound)."""
    live_margin_s: float = 0.05
    """Kept free of the caller's deadline for the local fallback and encoding the answer."""
    policy_margin_s: float = 0.02
    """EscalationPolicy's margin in its deadline rule."""
    drain_batch: int = 16
    """Items the forwarder claims at once."""
    drain_batch_bytes: int = 1 << 20
    """Payload bytes the forwarder claims at once (at least one item)."""
    drain_group_items: int = 64
    """Queued items sent together in one request of the cloud's infer_group extension, when
    the cloud takes groups (its server metadata says, with its own limits); 1: one request per
    item. Live escalations are always one request per item."""
    drain_group_bytes: int = 64 * 1024
    """A group's items' bytes at most (before gzip); a larger item goes alone."""
    drain_concurrency: int = 4
    """Cloud calls the forwarder keeps in flight at once. To fill the bandwidth cap they must
    cover cap x a call's duration: e.g. 20 kB/s x 0.4 s / 600-byte requests = 14 calls."""
    live_retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retries of a live call; the caller's deadline bounds them further."""
    drain_retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(max_attempts=1, attempt_timeout_s=30.0)
    )
    """One attempt per claim: the queue is the forwarder's retry loop (release, then again)."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    breaker_failures: int = 3
    """Consecutive failed calls or probes that open the circuit breaker."""
    link_backoff_s: float = 1.0
    """First wait between probes of a down link (and the breaker's first cool-down); then
    x1.6 per failure, up to `link_backoff_cap_s`, ±20 % jitter."""
    link_backoff_cap_s: float = 120.0
    failure_backoff_s: float = 0.5
    """The forwarder's pause after a failed delivery, growing x1.6 per failure in a row."""
    failure_backoff_cap_s: float = 60.0
    setup_backoff_s: float = 30.0
    """Pause after 401/403/404: a setup problem (key, model name) that retrying won't fix soon."""
    idle_poll_s: float = 5.0
    """With nothing to send, the forwarder looks again this often (new items also wake it)."""
    expire_interval_s: float = 5.0
    """How often due items are expired and queue figures refreshed for metrics."""
    purge_interval_s: float = 600.0
    """How often ended items past `results_retention_s` are deleted."""
    queue_ageing_s: float | None = 600.0
    """A waiting item moves up one priority level per this many seconds; None or 0: never."""
    queue_lease_s: float = 300.0
    """A claimed item not settled within this long is claimed again (a lost call)."""
    priority_levels: int = PRIORITY_LEVELS
    """Priority levels, as Triton numbers them: 1 is the most urgent, this the least."""
    default_priority: int = DEFAULT_PRIORITY
    """The level of a request that sends priority 0 or none."""
    cloud_requests_per_s: float | None = 40.0
    """Cloud calls started per second at most, live and drain together (router.pacing); each
    429 halves it, and it grows back over `cloud_rate_recovery_s`. None or 0: no rate of its
    own (the cloud's Retry-After still holds calls back)."""
    cloud_burst: int = 10
    """Calls that may start at once before the rate applies."""
    cloud_rate_recovery_s: float = 60.0
    """How long the rate takes to grow back to `cloud_requests_per_s` after a 429 halved it."""
    max_connections: int = 4
    """Connections of the live calls' pool; the forwarder's pool has at least
    `drain_concurrency`."""
    compress: bool = True
    audit_share: float = 0.0
    """Share of confident items also sent to the cloud, in the background at the lowest
    priority, to measure how often the edge model agrees with it (router.audit); 0: off."""
    audit_max_waiting: int = 100
    """Audits waiting for the cloud at most; more are skipped (counted as backlog)."""
    hard_examples_retention_s: float = 0.0
    """How long escalated inputs are kept with the cloud's answers for retraining
    (router.hard_examples); 0: off, and a file kept before is deleted at start-up."""
    hard_examples_cap_bytes: int | None = 64 * 2**20
    """Disk the hard examples may take (compressed); beyond it new ones are not kept."""
    max_watchers: int | None = 1024
    """WatchResults streams at once; one more is refused (TooManyWatchers). None: no limit."""
    keyring: Keyring | None = None
    """Encryption at rest of queued requests, answers and hard examples
    (model_runtime.encryption); None or a keyring without a current key: stored as given."""

    def __post_init__(self) -> None:
        if self.cloud_url is not None:
            if not self.cloud_url.startswith(("http://", "https://")):
                raise ValueError(
                    f"cloud_url: must start with http:// or https://, got {self.cloud_url!r}"
                )
            if not self.device_key:
                raise ValueError("device_key: required when cloud_url is set")
        _nonneg_int("queue_cap_bytes", self.queue_cap_bytes)
        _nonneg_int("budget_day_bytes", self.budget_day_bytes)
        _nonneg_int("budget_month_bytes", self.budget_month_bytes)
        _nonneg_int("bandwidth_cap_bytes_per_s", self.bandwidth_cap_bytes_per_s)
        for name in (
            "default_ttl_s",
            "max_ttl_s",
            "results_retention_s",
            "bandwidth_burst_s",
            "live_timeout_s",
            "failure_backoff_s",
            "failure_backoff_cap_s",
            "link_backoff_s",
            "link_backoff_cap_s",
            "setup_backoff_s",
            "idle_poll_s",
            "expire_interval_s",
            "purge_interval_s",
            "queue_lease_s",
            "cloud_rate_recovery_s",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
        rate = self.cloud_requests_per_s
        if rate is not None and not (isinstance(rate, int | float) and math.isfinite(rate)):
            raise ValueError(f"cloud_requests_per_s: must be a number >= 0, got {rate!r}")
        if rate is not None and rate < 0:
            raise ValueError(f"cloud_requests_per_s: must be a number >= 0, got {rate!r}")
        for name in ("live_margin_s", "policy_margin_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        if self.default_ttl_s > self.max_ttl_s:
            raise ValueError(
                f"default_ttl_s: must be at most max_ttl_s ({self.max_ttl_s:g}), "
                f"got {self.default_ttl_s:g}"
            )
        for name in (
            "drain_batch",
            "drain_batch_bytes",
            "drain_group_items",
            "drain_group_bytes",
            "drain_concurrency",
            "max_connections",
            "audit_max_waiting",
            "cloud_burst",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if not (
            isinstance(self.probe_budget_share, int | float) and 0 < self.probe_budget_share <= 1
        ):
            raise ValueError(
                f"probe_budget_share: must be a number in (0, 1], got {self.probe_budget_share!r}"
            )
        if not (isinstance(self.audit_share, int | float) and 0.0 <= self.audit_share <= 1.0):
            raise ValueError(f"audit_share: must be a number in [0, 1], got {self.audit_share!r}")
        if not (
            isinstance(self.hard_examples_retention_s, int | float)
            and math.isfinite(self.hard_examples_retention_s)
            and self.hard_examples_retention_s >= 0
        ):
            raise ValueError(
                "hard_examples_retention_s: must be a finite number >= 0 (0: off), "
                f"got {self.hard_examples_retention_s!r}"
            )
        _nonneg_int("hard_examples_cap_bytes", self.hard_examples_cap_bytes)
        if self.max_watchers is not None and (
            isinstance(self.max_watchers, bool)
            or not isinstance(self.max_watchers, int)
            or self.max_watchers < 1
        ):
            raise ValueError(
                f"max_watchers: must be an integer >= 1 or None, got {self.max_watchers!r}"
            )
        if not (
            self.queue_ageing_s is None
            or (
                isinstance(self.queue_ageing_s, int | float)
                and math.isfinite(self.queue_ageing_s)
                and self.queue_ageing_s >= 0
            )
        ):
            raise ValueError(
                f"queue_ageing_s: must be a finite number >= 0 (0: no ageing), "
                f"got {self.queue_ageing_s!r}"
            )
        PriorityScale(self.priority_levels, self.default_priority)  # ValueError naming either
        if self.breaker_failures < 1:
            raise ValueError(f"breaker_failures: must be >= 1, got {self.breaker_failures!r}")
        object.__setattr__(self, "full_policy", FullPolicy(self.full_policy))
        object.__setattr__(self, "budget_mode", BudgetMode(self.budget_mode))
        object.__setattr__(self, "state_dir", Path(self.state_dir))

    @property
    def priorities(self) -> PriorityScale:
        return PriorityScale(self.priority_levels, self.default_priority)

    @property
    def cloud_configured(self) -> bool:
        return self.cloud_url is not None

    @property
    def queue_path(self) -> Path:
        return self.state_dir / QUEUE_FILE

    @property
    def budget_path(self) -> Path:
        return self.state_dir / BUDGET_FILE

    @property
    def audit_path(self) -> Path:
        return self.state_dir / AUDIT_FILE

    @property
    def hard_examples_path(self) -> Path:
        return self.state_dir / HARD_EXAMPLES_FILE


def _nonneg_int(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: must be an integer >= 0 (0 or None: none), got {value!r}")
