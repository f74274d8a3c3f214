"""Audit sampling: a small share of confident answers also goes to the cloud, in the background,
so that how often the edge model agrees with the cloud in the field is measured per model.

An audited item is an ordinary queue item at the lowest priority under a ticket starting with
`audit-` (kept out of WatchResults), so the Forwarder sends it when the link is up, within the
bandwidth cap and the data budget. What the edge answered is kept in a small SQLite file of its
own (`audit.sqlite` in the state dir), written before the item is queued, so the comparison
survives a restart. Audits never push a request out of the queue: one is queued only while the
queue stays under half its cap and fewer than `max_waiting` audits wait; otherwise it is skipped
and counted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter

from model_runtime.v2_json import encode_infer_request
from router.budget import DataBudget
from router.clock import Clock, SystemClock
from router.cloud_client import encode_body
from router.decision import Reason
from router.durable_queue import ROW_OVERHEAD_BYTES, DurableQueue, ItemState, ItemStatus
from router.errors import QueueFull, TicketNotFound
from router.queue_schema import END_STATES
from router.sqlite_files import Migration, SqliteWorker, WriteHooks, open_database
from router.tickets import AUDIT_PREFIX, decode_result, is_audit

__all__ = [
    "AUDIT_MIGRATIONS",
    "AUDIT_QUEUE_FILL",
    "AUDIT_RESULTS",
    "SAMPLE_OUTCOMES",
    "AuditSampler",
    "Auditor",
    "class_of",
    "scores_output",
]

log = logging.getLogger(__name__)

Array = npt.NDArray[np.generic]

AUDIT_QUEUE_FILL = 0.5
"""Audits are queued only while the queue, with them, stays within this share of its cap: the
other half is headroom that no race between the check and the commit can use up, so an audit
never makes the queue drop or refuse a request at the moment it is admitted."""
SAMPLE_OUTCOMES = ("queued", "queue_full", "backlog", "budget", "no_class", "error")
"""What became of a confident item drawn for an audit."""
AUDIT_RESULTS = ("agree", "disagree", "incomparable", "expired", "dropped", "rejected", "lost")
"""How an audit ended: the cloud's class equals the edge's or not; no class could be read from
one of the answers; the queue item ended unanswered; or the queue item vanished (a crash
between keeping the edge's answer and queueing the item, or purged before it was compared)."""

AUDIT_MIGRATIONS: tuple[Migration, ...] = (
    (
        """CREATE TABLE audits (
            ticket     TEXT PRIMARY KEY,
            model      TEXT NOT NULL,
            edge_class TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
    ),
)

_SCORE_NAMES = ("probabilities", "probs", "scores", "logits")
NS = "edge_agent_router"


def scores_output(outputs: Mapping[str, Array]) -> str | None:
    """The name of an answer's class scores: a float output of shape (N, K), K >= 2;
    `probabilities`, `probs`, `scores` or `logits` first, else the first by name."""
    scores = sorted(
        name
        for name, a in outputs.items()
        if a.dtype.kind == "f" and a.ndim == 2 and a.shape[1] >= 2
    )
    return next((n for n in _SCORE_NAMES if n in scores), scores[0] if scores else None)


def class_of(outputs: Mapping[str, Array], row: int = 0) -> int | str | None:
    """The class an answer gives item `row`: the index of its highest class score (see
    `scores_output`), else its `label` output (an int, or text); None if it has neither."""
    name = scores_output(outputs)
    if name is not None and outputs[name].shape[0] > row:
        return int(np.argmax(outputs[name][row]))
    label = outputs.get("label")
    if label is None or label.ndim < 1 or label.shape[0] <= row or label[row : row + 1].size != 1:
        return None
    value = label[row : row + 1].reshape(-1)[0]
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int | str) else str(value)


class AuditSampler:
    """Draws each confident item for an audit independently, with probability `share`."""

    def __init__(self, share: float, rng: random.Random | None = None) -> None:
        if not (isinstance(share, int | float) and 0.0 <= share <= 1.0):
            raise ValueError(f"share: must be a number in [0, 1], got {share!r}")
        self.share = float(share)
        self._rng = rng or random.Random()

    def pick(self, reasons: Sequence[Reason]) -> list[int]:
        """Indices of the items to audit, among those answered at the edge as `confident`
        (never an item the caller asked not to escalate, nor one already escalated)."""
        if self.share <= 0.0:
            return []
        return [
            i
            for i, reason in enumerate(reasons)
            if reason is Reason.CONFIDENT and (self.share >= 1.0 or self._rng.random() < self.share)
        ]


class Auditor:
    """Open with `await Auditor.open(...)`; `consider` after each answer, `on_end` from the
    queue's end callback, `settle_left_over` once as a task, `aclose` before the queue closes."""

    def __init__(
        self,
        path: Path,
        queue: DurableQueue,
        budget: DataBudget,
        registry: CollectorRegistry,
        *,
        sampler: AuditSampler,
        max_waiting: int = 100,
        ttl_s: float = 24 * 3600.0,
        clock: Clock | None = None,
        on_queued: Callable[[int], None] | None = None,
        hooks: WriteHooks | None = None,
    ) -> None:
        """Use `open`."""
        self.path = Path(path)
        self.sampler = sampler
        self.max_waiting = max_waiting
        self.ttl_s = ttl_s
        self.clock: Clock = clock or SystemClock()
        self.on_queued = on_queued
        self._queue = queue
        self._budget = budget
        self._worker = SqliteWorker(f"audit:{self.path.name}", store="audit", hooks=hooks)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._left_over: list[str] = []
        self.waiting = 0
        """Audits kept and not yet compared: queued, or being queued."""
        self.samples = Counter(
            f"{NS}_audit_samples",
            "Confident items drawn for an audit, by model and what became of them (queued, or "
            "skipped: queue_full, backlog, budget, no_class, error).",
            ["model", "outcome"],
            registry=registry,
        )
        self.results = Counter(
            f"{NS}_audits",
            "Audits that ended, by model and result: agree, disagree (the cloud's class vs the "
            "edge's), incomparable, expired, dropped, rejected, lost.",
            ["model", "result"],
            registry=registry,
        )

    @classmethod
    async def open(cls, *args: Any, **kwargs: Any) -> Auditor:
        """Construct (same arguments as the class) and open its file."""
        auditor = cls(*args, **kwargs)
        opened = await auditor._worker.start(
            lambda: open_database(auditor.path, AUDIT_MIGRATIONS, now=auditor.clock.wall)
        )
        if opened.quarantined is not None:
            log.error("audit file was corrupt; moved aside to %s", opened.quarantined)
        auditor._left_over = await auditor._worker.call(
            lambda conn: [r[0] for r in conn.execute("SELECT ticket FROM audits")]
        )
        auditor.waiting = len(auditor._left_over)
        return auditor

    async def drain(self) -> None:
        """Wait for the audits being queued or compared now (and any they lead to)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        """Finish the audits being queued or compared, then close the file."""
        self._closed = True
        await self.drain()
        await self._worker.close()

    # -- sampling, after the answer ---------------------------------------------------------

    def consider(
        self,
        model: str,
        cloud_model: str | None,
        inputs: Mapping[str, Array],
        outputs: Mapping[str, Array],
        reasons: Sequence[Reason],
    ) -> None:
        """Draw confident items for an audit; queue the drawn ones in the background. Returns
        at once: the caller's answer never waits for an audit."""
        if cloud_model is None or self._closed:
            return
        for i in self.sampler.pick(reasons):
            # Copies: the task runs after the answer is sent, the caller's buffers may be gone.
            row = {name: np.array(a[i : i + 1]) for name, a in inputs.items()}
            self._spawn(self._admit(model, cloud_model, row, class_of(outputs, i)))

    async def _admit(
        self, model: str, cloud_model: str, row: dict[str, Array], edge: int | str | None
    ) -> None:
        outcome = "error"
        try:
            outcome = await self._try_admit(model, cloud_model, row, edge)
        except Exception:
            log.exception("could not queue an audit of model %s", model)
        finally:
            self.samples.labels(model, outcome).inc()

    async def _try_admit(
        self, model: str, cloud_model: str, row: dict[str, Array], edge: int | str | None
    ) -> str:
        if edge is None:
            return "no_class"
        ticket = f"{AUDIT_PREFIX}{uuid.uuid4()}"
        body = encode_body(encode_infer_request(row, request_id=ticket))
        if not self._budget.allows(len(body)):
            return "budget"
        if self.waiting >= self.max_waiting:
            return "backlog"
        cap = self._queue.cap_bytes
        if cap is not None and self._queue.used_bytes + len(body) + ROW_OVERHEAD_BYTES > (
            cap * AUDIT_QUEUE_FILL
        ):
            return "queue_full"
        self.waiting += 1
        kept = False
        try:
            # The edge's answer first: a crash before the enqueue leaves a record whose item
            # is unknown, which the next start counts as lost; never an item without a record.
            await self._worker.call(
                lambda conn: conn.execute(
                    "INSERT INTO audits (ticket, model, edge_class, created_at) VALUES (?, ?, ?, ?)",
                    (ticket, model, str(edge), self.clock.wall()),
                )
            )
            kept = True
            await self._queue.enqueue(
                # the least urgent level: an audit never goes before a request
                ticket,
                cloud_model,
                body,
                priority=self._queue.priority_levels,
                ttl_s=self.ttl_s,
            )
        except Exception as exc:
            if kept:
                await self._take(ticket)  # and with it, the count of waiting audits
            else:
                self.waiting -= 1
            if isinstance(exc, QueueFull):
                return "queue_full"
            raise
        if self.on_queued is not None:
            self.on_queued(1)
        return "queued"

    # -- comparison, when the cloud has answered --------------------------------------------

    def on_end(self, ended: Sequence[ItemStatus]) -> None:
        """The queue's end callback: compare the audits among `ended` in the background."""
        mine = [s for s in ended if is_audit(s.ticket)]
        if mine and not self._closed:
            self._spawn(self._settle_all(mine))

    async def _settle_all(self, ended: Sequence[ItemStatus]) -> None:
        for status in ended:
            try:
                await self._settle(status)
            except Exception:
                # The record stays; the next start compares it from the queue's stored answer.
                log.exception("could not compare audit %s", status.ticket)

    async def _settle(self, status: ItemStatus) -> None:
        record = await self._take(status.ticket)
        if record is None:
            return  # already settled: the start-up pass and the end callback both saw it
        model, edge = record
        if status.state is ItemState.DELIVERED:
            outputs, _ = decode_result(status.result)
            cloud = class_of(outputs)
            if cloud is None:
                result = "incomparable"
            else:
                result = "agree" if str(cloud) == edge else "disagree"
        else:
            result = status.state.value
        self.results.labels(model, result).inc()

    async def settle_left_over(self) -> None:
        """Compare the audits that ended while no process was there to hear it (run once)."""
        tickets, self._left_over = self._left_over, []
        for ticket in tickets:
            try:
                status = await self._queue.get(ticket)
            except TicketNotFound:
                record = await self._take(ticket)
                if record is not None:
                    self.results.labels(record[0], "lost").inc()
                continue
            if status.state in END_STATES:
                await self._settle(status)

    async def _take(self, ticket: str) -> tuple[str, str] | None:
        """Remove the audit's record and return (model, edge class); None if already taken."""

        def job(conn: sqlite3.Connection) -> tuple[str, str] | None:
            row = conn.execute(
                "DELETE FROM audits WHERE ticket = ? RETURNING model, edge_class", (ticket,)
            ).fetchone()
            return None if row is None else (str(row[0]), str(row[1]))

        record = await self._worker.call(job)
        if record is not None:
            self.waiting -= 1
        return record

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
