"""The path of one request's items: the policy decides each, confident ones are answered at
once, unsure ones go to the cloud live if the link can carry them, else to the durable queue.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from model_runtime.errors import InvalidInput
from model_runtime.fault_points import FaultPlan
from model_runtime.v2_json import InferResponse
from router.batch_answer import Array, RoutedAnswer, batch_answer, merge_rows
from router.budget import DataBudget
from router.clock import Clock
from router.cloud_client import CloudClient
from router.config import AFTER_COMMIT_BEFORE_ANSWER, RouterConfig
from router.connectivity import ConnectivityMonitor
from router.decision import CallerWishes, Decision, LinkState, LinkView, Reason, Route
from router.durable_queue import FullPolicy
from router.errors import BudgetExhausted, CloudError, RateLimited
from router.grouping import GroupPlanner
from router.hard_examples import HardExampleStore
from router.local_model import LocalAnswer
from router.metrics import CloudMeter, RouterMetrics
from router.policy import BudgetMode, EscalationPolicy
from router.tickets import Admission, TicketStore

__all__ = ["RequestRouter"]

log = logging.getLogger(__name__)

# Rules 1-3 of the policy (never, confident, no cloud) read neither the link, the payload nor
# the budget, so a first pass with these placeholders settles the edge items without encoding.
_ANY_LINK = LinkView(LinkState.UP)


@dataclass(frozen=True, slots=True)
class _Unsure:
    """An item the cloud may answer: its row, and its own one-row request under its ticket."""

    index: int
    item: Admission


class RequestRouter:
    """Routes each batch a local model has answered (`route`). Router makes it once its parts
    are open; without a cloud, `monitor`, `live` and `groups` (the forwarder's) are None."""

    def __init__(
        self,
        config: RouterConfig,
        clock: Clock,
        policy: EscalationPolicy,
        metrics: RouterMetrics,
        meter: CloudMeter,
        tickets: TicketStore,
        budget: DataBudget,
        *,
        monitor: ConnectivityMonitor | None,
        live: CloudClient | None,
        groups: GroupPlanner | None,
        hard_examples: HardExampleStore | None,
        faults: FaultPlan | None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._policy = policy
        self._metrics = metrics
        self._meter = meter
        self._tickets = tickets
        self._budget = budget
        self._monitor = monitor
        self._live = live
        self._groups = groups
        self._hard_examples = hard_examples
        self._faults = faults

    async def route(
        self,
        model: str,
        inputs: Mapping[str, Array],
        local: LocalAnswer,
        wishes: CallerWishes,
        time_left_s: float | None,
        request_id: str,
        owner: str,
    ) -> RoutedAnswer:
        """Each item of a batch routed, as Router.route says (which also counts and audits)."""
        confidence = np.asarray(local.confidence, dtype=np.float64).reshape(-1)
        scores = confidence.tolist()
        n = len(scores)
        for name, array in inputs.items():
            if array.shape[:1] != (n,):
                raise ValueError(f"inputs.{name}: has {array.shape[:1]} rows, expected {n}")
        cloud_model = local.cloud_model if self._config.cloud_configured else None
        decide = functools.partial(
            self._policy.decide, threshold=local.threshold, wishes=wishes,
            deadline_remaining_s=time_left_s, cloud_configured=cloud_model is not None,
        )  # fmt: skip
        decisions = [
            decide(confidence=c, link=_ANY_LINK, payload_bytes=0, budget_allows=True)
            for c in scores
        ]
        unsure = [_Unsure(i, Admission.for_row(inputs, i)) for i, d in enumerate(decisions) if d.route is not Route.EDGE]  # fmt: skip
        if not unsure:
            return batch_answer(self._metrics, local.outputs, decisions, scores, {})
        assert cloud_model is not None
        assert self._monitor is not None
        link = self._monitor.view()
        for u in unsure:
            size = len(u.item.body)
            decisions[u.index] = decide(
                confidence=scores[u.index], link=link, payload_bytes=size,
                budget_allows=self._budget.allows(size),
            )  # fmt: skip
        to_cloud = [u for u in unsure if decisions[u.index].route is Route.CLOUD]
        to_queue = [u for u in unsure if decisions[u.index].route is Route.QUEUE]
        if self._config.full_policy is FullPolicy.REFUSE:
            self._tickets.check_room([u.item for u in to_queue])  # before anything is sent
        call = None
        if to_cloud:
            call = asyncio.ensure_future(
                self._escalate(cloud_model, to_cloud, time_left_s, request_id)
            )
        try:
            tickets = await self._admit(cloud_model, to_queue, wishes, owner, all_or_nothing=True)
            self._keep_queued(model, cloud_model, to_queue, tickets)
        except BaseException:
            if call is not None:
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
            raise
        outputs, answered = local.outputs, set[int]()
        if call is not None:
            responses, why = await call
            for index, response in responses.items():
                merged = merge_rows(outputs, response, [index])
                if merged is not None:
                    outputs = merged
                    answered.add(index)
            if self._hard_examples is not None:
                kept = [(u.item.ticket, u.item.body, responses[u.index].outputs) for u in to_cloud if u.index in answered]  # fmt: skip
                self._hard_examples.keep_live(model, cloud_model, kept)
            failed = [u for u in to_cloud if u.index not in answered]
            for u in failed:
                decisions[u.index] = self._fallback(why.get(u.index, Reason.CLOUD_FAILED))
            failed = [u for u in failed if decisions[u.index].route is Route.QUEUE]
            if failed:
                tickets |= await self._admit(
                    cloud_model, failed, wishes, owner, all_or_nothing=False
                )
                self._keep_queued(model, cloud_model, failed, tickets)
        for u in unsure:
            if decisions[u.index].route is Route.QUEUE and u.index not in tickets:
                decisions[u.index] = Decision(Route.EDGE, Reason.QUEUE_FULL)
        return batch_answer(self._metrics, outputs, decisions, scores, tickets, answered)

    def _fallback(self, reason: Reason) -> Decision:
        """Where an item goes whose live call did not answer, for `reason`."""
        if reason is Reason.BUDGET_EXHAUSTED and self._config.budget_mode is BudgetMode.EDGE:
            return Decision(Route.EDGE, reason)
        return Decision(Route.QUEUE, reason)

    async def _escalate(
        self,
        cloud_model: str,
        items: Sequence[_Unsure],
        time_left_s: float | None,
        request_id: str,
    ) -> tuple[dict[int, InferResponse], dict[int, Reason]]:
        """Live calls for `items`, all at once: row index -> the cloud's answer, for those
        answered in time, and row index -> why not, for the others whose reason is not
        cloud_failed (budget_exhausted: their bytes did not fit the data budget; rate_limited:
        the rate the cloud accepts would have sent them after the deadline).

        Each item goes in its queued form, its ticket as the Idempotency-Key: if a call fails
        after the cloud ran it, the queued redelivery is answered from the cloud's idempotency
        store instead of running the model twice. One call per item costs a few hundred bytes
        of headers each, the price of that promise for batches.
        """
        assert self._live is not None
        live = self._live
        limit = self._config.live_timeout_s
        if time_left_s is not None:
            limit = min(limit, time_left_s - self._config.live_margin_s)
        deadline = self._clock.monotonic() + limit
        # Tensors as bytes once the forwarder has learnt that the cloud reads them.
        binary = self._groups is not None and self._groups.binary

        async def call(u: _Unsure) -> tuple[int, InferResponse | Reason]:
            try:
                with self._meter.call("live"):
                    answer = await live.infer(
                        cloud_model, u.item.body, idempotency_key=u.item.ticket,
                        deadline=deadline, binary=binary,
                    )  # fmt: skip
                return u.index, answer.response()
            except BudgetExhausted:
                return u.index, Reason.BUDGET_EXHAUSTED
            except (CloudError, InvalidInput) as error:
                log.debug(  # per call: DEBUG, as every per-call line
                    "live escalation failed; queued",
                    extra={
                        "fields": {
                            "request_id": request_id,
                            "ticket": u.item.ticket,
                            "error": str(error),
                        }
                    },
                )
                # Held back by the cloud's rate until past its deadline, or failed.
                limited = isinstance(error, RateLimited) or getattr(error, "status", None) == 429
                return u.index, Reason.RATE_LIMITED if limited else Reason.CLOUD_FAILED

        answers = await asyncio.gather(*(call(u) for u in items))
        return (
            {i: a for i, a in answers if isinstance(a, InferResponse)},
            {i: a for i, a in answers if isinstance(a, Reason)},
        )

    async def _admit(
        self,
        model: str,
        items: Sequence[_Unsure],
        wishes: CallerWishes,
        owner: str,
        *,
        all_or_nothing: bool,
    ) -> dict[int, str]:
        """Queue `items` durably; index -> ticket for those the queue took. Raises
        StorageError when the queue could not write them: none was stored."""
        stored = await self._tickets.admit(
            model,
            [u.item for u in items],
            priority=wishes.priority,
            ttl_s=min(wishes.ttl_seconds, self._config.max_ttl_s),
            all_or_nothing=all_or_nothing,
            owner=owner,
        )
        if self._faults is not None and any(stored.values()):
            self._faults.hit(AFTER_COMMIT_BEFORE_ANSWER)
        return {u.index: u.item.ticket for u in items if stored.get(u.item.ticket)}

    def _keep_queued(
        self, model: str, cloud_model: str, items: Sequence[_Unsure], tickets: Mapping[int, str]
    ) -> None:
        # Synchronous, right after the queue's commit: see HardExampleStore.keep_queued.
        if self._hard_examples is not None:
            kept = [(u.item.ticket, u.item.body) for u in items if u.index in tickets]
            self._hard_examples.keep_queued(model, cloud_model, kept)
