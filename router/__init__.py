"""The router library: decide per item between edge, cloud and queue; deliver the queue later.

`Router` (router.router) wires the parts; the edge agent hands it each locally answered request.
"""

from router.audit import Auditor, AuditSampler
from router.breaker import BreakerState, CircuitBreaker
from router.budget import BudgetPeriod, DataBudget, PeriodUsage, ProbeBudget
from router.clock import Clock, FakeClock, SystemClock
from router.cloud_client import ATTEMPT_OUTCOMES, AttemptRecord, CloudAnswer, CloudClient
from router.config import RouterConfig
from router.connectivity import ConnectivityMonitor, LinkSnapshot, MonitorConfig
from router.decision import (
    DEFAULT_PRIORITY,
    DEFAULT_TTL_SECONDS,
    MAX_PRIORITY_LEVELS,
    MAX_TTL_SECONDS,
    PRIORITY_LEVELS,
    CallerWishes,
    Decision,
    Escalation,
    LinkState,
    LinkView,
    PriorityScale,
    Reason,
    Route,
)
from router.durable_queue import (
    DurableQueue,
    FullPolicy,
    ItemState,
    ItemStatus,
    QueuedItem,
    QueueStats,
)
from router.errors import (
    BudgetExhausted,
    CircuitOpen,
    CloudError,
    CloudRejected,
    CloudUnavailable,
    QueueCorrupt,
    QueueFull,
    QueueSchemaTooNew,
    RateLimited,
    RouterError,
    TicketNotFound,
)
from router.forwarder import Forwarder
from router.hard_examples import (
    HardExamples,
    HardExamplesError,
    HardExampleStore,
    NoHardExamples,
    load_hard_examples,
)
from router.local_model import LocalAnswer
from router.metrics import RouterMetrics
from router.pacing import RequestPacer
from router.policy import BudgetMode, EscalationPolicy
from router.retrying import LinkBackoff, RetryPolicy
from router.router import RoutedAnswer, RoutedItem, Router, RouterStatus
from router.tickets import TICKET_STATES, TicketResult, TicketStore, WatchStream
from router.token_bucket import TokenBucket

__all__ = [
    "ATTEMPT_OUTCOMES",
    "DEFAULT_PRIORITY",
    "DEFAULT_TTL_SECONDS",
    "MAX_PRIORITY_LEVELS",
    "MAX_TTL_SECONDS",
    "PRIORITY_LEVELS",
    "TICKET_STATES",
    "AttemptRecord",
    "AuditSampler",
    "Auditor",
    "BreakerState",
    "BudgetExhausted",
    "BudgetMode",
    "BudgetPeriod",
    "CallerWishes",
    "CircuitBreaker",
    "CircuitOpen",
    "Clock",
    "CloudAnswer",
    "CloudClient",
    "CloudError",
    "CloudRejected",
    "CloudUnavailable",
    "ConnectivityMonitor",
    "DataBudget",
    "Decision",
    "DurableQueue",
    "Escalation",
    "EscalationPolicy",
    "FakeClock",
    "Forwarder",
    "FullPolicy",
    "HardExampleStore",
    "HardExamples",
    "HardExamplesError",
    "ItemState",
    "ItemStatus",
    "LinkBackoff",
    "LinkSnapshot",
    "LinkState",
    "LinkView",
    "LocalAnswer",
    "MonitorConfig",
    "NoHardExamples",
    "PeriodUsage",
    "PriorityScale",
    "ProbeBudget",
    "QueueCorrupt",
    "QueueFull",
    "QueueSchemaTooNew",
    "QueueStats",
    "QueuedItem",
    "RateLimited",
    "Reason",
    "RequestPacer",
    "RetryPolicy",
    "Route",
    "RoutedAnswer",
    "RoutedItem",
    "Router",
    "RouterConfig",
    "RouterError",
    "RouterMetrics",
    "RouterStatus",
    "SystemClock",
    "TicketNotFound",
    "TicketResult",
    "TicketStore",
    "TokenBucket",
    "WatchStream",
    "load_hard_examples",
]
