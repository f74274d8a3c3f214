"""EscalationPolicy: the pure choice between answering at the edge, calling the cloud, or queueing.

No I/O and no clock: everything it needs is an argument, so every rule is a row in a unit test.

The rules, checked in this order; the first that applies gives the decision:

1. escalation `never`                                  -> edge,  escalation_never
2. escalation `auto` and confidence >= threshold       -> edge,  confident
3. no cloud configured (no URL, or no cloud model)     -> edge,  no_cloud_configured
4. the data budget does not allow the payload          -> queue or edge (per `budget_mode`),
                                                          budget_exhausted
5. link state `down`                                   -> queue, link_down
6. circuit breaker open                                -> queue, breaker_open
7. a deadline is set and expected latency + payload / goodput + margin exceeds what remains
                                                       -> queue, deadline_too_short
8. otherwise                                           -> cloud, unsure (auto) or
                                                          escalation_always (always)

A `degraded` link is allowed to carry live escalations: its higher latency shows in the expected
latency, and rule 7 decides. An unmeasured latency or goodput counts as zero (optimistic): the
cloud client still stops at the caller's deadline and falls back to the local answer. A missing
deadline never rules the cloud out. A NaN confidence is never confident.
"""

from __future__ import annotations

import functools
import math
from enum import StrEnum

from router.decision import CallerWishes, Decision, Escalation, LinkState, LinkView, Reason, Route

__all__ = ["BudgetMode", "EscalationPolicy"]


class BudgetMode(StrEnum):
    """What to do with an unsure request once the data budget is spent."""

    QUEUE = "queue"  # keep it on disk until the next period's budget
    EDGE = "edge"  # answer locally and forget it


class EscalationPolicy:
    """Decides per item; construct once with the agent's settings, call `decide` per item."""

    def __init__(self, *, margin_s: float = 0.02, budget_mode: BudgetMode = BudgetMode.QUEUE):
        """`margin_s` is kept free of the deadline for encoding the answer and the local fallback."""
        if not (math.isfinite(margin_s) and margin_s >= 0):
            raise ValueError(f"margin_s: must be a finite number >= 0, got {margin_s!r}")
        self.margin_s = margin_s
        self.budget_mode = BudgetMode(budget_mode)

    def decide(
        self,
        *,
        confidence: float,
        threshold: float,
        wishes: CallerWishes,
        deadline_remaining_s: float | None,
        link: LinkView,
        payload_bytes: int,
        budget_allows: bool,
        cloud_configured: bool,
    ) -> Decision:
        if wishes.escalation is Escalation.NEVER:
            return _decision(Route.EDGE, Reason.ESCALATION_NEVER)
        if wishes.escalation is Escalation.AUTO and confidence >= threshold:
            return _decision(Route.EDGE, Reason.CONFIDENT)
        if not cloud_configured:
            return _decision(Route.EDGE, Reason.NO_CLOUD_CONFIGURED)
        if not budget_allows:
            route = Route.QUEUE if self.budget_mode is BudgetMode.QUEUE else Route.EDGE
            return _decision(route, Reason.BUDGET_EXHAUSTED)
        if link.state is LinkState.DOWN:
            return _decision(Route.QUEUE, Reason.LINK_DOWN)
        if link.breaker_open:
            return _decision(Route.QUEUE, Reason.BREAKER_OPEN)
        if deadline_remaining_s is not None and (
            self.expected_seconds(link, payload_bytes) > deadline_remaining_s
        ):
            return _decision(Route.QUEUE, Reason.DEADLINE_TOO_SHORT)
        if wishes.escalation is Escalation.ALWAYS:
            return _decision(Route.CLOUD, Reason.ESCALATION_ALWAYS)
        return _decision(Route.CLOUD, Reason.UNSURE)

    def expected_seconds(self, link: LinkView, payload_bytes: int) -> float:
        """How long a cloud call of this size is expected to take, margin included."""
        latency = link.expected_latency_s or 0.0
        goodput = link.goodput_bytes_per_s
        transfer = payload_bytes / goodput if goodput else 0.0
        return latency + transfer + self.margin_s


@functools.cache
def _decision(route: Route, reason: Reason) -> Decision:
    # One immutable Decision per outcome, made once: decide runs for every item answered.
    return Decision(route, reason)
