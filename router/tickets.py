"""Tickets: issuing them (durable admission to the queue, all or nothing per request), what a
caller can learn of one, and watchers that resume from a cursor.

Results live in the DurableQueue (its `end_seq` numbers end states in commit order); this module
decodes them and wakes watchers when the queue reports items that ended.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from model_runtime.errors import InvalidInput
from model_runtime.v2_json import decode_infer_response, encode_infer_request
from router.cloud_client import encode_body
from router.durable_queue import ROW_OVERHEAD_BYTES, DurableQueue, FullPolicy, ItemState, ItemStatus
from router.errors import QueueFull

__all__ = [
    "AUDIT_PREFIX",
    "TICKET_STATES",
    "Admission",
    "TicketResult",
    "TicketStore",
    "decode_result",
    "encode_result",
    "is_audit",
]

log = logging.getLogger(__name__)

TICKET_STATES = ("pending", "delivered", "expired", "dropped", "rejected")
"""`rejected`: the cloud refused the request itself (400, 422...): it will never be answered."""

_WATCH_PAGE = 100

AUDIT_PREFIX = "audit-"
"""Tickets of audit items (router.audit): internal, so WatchResults never shows them."""


def is_audit(ticket: str) -> bool:
    return ticket.startswith(AUDIT_PREFIX)


@dataclass(frozen=True, slots=True)
class TicketResult:
    """A ticket as the caller sees it; `cursor` orders ended tickets for WatchResults."""

    ticket: str
    state: str
    """One of TICKET_STATES; in flight counts as pending."""
    model: str
    """The cloud model that answers (or would have answered) the request."""
    outputs: dict[str, npt.NDArray[np.generic]]
    """The cloud's answer when delivered, else empty."""
    cursor: int
    """The end's sequence number (0 while pending); WatchResults resumes after it."""
    enqueued_at: float
    finished_at: float | None
    attempts: int
    error: str | None = None
    """Why the last attempt failed, or why the cloud rejected it."""
    parameters: dict[str, object] = field(default_factory=dict)
    """The cloud answer's own parameters (e.g. `idempotent_replay`)."""


def encode_result(body: dict[str, object]) -> bytes:
    """What is stored under a delivered ticket: the cloud's v2 JSON answer, gzip-compressed
    (mtime 0, so equal answers are equal bytes); the queue's disk cap counts it."""
    raw = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    return gzip.compress(raw, mtime=0)


def decode_result(
    stored: bytes | None,
) -> tuple[dict[str, npt.NDArray[np.generic]], dict[str, object]]:
    """The outputs and parameters of a stored answer (gzip or plain JSON); empty if none."""
    if not stored:
        return {}, {}
    raw = gzip.decompress(stored) if stored[:2] == b"\x1f\x8b" else stored
    try:
        response = decode_infer_response(json.loads(raw))
    except (ValueError, InvalidInput) as exc:
        # Only answers that decoded are stored; this is a damaged row, not a caller's mistake.
        log.error("stored answer could not be decoded: %s", exc)
        return {}, {}
    return response.outputs, dict(response.parameters)


def to_result(status: ItemStatus) -> TicketResult:
    state = status.state
    name = "pending" if state in (ItemState.PENDING, ItemState.IN_FLIGHT) else str(state.value)
    outputs, parameters = decode_result(status.result) if state is ItemState.DELIVERED else ({}, {})
    return TicketResult(
        ticket=status.ticket,
        state=name,
        model=status.model,
        outputs=outputs,
        cursor=status.end_seq or 0,
        enqueued_at=status.enqueued_at,
        finished_at=status.finished_at,
        attempts=status.attempts,
        error=status.last_error,
        parameters=parameters,
    )


@dataclass(frozen=True, slots=True)
class Admission:
    """One item to queue: its one-row v2 request, under its ticket (also its Idempotency-Key)."""

    ticket: str
    body: bytes

    @classmethod
    def for_row(cls, inputs: Mapping[str, npt.NDArray[np.generic]], i: int) -> Admission:
        """Row `i` of a batch as its own v2 request, under a fresh ticket (also its `id`)."""
        ticket = str(uuid.uuid4())
        row = {name: np.asarray(a)[i : i + 1] for name, a in inputs.items()}
        return cls(ticket, encode_body(encode_infer_request(row, request_id=ticket)))

    @property
    def need(self) -> int:
        """What the queue will account for it against its cap."""
        return len(self.body) + ROW_OVERHEAD_BYTES


class TicketStore:
    """Issues tickets into the queue, reads them back, feeds watchers (`notify` is the queue's
    `on_end`). `on_admitted(n)` and `on_refused(n)` count items; the first also wakes the
    forwarder."""

    def __init__(
        self,
        queue: DurableQueue | None = None,
        *,
        on_admitted: Callable[[int], None] | None = None,
        on_refused: Callable[[int], None] | None = None,
    ) -> None:
        self._queue = queue
        self.on_admitted = on_admitted
        self.on_refused = on_refused
        self._wakers: set[asyncio.Event] = set()
        self._closed = False
        self._reserved = 0

    def attach(self, queue: DurableQueue) -> None:
        """The queue is opened with `notify` as its callback, so it comes after construction."""
        self._queue = queue

    @property
    def queue(self) -> DurableQueue:
        if self._queue is None:
            raise RuntimeError("TicketStore has no queue attached")
        return self._queue

    def notify(self, ended: Sequence[ItemStatus] = ()) -> None:
        """Wake every watcher: items ended (called on the event loop after their commit)."""
        for event in self._wakers:
            event.set()

    def close(self) -> None:
        """End every watcher after what it has already been given."""
        self._closed = True
        self.notify()

    # -- issuing ------------------------------------------------------------------------------

    def check_room(self, items: Sequence[Admission]) -> None:
        """Raise QueueFull now, before anything is sent or stored, unless all `items` fit.

        Bytes of admissions still being committed are reserved, so two requests checked at
        once cannot both count the same free space: under the refuse policy a request is
        admitted whole or not at all.
        """
        cap = self.queue.cap_bytes
        if cap is None or not items:
            return
        used = self.queue.used_bytes + self._reserved
        if used + sum(a.need for a in items) > cap:
            self._count(self.on_refused, len(items))
            raise QueueFull(used, cap)

    async def admit(
        self,
        model: str,
        items: Sequence[Admission],
        *,
        priority: int,
        ttl_s: float,
        all_or_nothing: bool,
    ) -> dict[str, bool]:
        """Commit `items` durably (one group commit); ticket -> stored, False if refused.

        With `all_or_nothing` under the refuse policy a refusal raises QueueFull instead; after
        `check_room` that happens only if the queue grew by other means in between (then the
        items already stored stay queued, and it is logged).
        """
        if not items:
            return {}
        reserve = sum(a.need for a in items)
        self._reserved += reserve
        try:
            enqueues = [
                self.queue.enqueue(a.ticket, model, a.body, priority=priority, ttl_s=ttl_s)
                for a in items
            ]
            if len(enqueues) == 1:  # nearly always: a task per item would cost a turn of the loop
                outcomes: list[bool | BaseException] = [await _outcome(enqueues[0])]
            else:
                outcomes = await asyncio.gather(*enqueues, return_exceptions=True)
        finally:
            self._reserved -= reserve
        stored: dict[str, bool] = {}
        refused: QueueFull | None = None
        for a, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, QueueFull):
                refused = outcome
            elif isinstance(outcome, BaseException):
                raise outcome
            stored[a.ticket] = not isinstance(outcome, QueueFull)
        admitted = sum(stored.values())
        self._count(self.on_admitted, admitted)
        self._count(self.on_refused, len(items) - admitted)
        if refused is not None and all_or_nothing and self.queue.full_policy is FullPolicy.REFUSE:
            if admitted:
                log.error("queue refused part of a request; %d item(s) stay queued", admitted)
            raise refused
        return stored

    @staticmethod
    def _count(callback: Callable[[int], None] | None, n: int) -> None:
        if callback is not None and n:
            callback(n)

    # -- reading --------------------------------------------------------------------------------

    async def result(self, ticket: str) -> TicketResult:
        """The ticket's state and, once delivered, the cloud's answer; raises TicketNotFound."""
        return to_result(await self.queue.get(ticket))

    async def watch(
        self, after_cursor: int = 0, tickets: Collection[str] = ()
    ) -> AsyncIterator[TicketResult]:
        """Every ticket that ended after `after_cursor`, in end order, then each one as it ends.

        With `tickets`, only those are yielded (the cursor still moves past the others, and
        past audit items, which are never yielded). Ends
        only when the store closes. A watcher that reconnects passes the last cursor it got.
        """
        if isinstance(after_cursor, bool) or not isinstance(after_cursor, int) or after_cursor < 0:
            raise ValueError(f"after_cursor: must be an integer >= 0, got {after_cursor!r}")
        wanted = frozenset(tickets)
        cursor = after_cursor
        event = asyncio.Event()
        self._wakers.add(event)
        try:
            while not self._closed:
                # Cleared before reading: an end committed after the read sets it again.
                event.clear()
                page = await self.queue.results_after(cursor, _WATCH_PAGE)
                for status in page:
                    cursor = max(cursor, status.end_seq or cursor)
                    if is_audit(status.ticket):
                        continue
                    if not wanted or status.ticket in wanted:
                        yield to_result(status)
                if len(page) < _WATCH_PAGE and not self._closed:
                    await event.wait()
        finally:
            self._wakers.discard(event)


async def _outcome(enqueue: Awaitable[bool]) -> bool | BaseException:
    """As asyncio.gather(..., return_exceptions=True) would give it, for one awaitable."""
    try:
        return await enqueue
    except Exception as exc:
        return exc
