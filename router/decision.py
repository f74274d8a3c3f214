"""The value objects of a routing decision: where a request goes, why, and what the caller asked for.

Plain, immutable and transport-free: the edge agent parses request parameters into `CallerWishes`
and writes `Decision.route` and `Decision.reason` back into the response parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from model_runtime.errors import InvalidInput

__all__ = [
    "DEFAULT_PRIORITY",
    "DEFAULT_TTL_SECONDS",
    "MAX_PRIORITY_LEVELS",
    "MAX_TTL_SECONDS",
    "PRIORITY_LEVELS",
    "CallerWishes",
    "Decision",
    "Escalation",
    "LinkState",
    "LinkView",
    "PriorityScale",
    "Reason",
    "Route",
]

PRIORITY_LEVELS = 10
DEFAULT_PRIORITY = 5
"""Triton's convention: level 1 is the most urgent, PRIORITY_LEVELS the least; a request that
sends 0 or no priority gets DEFAULT_PRIORITY. Queues written when this project read 0-9 as
higher-first are migrated as 10 - p, which keeps their order and their default, 5."""
MAX_PRIORITY_LEVELS = 32
"""Levels are a label of the queue-depth metric: a bounded set."""

DEFAULT_TTL_SECONDS = 24 * 3600.0
MAX_TTL_SECONDS = 7 * 24 * 3600.0
"""A queued request older than its TTL is expired, not sent: a clinic's outage lasts hours, not weeks."""


class Route(StrEnum):
    """Where the request was answered from."""

    EDGE = "edge"  # the local answer is final
    CLOUD = "cloud"  # the cloud is called now and its answer returned
    QUEUE = "queue"  # the local answer is provisional; the request waits on disk under a ticket


class Reason(StrEnum):
    """Why the route was taken. A fixed set: metrics label by it, so it must stay bounded."""

    CONFIDENT = "confident"
    """edge: the local confidence reached the model's threshold."""
    ESCALATION_NEVER = "escalation_never"
    """edge: the caller asked never to escalate."""
    NO_CLOUD_CONFIGURED = "no_cloud_configured"
    """edge: unsure, but this agent has no cloud (or the model has no cloud counterpart)."""
    BUDGET_EXHAUSTED = "budget_exhausted"
    """edge or queue (per the budget mode): unsure, but the data budget for the period is spent."""
    UNSURE = "unsure"
    """cloud: the local confidence was below the threshold and the link can carry it in time."""
    ESCALATION_ALWAYS = "escalation_always"
    """cloud: the caller asked always to escalate and the link can carry it in time."""
    LINK_DOWN = "link_down"
    """queue: the link to the cloud is down."""
    BREAKER_OPEN = "breaker_open"
    """queue: the circuit breaker is open after repeated cloud failures."""
    DEADLINE_TOO_SHORT = "deadline_too_short"
    """queue: the expected cloud latency plus transfer time does not fit the caller's deadline."""
    RATE_LIMITED = "rate_limited"
    """queue, set by the router after the policy: the rate the cloud accepts (its Retry-After, or
    the agent's own cloud_requests_per_s) would not let the call start before the deadline."""
    CLOUD_FAILED = "cloud_failed"
    """queue, set by the router after the policy: the cloud call failed within the deadline, so the
    local answer was returned, provisional, and the request queued."""
    QUEUE_FULL = "queue_full"
    """edge, set by the router after the policy: the queue refused the request at its disk cap, so the
    local answer is returned without a ticket (or the agent answers RESOURCE_EXHAUSTED)."""


class Escalation(StrEnum):
    """The caller's wish about escalation (request parameter `escalation`)."""

    AUTO = "auto"
    NEVER = "never"
    ALWAYS = "always"


class LinkState(StrEnum):
    UP = "up"
    DEGRADED = "degraded"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Decision:
    route: Route
    reason: Reason

    @property
    def provisional(self) -> bool:
        """A queued request's local answer may be superseded by the cloud's answer later."""
        return self.route is Route.QUEUE


@dataclass(frozen=True, slots=True)
class LinkView:
    """What the policy needs to know of the link, as the connectivity monitor sees it now.

    `expected_latency_s` is a high percentile (p90) of recent cloud call durations and
    `goodput_bytes_per_s` the recent payload rate; None means not measured yet.
    """

    state: LinkState
    breaker_open: bool = False
    expected_latency_s: float | None = None
    goodput_bytes_per_s: float | None = None


@dataclass(frozen=True, slots=True)
class PriorityScale:
    """How many priority levels there are and which one a request gets when it names none.

    As Triton numbers them (`priority_levels`, `default_priority_level` of its model config):
    1 is the most urgent, `levels` the least, and 0 stands for `default`, so a client that sends
    nothing (tritonclient omits `priority=0`) and one that sends 0 get the same level.
    """

    levels: int = PRIORITY_LEVELS
    default: int = DEFAULT_PRIORITY

    def __post_init__(self) -> None:
        if not _is_int(self.levels) or not 1 <= self.levels <= MAX_PRIORITY_LEVELS:
            raise ValueError(
                f"priority_levels: must be an integer 1..{MAX_PRIORITY_LEVELS}, got {self.levels!r}"
            )
        if not _is_int(self.default) or not 1 <= self.default <= self.levels:
            raise ValueError(
                f"default_priority: must be an integer 1..{self.levels} (priority_levels), "
                f"got {self.default!r}"
            )

    @property
    def lowest(self) -> int:
        """The least urgent level (audits wait there)."""
        return self.levels

    def resolve(self, value: int) -> int:
        """The level of a request that sent `value`; ValueError outside 0..levels."""
        if not _is_int(value) or not 0 <= value <= self.levels:
            raise ValueError(f"must be an integer {self.describe()}, got {value!r}")
        return value or self.default

    def describe(self) -> str:
        return (
            f"0..{self.levels} (1 most urgent, {self.levels} least; 0 or none: the default, "
            f"{self.default})"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class CallerWishes:
    """What the caller asked for in the request parameters; defaults when a parameter is absent."""

    escalation: Escalation = Escalation.AUTO
    priority: int = DEFAULT_PRIORITY
    ttl_seconds: float = DEFAULT_TTL_SECONDS

    @classmethod
    def from_parameters(
        cls,
        parameters: Mapping[str, object],
        *,
        default_ttl_seconds: float = DEFAULT_TTL_SECONDS,
        max_ttl_seconds: float = MAX_TTL_SECONDS,
        priorities: PriorityScale | None = None,
    ) -> CallerWishes:
        """Read `escalation`, `priority` and `ttl_seconds` from plain request parameter values.

        Other parameters are ignored (they belong to the protocol or the model). Values may be
        given as strings too, since some clients can only send string parameters. `priority`
        follows `priorities` (default: PriorityScale(); 0 or absent: its default level). Raises InvalidInput naming the
        parameter, e.g. `parameters.priority: must be an integer 0..10 (...), got 11`.
        """
        escalation = Escalation.AUTO
        if "escalation" in parameters:
            value = parameters["escalation"]
            try:
                escalation = Escalation(value.strip().lower() if isinstance(value, str) else "")
            except ValueError:
                allowed = ", ".join(e.value for e in Escalation)
                raise InvalidInput(
                    "parameters.escalation", f"must be one of {allowed}, got {value!r}", "parameter"
                ) from None
        priorities = priorities or PriorityScale()
        priority = priorities.default
        if "priority" in parameters:
            value = parameters["priority"]
            parsed = _as_int(value)
            try:
                priority = priorities.resolve(parsed if parsed is not None else -1)
            except ValueError:
                raise InvalidInput(
                    "parameters.priority",
                    f"must be an integer {priorities.describe()}, got {value!r}",
                    "parameter",
                ) from None
        ttl = default_ttl_seconds
        if "ttl_seconds" in parameters:
            value = parameters["ttl_seconds"]
            parsed_ttl = _as_float(value)
            if parsed_ttl is None or not 0 < parsed_ttl <= max_ttl_seconds:
                raise InvalidInput(
                    "parameters.ttl_seconds",
                    f"must be a number of seconds above 0 and at most {max_ttl_seconds:g}, "
                    f"got {value!r}",
                    "parameter",
                )
            ttl = parsed_ttl
        return cls(escalation=escalation, priority=priority, ttl_seconds=ttl)


def _as_int(value: object) -> int | None:
    # bool is an int subclass; `priority=true` is a mistake, not priority 1.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _as_float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return result if math.isfinite(result) else None
