"""EscalationPolicy and CallerWishes: every rule and every reason, as rows of a table."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest

from model_runtime.errors import InvalidInput
from router.decision import (
    DEFAULT_PRIORITY,
    DEFAULT_TTL_SECONDS,
    MAX_TTL_SECONDS,
    CallerWishes,
    Decision,
    Escalation,
    LinkState,
    LinkView,
    PriorityScale,
    Reason,
    Route,
)
from router.policy import BudgetMode, EscalationPolicy

UP = LinkView(LinkState.UP, expected_latency_s=0.2, goodput_bytes_per_s=10_000.0)
AUTO = CallerWishes()
ALWAYS = CallerWishes(escalation=Escalation.ALWAYS)
NEVER = CallerWishes(escalation=Escalation.NEVER)

# Defaults of one call; each row overrides what it is about.
BASE: dict[str, Any] = {
    "confidence": 0.5,
    "threshold": 0.8,
    "wishes": AUTO,
    "deadline_remaining_s": 2.0,
    "link": UP,
    "payload_bytes": 1_000,
    "budget_allows": True,
    "cloud_configured": True,
}

CASES: list[tuple[str, dict[str, Any], Route, Reason]] = [
    ("confident", {"confidence": 0.9}, Route.EDGE, Reason.CONFIDENT),
    ("exactly at threshold is confident", {"confidence": 0.8}, Route.EDGE, Reason.CONFIDENT),
    ("never beats unsure", {"wishes": NEVER}, Route.EDGE, Reason.ESCALATION_NEVER),
    ("never beats confident", {"wishes": NEVER, "confidence": 0.99}, Route.EDGE, Reason.ESCALATION_NEVER),
    ("unsure, link up, fits", {}, Route.CLOUD, Reason.UNSURE),
    ("NaN confidence is unsure", {"confidence": math.nan}, Route.CLOUD, Reason.UNSURE),
    ("always escalates a confident item", {"wishes": ALWAYS, "confidence": 0.99}, Route.CLOUD, Reason.ESCALATION_ALWAYS),
    ("no cloud", {"cloud_configured": False}, Route.EDGE, Reason.NO_CLOUD_CONFIGURED),
    ("no cloud, always", {"cloud_configured": False, "wishes": ALWAYS}, Route.EDGE, Reason.NO_CLOUD_CONFIGURED),
    ("budget spent -> queue", {"budget_allows": False}, Route.QUEUE, Reason.BUDGET_EXHAUSTED),
    ("budget beats link down", {"budget_allows": False, "link": LinkView(LinkState.DOWN)}, Route.QUEUE, Reason.BUDGET_EXHAUSTED),
    ("link down", {"link": LinkView(LinkState.DOWN)}, Route.QUEUE, Reason.LINK_DOWN),
    ("link down, always", {"link": LinkView(LinkState.DOWN), "wishes": ALWAYS}, Route.QUEUE, Reason.LINK_DOWN),
    ("breaker open", {"link": replace(UP, breaker_open=True)}, Route.QUEUE, Reason.BREAKER_OPEN),
    ("degraded but fits", {"link": replace(UP, state=LinkState.DEGRADED)}, Route.CLOUD, Reason.UNSURE),
    # 0.2 s latency + 1000 B / 10 kB/s = 0.3 s, + 0.02 s margin
    ("deadline shorter than latency", {"deadline_remaining_s": 0.1}, Route.QUEUE, Reason.DEADLINE_TOO_SHORT),
    ("deadline just short of transfer", {"deadline_remaining_s": 0.31}, Route.QUEUE, Reason.DEADLINE_TOO_SHORT),
    ("deadline just long enough", {"deadline_remaining_s": 0.33}, Route.CLOUD, Reason.UNSURE),
    ("big payload on a slow link", {"payload_bytes": 100_000}, Route.QUEUE, Reason.DEADLINE_TOO_SHORT),
    ("no deadline: any latency", {"deadline_remaining_s": None, "payload_bytes": 10**9}, Route.CLOUD, Reason.UNSURE),
    ("deadline already passed", {"deadline_remaining_s": -1.0}, Route.QUEUE, Reason.DEADLINE_TOO_SHORT),
    ("unmeasured link counts as fast", {"link": LinkView(LinkState.UP), "deadline_remaining_s": 0.05}, Route.CLOUD, Reason.UNSURE),
    ("unmeasured link still needs the margin", {"link": LinkView(LinkState.UP), "deadline_remaining_s": 0.01}, Route.QUEUE, Reason.DEADLINE_TOO_SHORT),
    ("always, deadline too short", {"wishes": ALWAYS, "deadline_remaining_s": 0.1}, Route.QUEUE, Reason.DEADLINE_TOO_SHORT),
]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "route", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_decide(overrides: dict[str, Any], route: Route, reason: Reason) -> None:
    decision = EscalationPolicy().decide(**(BASE | overrides))
    assert decision == Decision(route, reason)
    assert decision.provisional is (route is Route.QUEUE)


def test_edge_budget_mode_answers_locally() -> None:
    policy = EscalationPolicy(budget_mode=BudgetMode.EDGE)
    assert policy.decide(**(BASE | {"budget_allows": False})) == Decision(
        Route.EDGE, Reason.BUDGET_EXHAUSTED
    )


def test_every_reason_the_policy_gives_is_covered() -> None:
    # cloud_failed, rate_limited and queue_full are set by the router after the policy.
    covered = {c[3] for c in CASES}
    assert covered == set(Reason) - {Reason.CLOUD_FAILED, Reason.RATE_LIMITED, Reason.QUEUE_FULL}


def test_margin_is_validated() -> None:
    with pytest.raises(ValueError, match="margin_s"):
        EscalationPolicy(margin_s=-1)


# -- CallerWishes ---------------------------------------------------------------------------


def test_wishes_defaults_and_unrelated_parameters_ignored() -> None:
    wishes = CallerWishes.from_parameters({"binary_data_output": True, "sequence_id": 3})
    assert wishes == CallerWishes(Escalation.AUTO, DEFAULT_PRIORITY, DEFAULT_TTL_SECONDS)


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"escalation": "never"}, CallerWishes(escalation=Escalation.NEVER)),
        ({"escalation": " ALWAYS "}, CallerWishes(escalation=Escalation.ALWAYS)),
        ({"priority": 1}, CallerWishes(priority=1)),
        ({"priority": 10}, CallerWishes(priority=10)),
        ({"priority": 0}, CallerWishes(priority=DEFAULT_PRIORITY)),  # Triton: 0 is the default
        ({"priority": "0"}, CallerWishes(priority=DEFAULT_PRIORITY)),
        ({"priority": 3.0}, CallerWishes(priority=3)),
        ({"ttl_seconds": 60}, CallerWishes(ttl_seconds=60.0)),
        ({"ttl_seconds": "0.5"}, CallerWishes(ttl_seconds=0.5)),
        ({"ttl_seconds": MAX_TTL_SECONDS}, CallerWishes(ttl_seconds=MAX_TTL_SECONDS)),
    ],
)
def test_wishes_parsed(parameters: dict[str, object], expected: CallerWishes) -> None:
    assert CallerWishes.from_parameters(parameters) == expected


@pytest.mark.parametrize(
    ("parameters", "field", "message"),
    [
        (
            {"escalation": "sometimes"},
            "parameters.escalation",
            "must be one of auto, never, always",
        ),
        ({"escalation": 1}, "parameters.escalation", "must be one of"),
        ({"priority": 11}, "parameters.priority", r"must be an integer 0..10 \(1 most urgent"),
        ({"priority": -1}, "parameters.priority", "0..10"),
        ({"priority": True}, "parameters.priority", "0..10"),
        ({"priority": 2.5}, "parameters.priority", "0..10"),
        ({"priority": "high"}, "parameters.priority", "0..10"),
        ({"ttl_seconds": 0}, "parameters.ttl_seconds", "above 0"),
        ({"ttl_seconds": -5}, "parameters.ttl_seconds", "above 0"),
        ({"ttl_seconds": math.inf}, "parameters.ttl_seconds", "above 0"),
        ({"ttl_seconds": math.nan}, "parameters.ttl_seconds", "above 0"),
        ({"ttl_seconds": MAX_TTL_SECONDS + 1}, "parameters.ttl_seconds", "at most 604800"),
        ({"ttl_seconds": "soon"}, "parameters.ttl_seconds", "above 0"),
    ],
)
def test_bad_wishes_name_the_parameter(
    parameters: dict[str, object], field: str, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        CallerWishes.from_parameters(parameters)
    assert caught.value.field == field
    assert str(caught.value).startswith(field + ":")


def test_ttl_limits_are_configurable() -> None:
    wishes = CallerWishes.from_parameters({}, default_ttl_seconds=30, max_ttl_seconds=60)
    assert wishes.ttl_seconds == 30
    with pytest.raises(InvalidInput, match="at most 60"):
        CallerWishes.from_parameters({"ttl_seconds": 61}, max_ttl_seconds=60)


def test_priority_levels_are_configurable_as_in_triton() -> None:
    three = PriorityScale(levels=3, default=2)
    assert [three.resolve(p) for p in (0, 1, 2, 3)] == [2, 1, 2, 3]
    assert CallerWishes.from_parameters({}, priorities=three).priority == 2
    assert CallerWishes.from_parameters({"priority": 0}, priorities=three).priority == 2
    assert CallerWishes.from_parameters({"priority": 3}, priorities=three).priority == 3
    with pytest.raises(InvalidInput, match=r"must be an integer 0..3 \(1 most urgent, 3 least; 0"):
        CallerWishes.from_parameters({"priority": 4}, priorities=three)


@pytest.mark.parametrize(
    ("levels", "default", "message"),
    [
        (0, 1, "priority_levels: must be an integer 1..32"),
        (33, 1, "priority_levels"),
        (3, 4, r"default_priority: must be an integer 1..3 \(priority_levels\)"),
        (3, 0, "default_priority"),
    ],
)
def test_bad_priority_scales_name_the_setting(levels: int, default: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PriorityScale(levels, default)
