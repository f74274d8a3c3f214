"""Router: the composition root of the router library, and the path of one request through it.

`route` decides per item (EscalationPolicy), answers confident items at once, sends the unsure
ones the link can carry to the cloud (a call each, at once), and commits the others to the durable queue
before returning; the Forwarder delivers them later and watchers hear of it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry

from model_runtime.errors import InvalidInput
from model_runtime.fault_points import FaultPlan
from model_runtime.v2_json import InferResponse
from router.audit import Auditor, AuditSampler
from router.budget import DataBudget, ProbeBudget
from router.clock import Clock, SystemClock
from router.cloud_client import CloudClient
from router.cloud_links import open_cloud
from router.config import AFTER_COMMIT_BEFORE_ANSWER, RouterConfig
from router.connectivity import ConnectivityMonitor
from router.decision import CallerWishes, Decision, LinkState, LinkView, Reason, Route
from router.durable_queue import DurableQueue, FullPolicy, ItemStatus, QueueStats
from router.errors import BudgetExhausted, CloudError, RateLimited
from router.forwarder import Forwarder
from router.hard_examples import HardExampleStore, discard_hard_examples
from router.housekeeping import housekeep
from router.local_model import LocalAnswer
from router.metrics import CloudMeter, RouterMetrics, StateReadings
from router.policy import BudgetMode, EscalationPolicy
from router.sqlite_files import WriteHooks
from router.state_lock import StateDirLock
from router.tickets import Admission, TicketResult, TicketStore, WatchStream

__all__ = ["RoutedAnswer", "RoutedItem", "Router", "RouterStatus", "TicketResult"]

log = logging.getLogger(__name__)

Array = npt.NDArray[np.generic]
# Rules 1-3 of the policy (never, confident, no cloud) read neither the link, the payload nor
# the budget, so a first pass with these placeholders settles the edge items without encoding.
_ANY_LINK = LinkView(LinkState.UP)


@dataclass(frozen=True, slots=True)
class RoutedItem:
    route: Route
    reason: Reason
    confidence: float
    ticket: str | None
    provisional: bool
    answered_by: str
    """"edge" or "cloud": whose row is in the outputs."""


@dataclass(frozen=True, slots=True)
class RoutedAnswer:
    outputs: dict[str, Array]
    """The local outputs, with the rows of cloud-answered items replaced by the cloud's rows."""
    items: tuple[RoutedItem, ...]
    """One per item (row) of the batch, in order."""


@dataclass(frozen=True, slots=True)
class RouterStatus:
    cloud_configured: bool
    link_state: str
    """up, degraded or down (down when no cloud is configured)."""
    rtt_s: float | None
    breaker_open: bool
    depth_by_priority: dict[int, int]
    oldest_age_s: float | None
    queue_bytes: int
    budget: dict[str, tuple[int | None, int, int | None]]
    """Period (day, month) -> (limit, used, left); None limit and left: unlimited."""
    queue_cap_bytes: int | None = None
    in_flight: int = 0
    ended: dict[str, int] = field(default_factory=dict)
    """Items ended since the queue file was made, by end state."""


@dataclass(frozen=True, slots=True)
class _Unsure:
    """An item the cloud may answer: its row, and its own one-row request under its ticket."""

    index: int
    item: Admission


class Router:
    """Open with `await Router.open(config, registry)`, close with `await router.close()`."""

    def __init__(
        self,
        config: RouterConfig,
        registry: CollectorRegistry,
        clock: Clock,
        faults: FaultPlan | None = None,
    ) -> None:
        """Use `open`."""
        self.config = config
        self.clock = clock
        self.faults = faults
        self.policy = EscalationPolicy(
            margin_s=config.policy_margin_s, budget_mode=config.budget_mode
        )
        self.metrics = RouterMetrics(registry, lambda: self._readings, clock.wall)
        self._hooks = WriteHooks(on_error=self.metrics.storage_error, faults=faults)
        self.meter = CloudMeter(self.metrics)
        self.tickets = TicketStore(
            on_admitted=self._admitted,
            on_refused=self._refused,
            max_watchers=config.max_watchers,
            on_watcher_refused=self.metrics.watchers_refused.inc,
        )
        self.metrics.watchers.set_function(lambda: self.tickets.watchers)
        self._readings = StateReadings(cloud_configured=config.cloud_configured)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._lock: StateDirLock | None = None
        self.queue: DurableQueue
        self.budget: DataBudget
        self.monitor: ConnectivityMonitor | None = None
        self.forwarder: Forwarder | None = None
        self._live: CloudClient | None = None
        self._drain: CloudClient | None = None
        self.audit: Auditor | None = None
        self.hard_examples: HardExampleStore | None = None

    @classmethod
    async def open(
        cls,
        config: RouterConfig,
        registry: CollectorRegistry,
        *,
        clock: Clock | None = None,
        faults: FaultPlan | None = None,
    ) -> Router:
        """`faults`: tests only (model_runtime.fault_points; the points are FAULT_POINTS).
        Raises StorageError when a state file cannot be opened or written."""
        router = cls(config, registry, clock or SystemClock(), faults)
        try:
            await router._start()
        except BaseException:
            await router.close()
            raise
        return router

    async def _start(self) -> None:
        config, clock = self.config, self.clock
        # First: a second process on these files would keep its own mirror of the queue's
        # bytes and counts, and drain the same items (StateDirInUse).
        self._lock = StateDirLock.acquire(config.state_dir)
        self.queue = await DurableQueue.open(
            config.queue_path,
            clock=clock,
            cap_bytes=config.queue_cap_bytes,
            full_policy=config.full_policy,
            ageing_s=config.queue_ageing_s,
            lease_s=config.queue_lease_s,
            priority_levels=config.priority_levels,
            on_end=self._on_end,
            keyring=config.keyring,
            hooks=self._hooks,
        )
        self.tickets.attach(self.queue)
        self.metrics.quarantine("queue", self.queue.quarantined, self.queue.quarantine_problem)
        self.budget = await DataBudget.open(
            config.budget_path,
            daily_bytes=config.budget_day_bytes,
            monthly_bytes=config.budget_month_bytes,
            clock=clock,
            hooks=self._hooks,
        )
        self.metrics.quarantine("budget", self.budget.quarantined, "")
        if config.cloud_configured:
            self.meter.probes = ProbeBudget(
                self.budget,
                share=config.probe_budget_share,
                interval_s=config.monitor.probe_interval_s,
                clock=clock,
            )
            self._live, self._drain, self.monitor = open_cloud(
                config, clock, self.meter, self.budget, self.meter.probes
            )
            self.monitor.add_listener(lambda _: self._refresh_link())
            self.forwarder = Forwarder(
                self.queue, self._drain, self.monitor, self.budget, self.meter, self.metrics,
                config, clock, faults=self.faults,
            )  # fmt: skip
            self._spawn(self.monitor.run(), "monitor")
            self._spawn(self.forwarder.run(), "forwarder")
        await self._open_quality()
        await self._refresh()
        self._spawn(
            housekeep(self.queue, self.budget, config, clock, self._refresh), "housekeeping"
        )

    async def close(self) -> None:
        """Stop the tasks and watchers, close the cloud clients, the queue and the budget, then
        let go of the state dir (StateDirLock)."""
        if self._closed:
            return
        self._closed = True
        self.tickets.close()
        if self.monitor is not None:
            self.monitor.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for store in (self.audit, self.hard_examples):
            if store is not None:
                await store.aclose()
        for client in (self._live, self._drain):
            if client is not None:
                await client.aclose()
        for part in ("queue", "budget"):
            if hasattr(self, part):
                await getattr(self, part).close()
        self.metrics.close()
        if self._lock is not None:
            self._lock.release()  # last: the files are closed, the next process may have them

    async def _open_quality(self) -> None:
        """Audit sampling (router.audit), also to settle audits left from before it was turned
        off; hard examples (router.hard_examples), deleted when they are off."""
        config = self.config
        if config.cloud_configured and (config.audit_share > 0 or config.audit_path.exists()):
            self.audit = await Auditor.open(
                config.audit_path, self.queue, self.budget, self.metrics.registry,
                sampler=AuditSampler(config.audit_share), max_waiting=config.audit_max_waiting,
                ttl_s=config.default_ttl_s, clock=self.clock, on_queued=self._admitted,
                hooks=self._hooks,
            )  # fmt: skip
            self._spawn(self.audit.settle_left_over(), "audit")
        if config.hard_examples_retention_s > 0:
            self.hard_examples = await HardExampleStore.open(
                config.hard_examples_path, self.metrics.registry,
                retention_s=config.hard_examples_retention_s,
                cap_bytes=config.hard_examples_cap_bytes, clock=self.clock,
                keyring=config.keyring, hooks=self._hooks,
            )  # fmt: skip
            self._spawn(self.hard_examples.run(config.purge_interval_s), "hard examples")
        elif discard_hard_examples(config.hard_examples_path):
            log.warning(
                "hard examples are off: deleted %s and the examples it kept",
                config.hard_examples_path,
            )

    @property
    def cloud_configured(self) -> bool:
        return self.config.cloud_configured

    # -- one request ----------------------------------------------------------------------------

    async def route(
        self,
        *,
        model: str,
        inputs: Mapping[str, Array],
        local: LocalAnswer,
        wishes: CallerWishes,
        time_left_s: float | None,
        request_id: str,
        owner: str = "",
    ) -> RoutedAnswer:
        """Route each item (row) of a batch the local model has answered. Items queued belong
        to `owner`: only they see the results (TicketStore).

        Confident items never wait: a request with no unsure item returns without awaiting
        anything. Items the policy queues are admitted all or nothing: under the refuse policy
        QueueFull is raised, before anything is sent or stored, unless they all fit (see
        TicketStore.check_room); under drop_oldest_lowest an item the queue cannot make room
        for is answered at the edge with reason queue_full. The same goes for items whose live
        call failed (reason cloud_failed), whatever the policy: their request has been sent by
        then, so failing it would throw away the local answer for nothing.

        Afterwards, without waiting, a share of the confident items may be drawn for an audit
        (router.audit).
        """
        answer = await self._route(model, inputs, local, wishes, time_left_s, request_id, owner)
        if len(answer.items) == 1:  # most requests: no tally to make
            self.metrics.model_route(model, answer.items[0].route, 1)
        else:
            routes: dict[Route, int] = {}
            for item in answer.items:
                routes[item.route] = routes.get(item.route, 0) + 1
            for route, n in routes.items():
                self.metrics.model_route(model, route, n)
        if self.audit is not None:
            reasons = [i.reason for i in answer.items]
            self.audit.consider(model, local.cloud_model, inputs, local.outputs, reasons)
        return answer

    async def _route(
        self,
        model: str,
        inputs: Mapping[str, Array],
        local: LocalAnswer,
        wishes: CallerWishes,
        time_left_s: float | None,
        request_id: str,
        owner: str,
    ) -> RoutedAnswer:
        confidence = np.asarray(local.confidence, dtype=np.float64).reshape(-1)
        scores = confidence.tolist()
        n = len(scores)
        for name, array in inputs.items():
            if array.shape[:1] != (n,):
                raise ValueError(f"inputs.{name}: has {array.shape[:1]} rows, expected {n}")
        cloud_model = local.cloud_model if self.cloud_configured else None
        decide = functools.partial(
            self.policy.decide, threshold=local.threshold, wishes=wishes,
            deadline_remaining_s=time_left_s, cloud_configured=cloud_model is not None,
        )  # fmt: skip
        decisions = [
            decide(confidence=c, link=_ANY_LINK, payload_bytes=0, budget_allows=True)
            for c in scores
        ]
        unsure = [_Unsure(i, Admission.for_row(inputs, i)) for i, d in enumerate(decisions) if d.route is not Route.EDGE]  # fmt: skip
        if not unsure:
            return self._answer(local.outputs, decisions, scores, {})
        assert cloud_model is not None
        assert self.monitor is not None
        link = self.monitor.view()
        for u in unsure:
            size = len(u.item.body)
            decisions[u.index] = decide(
                confidence=scores[u.index], link=link, payload_bytes=size,
                budget_allows=self.budget.allows(size),
            )  # fmt: skip
        to_cloud = [u for u in unsure if decisions[u.index].route is Route.CLOUD]
        to_queue = [u for u in unsure if decisions[u.index].route is Route.QUEUE]
        if self.config.full_policy is FullPolicy.REFUSE:
            self.tickets.check_room([u.item for u in to_queue])  # before anything is sent
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
                merged = _merge(outputs, response, [index])
                if merged is not None:
                    outputs = merged
                    answered.add(index)
            if self.hard_examples is not None:
                kept = [(u.item.ticket, u.item.body, responses[u.index].outputs) for u in to_cloud if u.index in answered]  # fmt: skip
                self.hard_examples.keep_live(model, cloud_model, kept)
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
        return self._answer(outputs, decisions, scores, tickets, answered)

    def _fallback(self, reason: Reason) -> Decision:
        """Where an item goes whose live call did not answer, for `reason`."""
        if reason is Reason.BUDGET_EXHAUSTED and self.config.budget_mode is BudgetMode.EDGE:
            return Decision(Route.EDGE, reason)
        return Decision(Route.QUEUE, reason)

    def _answer(
        self,
        outputs: dict[str, Array],
        decisions: Sequence[Decision],
        confidence: Sequence[float],
        tickets: Mapping[int, str],
        answered: Collection[int] = (),
    ) -> RoutedAnswer:
        if len(decisions) == 1 and not tickets and not answered:
            # The most common answer, one item answered here, counted without a dict keyed by
            # Decision (whose dataclass hash runs in Python, twice per item below).
            d = decisions[0]
            self.metrics.route(d.route, d.reason, 1)
            item = RoutedItem(d.route, d.reason, confidence[0], None, d.provisional, "edge")
            return RoutedAnswer(outputs, (item,))
        counts: dict[Decision, int] = {}
        items = []
        for i, d in enumerate(decisions):
            counts[d] = counts.get(d, 0) + 1
            by = "cloud" if i in answered else "edge"
            items.append(
                RoutedItem(d.route, d.reason, confidence[i], tickets.get(i), d.provisional, by)
            )
        for d, k in counts.items():
            self.metrics.route(d.route, d.reason, k)
        return RoutedAnswer(outputs, tuple(items))

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
        limit = self.config.live_timeout_s
        if time_left_s is not None:
            limit = min(limit, time_left_s - self.config.live_margin_s)
        deadline = self.clock.monotonic() + limit
        # Tensors as bytes once the forwarder has learnt that the cloud reads them.
        binary = self.forwarder is not None and self.forwarder.groups.binary

        async def call(u: _Unsure) -> tuple[int, InferResponse | Reason]:
            try:
                with self.meter.call("live"):
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
        stored = await self.tickets.admit(
            model,
            [u.item for u in items],
            priority=wishes.priority,
            ttl_s=min(wishes.ttl_seconds, self.config.max_ttl_s),
            all_or_nothing=all_or_nothing,
            owner=owner,
        )
        if self.faults is not None and any(stored.values()):
            self.faults.hit(AFTER_COMMIT_BEFORE_ANSWER)
        return {u.index: u.item.ticket for u in items if stored.get(u.item.ticket)}

    def _keep_queued(
        self, model: str, cloud_model: str, items: Sequence[_Unsure], tickets: Mapping[int, str]
    ) -> None:
        # Synchronous, right after the queue's commit: see HardExampleStore.keep_queued.
        if self.hard_examples is not None:
            kept = [(u.item.ticket, u.item.body) for u in items if u.index in tickets]
            self.hard_examples.keep_queued(model, cloud_model, kept)

    # -- tickets and status ---------------------------------------------------------------------

    async def result(self, ticket: str, *, owner: str = "") -> TicketResult:
        """A ticket's state and, once delivered, the cloud's answer; raises TicketNotFound
        (also for another owner's ticket) or InvalidInput."""
        return await self.tickets.result(ticket, owner=owner)

    def watch(
        self, after_cursor: int, tickets: Collection[str] = (), *, owner: str = ""
    ) -> WatchStream:
        """Every result of `owner` that ended after the cursor, in order, then each as it ends;
        ends only when the router closes. Raises InvalidInput or TooManyWatchers at once."""
        return self.tickets.watch(after_cursor, tickets, owner=owner)

    async def status(self) -> RouterStatus:
        stats = await self.queue.stats()
        self._set_readings(stats)
        snap = self.monitor.snapshot() if self.monitor is not None else None
        return RouterStatus(
            cloud_configured=self.cloud_configured,
            link_state=snap.state.value if snap is not None else LinkState.DOWN.value,
            rtt_s=snap.rtt_s if snap is not None else None,
            breaker_open=snap.breaker_open if snap is not None else False,
            depth_by_priority=dict(stats.depth_by_priority),
            oldest_age_s=stats.oldest_pending_age_s,
            queue_bytes=stats.used_bytes,
            budget={
                u.period.value: (u.limit_bytes, u.used_bytes, u.left_bytes)
                for u in self.budget.usage()
            },
            queue_cap_bytes=stats.cap_bytes,
            in_flight=stats.in_flight,
            ended=dict(stats.ended),
        )

    # -- plumbing -------------------------------------------------------------------------------

    def _on_end(self, ended: Sequence[ItemStatus]) -> None:
        for status in ended:
            self.metrics.ended.labels(status.state.value).inc()
        self.tickets.notify(ended)
        if self.audit is not None:
            self.audit.on_end(ended)
        if self.hard_examples is not None:
            self.hard_examples.on_end(ended)

    def _admitted(self, n: int) -> None:
        self.metrics.enqueued.inc(n)
        if self.forwarder is not None:
            self.forwarder.wake()
        if self.monitor is not None:
            self.monitor.set_waiting(True)

    def _refused(self, n: int) -> None:
        self.metrics.admission_rejected.inc(n)

    async def _refresh(self) -> None:
        self._set_readings(await self.queue.stats())

    def _set_readings(self, stats: QueueStats) -> None:
        if self.monitor is not None:
            self.monitor.set_waiting(any(stats.depth_by_priority.values()))
        snap = self.monitor.snapshot() if self.monitor is not None else None
        self._readings = StateReadings.of(self.cloud_configured, stats, snap, self.budget.usage())

    def _refresh_link(self) -> None:
        if self.monitor is not None:
            self._readings = self._readings.with_link(self.monitor.snapshot())

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(lambda t: _log_crash(t, name))
        self._tasks.append(task)


def _merge(
    local: Mapping[str, Array], response: InferResponse, rows: Sequence[int]
) -> dict[str, Array] | None:
    """The local outputs with `rows` replaced by the cloud's, for each output the cloud has
    with the same trailing shape (cast to the local dtype); None if none could be replaced."""
    merged = dict(local)
    replaced = 0
    for name, mine in local.items():
        theirs = response.outputs.get(name)
        if theirs is None or theirs.shape != (len(rows), *mine.shape[1:]):
            continue
        try:
            cast = theirs.astype(mine.dtype, copy=False)
        except (TypeError, ValueError):
            continue
        out = np.array(mine, copy=True)
        out[np.asarray(rows)] = cast
        merged[name] = out
        replaced += 1
    if not replaced:
        log.warning("the cloud's answer has none of the local outputs (%s)", ", ".join(local))
        return None
    return merged


def _log_crash(task: asyncio.Task[None], name: str) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("router %s task stopped: %r", name, task.exception())
