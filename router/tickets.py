"""Tickets: issuing them (durable admission to the queue, all or nothing per request), what a
caller can learn of one, and watchers that resume from a cursor.

Results live in the DurableQueue (its `end_seq` numbers end states in commit order). Each item
has an owner (an opaque string: who queued it); a result is shown to its owner only. When items
end, the queue hands them to `notify`, which decodes each once and gives it to the watchers of
its owner alone, in memory: a watcher reads the queue file only to catch up (from its cursor,
or after it fell too far behind), so idle watchers and other owners' watchers cost nothing.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from model_runtime.errors import InvalidInput
from model_runtime.v2_json import decode_infer_response, encode_infer_request
from router.cloud_client import encode_body
from router.durable_queue import ROW_OVERHEAD_BYTES, DurableQueue, FullPolicy, ItemState, ItemStatus
from router.errors import QueueFull, TicketNotFound, TooManyWatchers
from router.queue_admission import TICKET

__all__ = [
    "AUDIT_PREFIX",
    "MAX_CURSOR",
    "MAX_WATCHED_TICKETS",
    "TICKET_STATES",
    "Admission",
    "TicketResult",
    "TicketStore",
    "WatchStream",
    "check_ticket",
    "decode_result",
    "encode_result",
    "is_audit",
]

log = logging.getLogger(__name__)

TICKET_STATES = ("pending", "delivered", "expired", "dropped", "rejected")
"""`rejected`: the cloud refused the request itself (400, 422...): it will never be answered."""

_WATCH_PAGE = 100
_INBOX_LIMIT = 1000
"""Results a watcher may have waiting in memory; beyond, it catches up from the file instead."""
MAX_CURSOR = 2**63 - 1
"""The largest cursor there can be (SQLite's integers are signed 64-bit)."""
MAX_WATCHED_TICKETS = 1000

AUDIT_PREFIX = "audit-"
"""Tickets of audit items (router.audit): internal, so WatchResults never shows them."""


def is_audit(ticket: str) -> bool:
    return ticket.startswith(AUDIT_PREFIX)


def check_ticket(ticket: object, field: str = "ticket") -> str:
    """`ticket` if it could be one (1-128 of A-Z a-z 0-9 . _ : -); else InvalidInput, whose
    message gives its length but never echoes it (it could be a megabyte)."""
    if not isinstance(ticket, str) or not ticket:
        raise InvalidInput(field, "is empty; give the ticket of a queued request")
    if not TICKET.fullmatch(ticket):
        raise InvalidInput(
            field,
            f"is not a ticket: tickets are 1-128 of A-Z a-z 0-9 . _ : - (got {len(ticket)} characters)",
        )
    return ticket


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
    """Deliveries tried from the queue: each claim that sent it, or was cut off by a restart
    or a lost lease; a claim released unsent is not counted. 1 for a first-time delivery."""
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


@dataclass(eq=False, slots=True)
class _Watcher:
    """One WatchResults stream: results of its owner wait in `inbox` until it takes them."""

    owner: str
    wanted: frozenset[str]
    event: asyncio.Event = field(default_factory=asyncio.Event)
    inbox: list[TicketResult] = field(default_factory=list)
    behind: bool = False
    """The inbox overflowed and was emptied: catch up from the file."""
    released: bool = False
    """Its place among max_watchers was given back."""

    def offer(self, result: TicketResult) -> None:
        if self.wanted and result.ticket not in self.wanted:
            return
        if len(self.inbox) >= _INBOX_LIMIT:
            self.inbox.clear()  # a slow reader: it rereads from its cursor, memory stays bounded
            self.behind = True
        else:
            self.inbox.append(result)
        self.event.set()


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
        max_watchers: int | None = None,
        on_watcher_refused: Callable[[], None] | None = None,
    ) -> None:
        """`max_watchers`: watchers at once (None: no limit); one more raises TooManyWatchers
        and calls `on_watcher_refused`."""
        self._queue = queue
        self.on_admitted = on_admitted
        self.on_refused = on_refused
        self.max_watchers = max_watchers
        self.on_watcher_refused = on_watcher_refused
        self._watchers: dict[str, set[_Watcher]] = {}
        self.watchers = 0
        """Watchers now."""
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
        """Items ended (called on the event loop after their commit, in end order): give each
        to the watchers of its owner, decoded once however many there are."""
        for status in ended:
            watchers = self._watchers.get(status.owner)
            if watchers and not is_audit(status.ticket):
                result = to_result(status)
                for watcher in watchers:
                    watcher.offer(result)

    def close(self) -> None:
        """End every watcher after what it has already been given."""
        self._closed = True
        for watchers in self._watchers.values():
            for watcher in watchers:
                watcher.event.set()

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
        owner: str = "",
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
                self.queue.enqueue(
                    a.ticket, model, a.body, priority=priority, ttl_s=ttl_s, owner=owner
                )
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

    async def result(self, ticket: str, *, owner: str = "") -> TicketResult:
        """The ticket's state and, once delivered, the cloud's answer. Raises InvalidInput for
        what cannot be a ticket, TicketNotFound for an unknown one and for another owner's (so
        a caller learns nothing of tickets that are not theirs)."""
        status = await self.queue.get(check_ticket(ticket))
        if status.owner != owner:
            raise TicketNotFound(ticket)
        return to_result(status)

    def watch(
        self, after_cursor: int = 0, tickets: Collection[str] = (), *, owner: str = ""
    ) -> WatchStream:
        """Every result of `owner` that ended after `after_cursor`, in end order, then each one
        as it ends; ends only when the store closes. A watcher that reconnects passes the last
        cursor it got. With `tickets`, only those (audit items are never shown).

        Checked before the stream starts: InvalidInput for a bad cursor or ticket,
        TooManyWatchers when `max_watchers` watch already.
        """
        if (
            isinstance(after_cursor, bool)
            or not isinstance(after_cursor, int)
            or not 0 <= after_cursor <= MAX_CURSOR
        ):
            shown = after_cursor if isinstance(after_cursor, int) else type(after_cursor).__name__
            raise InvalidInput(
                "after_cursor", f"must be an integer 0..{MAX_CURSOR}, got {str(shown)[:40]}"
            )
        if len(tickets) > MAX_WATCHED_TICKETS:
            raise InvalidInput(
                "tickets", f"at most {MAX_WATCHED_TICKETS} tickets, got {len(tickets)}"
            )
        wanted = frozenset(check_ticket(t, "tickets") for t in tickets)
        if self.max_watchers is not None and self.watchers >= self.max_watchers:
            if self.on_watcher_refused is not None:
                self.on_watcher_refused()
            raise TooManyWatchers(self.max_watchers)
        watcher = _Watcher(owner, wanted)
        # Registered now, before the stream's first read of the file: nothing that ends from
        # here on can fall between that read and the inbox.
        self._watchers.setdefault(owner, set()).add(watcher)
        self.watchers += 1
        return WatchStream(self._stream(watcher, after_cursor), lambda: self._release(watcher))

    def _release(self, watcher: _Watcher) -> None:
        if watcher.released:
            return
        watcher.released = True
        watchers = self._watchers.get(watcher.owner)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[watcher.owner]
        self.watchers -= 1

    async def _stream(self, watcher: _Watcher, cursor: int) -> AsyncGenerator[TicketResult, None]:
        try:
            catch_up = True
            while not self._closed:
                if catch_up:
                    watcher.behind = False
                    async for result in self._read_after(watcher, cursor):
                        cursor = result.cursor
                        yield result
                    catch_up = False
                    continue
                # Cleared before taking the inbox: a result offered after this sets it again.
                watcher.event.clear()
                batch, watcher.inbox = watcher.inbox, []
                for result in batch:
                    if result.cursor > cursor:  # what the file read gave already is skipped
                        cursor = result.cursor
                        yield result
                if watcher.behind:
                    catch_up = True
                elif not watcher.inbox and not self._closed:
                    await watcher.event.wait()
        finally:
            self._release(watcher)

    async def _read_after(self, watcher: _Watcher, cursor: int) -> AsyncIterator[TicketResult]:
        """The watcher's results in the file after `cursor`, page by page, to the last one."""
        while not self._closed:
            page = await self.queue.results_after(cursor, _WATCH_PAGE, owner=watcher.owner)
            for status in page:
                cursor = max(cursor, status.end_seq or cursor)
                if is_audit(status.ticket):
                    continue
                if not watcher.wanted or status.ticket in watcher.wanted:
                    yield to_result(status)
            if len(page) < _WATCH_PAGE:
                return


class WatchStream(AsyncIterator[TicketResult]):
    """A watcher's stream that gives its place back however it ends: exhausted, failed, or
    closed, even before its first read (an async generator that never started skips its
    `finally`, and a client may go away between watch() and that read)."""

    def __init__(self, results: AsyncGenerator[TicketResult, None], release: Callable[[], None]):
        self._results = results
        self._release = release

    async def __anext__(self) -> TicketResult:
        return await self._results.__anext__()

    async def aclose(self) -> None:
        try:
            await self._results.aclose()
        finally:
            self._release()


async def _outcome(enqueue: Awaitable[bool]) -> bool | BaseException:
    """As asyncio.gather(..., return_exceptions=True) would give it, for one awaitable."""
    try:
        return await enqueue
    except Exception as exc:
        return exc
