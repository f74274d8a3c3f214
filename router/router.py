"""Router: the composition root of the router library. It opens and closes the parts, answers
for tickets and status, and hands each request to router.routing (RequestRouter).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from model_runtime.fault_points import FaultPlan
from router.audit import Auditor, AuditSampler
from router.batch_answer import Array, RoutedAnswer, RoutedItem, count_model_routes
from router.budget import DataBudget, ProbeBudget
from router.clock import Clock, SystemClock
from router.cloud_client import CloudClient
from router.cloud_links import open_cloud
from router.config import RouterConfig
from router.connectivity import ConnectivityMonitor
from router.decision import CallerWishes, LinkState
from router.durable_queue import DurableQueue, ItemStatus, QueueStats
from router.forwarder import Forwarder
from router.hard_examples import HardExampleStore, discard_hard_examples
from router.housekeeping import housekeep
from router.local_model import LocalAnswer
from router.metrics import CloudMeter, RouterMetrics, StateReadings
from router.policy import EscalationPolicy
from router.routing import RequestRouter
from router.sqlite_files import WriteHooks
from router.state_lock import StateDirLock
from router.tickets import TicketResult, TicketStore, WatchStream

__all__ = ["RoutedAnswer", "RoutedItem", "Router", "RouterStatus", "TicketResult"]

log = logging.getLogger(__name__)


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
        self._routing: RequestRouter

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
        self._routing = RequestRouter(
            config, clock, self.policy, self.metrics, self.meter, self.tickets, self.budget,
            monitor=self.monitor, live=self._live,
            groups=self.forwarder.groups if self.forwarder is not None else None,
            hard_examples=self.hard_examples, faults=self.faults,
        )  # fmt: skip
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
        answer = await self._routing.route(
            model, inputs, local, wishes, time_left_s, request_id, owner
        )
        count_model_routes(self.metrics, model, answer.items)
        if self.audit is not None:
            reasons = [i.reason for i in answer.items]
            self.audit.consider(model, local.cloud_model, inputs, local.outputs, reasons)
        return answer

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


def _log_crash(task: asyncio.Task[None], name: str) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("router %s task stopped: %r", name, task.exception())
