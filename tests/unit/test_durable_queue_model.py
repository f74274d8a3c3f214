"""DurableQueue against a model of it, by Hypothesis: random runs of enqueues, claims, deliveries,
rejections, releases, expiries, purges, restarts and clock steps, on a real SQLite file, each
step checked against a few dictionaries that say what the queue promises (order by priority
with ageing, TTL, the disk cap and both full policies, leases, end states, byte accounting).

QUEUE_MODEL_EXAMPLES (default 200) runs of up to 50 steps each; raise it for a longer search.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from router.clock import FakeClock
from router.decision import PRIORITY_LEVELS
from router.durable_queue import ROW_OVERHEAD_BYTES, DurableQueue, FullPolicy, ItemState
from router.errors import QueueFull, TicketNotFound

pytestmark = pytest.mark.timeout(900)  # a few hundred SQLite commits per run, on any machine

T0 = 1_700_000_000.0
AGEING_S = 10.0
LEASE_S = 32.0
EXAMPLES = int(os.environ.get("QUEUE_MODEL_EXAMPLES", "200"))
TICKETS = [f"t{i}" for i in range(12)]  # few names, so repeats and reuse after purge happen


# -- what `priority` means: the one place the model knows it ----------------------------------


# Triton's convention: level 1 is the most urgent, LEVELS the least.


def urgency(priority: int, waited_s: float) -> int:
    """Sort key of a waiting item, smaller first: its level, one more urgent for every AGEING_S
    waited."""
    return priority - int(max(0.0, waited_s) // AGEING_S)


def may_drop(victim: int, newcomer: int) -> bool:
    """Under drop_oldest_lowest a newcomer may push out waiting items of its level or less
    urgent ones."""
    return victim >= newcomer


def drop_order(priority: int) -> int:
    """Victims go least urgent first (then oldest)."""
    return -priority


# -- the model --------------------------------------------------------------------------------


@dataclass
class Item:
    ticket: str
    priority: int
    enqueued_at: float
    expires_at: float
    seq: int
    size: int
    state: ItemState = ItemState.PENDING
    attempts: int = 0
    lease_until: float | None = None
    finished_at: float | None = None
    result: int = 0

    @property
    def ended(self) -> bool:
        return self.state not in (ItemState.PENDING, ItemState.IN_FLIGHT)

    @property
    def accounted(self) -> int:
        return self.result if self.ended else self.size + ROW_OVERHEAD_BYTES


class QueueMachine(RuleBasedStateMachine):
    claimed = Bundle("claimed")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="queue-model-"))
        self.clock = FakeClock(T0)
        self.items: dict[str, Item] = {}
        self.seq = 0
        self.refused = 0
        self.evicted = 0
        self.queue: DurableQueue | None = None

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    @initialize(
        policy=st.sampled_from(list(FullPolicy)),
        cap=st.sampled_from([None, 1500, 4000, 12000]),
    )
    def open_queue(self, policy: FullPolicy, cap: int | None) -> None:
        self.policy, self.cap = policy, cap
        self.queue = self.run(self._open())

    async def _open(self) -> DurableQueue:
        return await DurableQueue.open(
            self.dir / "queue.sqlite",
            clock=self.clock,
            cap_bytes=self.cap,
            full_policy=self.policy,
            ageing_s=AGEING_S,
            lease_s=LEASE_S,
        )

    def teardown(self) -> None:
        if self.queue is not None:
            self.run(self.queue.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def now(self) -> float:
        return self.clock.wall()

    def used(self) -> int:
        return sum(i.accounted for i in self.items.values())

    def end(self, item: Item, state: ItemState, result: int = 0) -> None:
        item.state, item.finished_at, item.result, item.lease_until = state, self.now, result, None

    def expire(self) -> None:
        for item in self.items.values():
            if item.state is ItemState.PENDING and item.expires_at <= self.now:
                self.end(item, ItemState.EXPIRED)

    # -- rules --------------------------------------------------------------------------------

    @rule(
        ticket=st.sampled_from(TICKETS),
        # close priorities, so that ageing reorders them often; the ends of the range too
        priority=st.sampled_from([1, 2, 3, PRIORITY_LEVELS]),
        ttl=st.sampled_from([1.0, 16.0, 100.0, 3600.0]),
        size=st.one_of(st.integers(0, 300), st.integers(0, 2500)),
    )
    def enqueue(self, ticket: str, priority: int, ttl: float, size: int) -> None:
        assert self.queue is not None
        payload = b"x" * size
        try:
            new = self.run(self.queue.enqueue(ticket, "m", payload, priority=priority, ttl_s=ttl))
        except QueueFull:
            new = None
        expected = self.admit(ticket, priority, ttl, size)
        assert new == expected, (ticket, new, expected)

    def admit(self, ticket: str, priority: int, ttl: float, size: int) -> bool | None:
        if ticket in self.items:
            return False
        over = self.used() + size + ROW_OVERHEAD_BYTES - (self.cap or 0)
        if self.cap is not None and over > 0:
            victims = self.victims(over, priority)
            if victims is None:
                self.refused += 1
                return None
            for v in victims:
                self.end(v, ItemState.DROPPED)
        self.seq += 1
        self.items[ticket] = Item(ticket, priority, self.now, self.now + ttl, self.seq, size)
        return True

    def victims(self, to_free: int, priority: int) -> list[Item] | None:
        if self.policy is FullPolicy.REFUSE:
            return None
        candidates = sorted(
            (
                i
                for i in self.items.values()
                if i.state is ItemState.PENDING and may_drop(i.priority, priority)
            ),
            key=lambda i: (drop_order(i.priority), i.enqueued_at, i.seq),
        )
        chosen, freed = [], 0
        for item in candidates:
            chosen.append(item)
            freed += item.size + ROW_OVERHEAD_BYTES
            if freed >= to_free:
                return chosen
        return None

    @rule(target=claimed, max_items=st.integers(1, 4), max_bytes=st.sampled_from([1, 900, 6000]))
    def claim(self, max_items: int, max_bytes: int) -> list[str]:
        assert self.queue is not None
        got = self.run(self.queue.claim_batch(max_items, max_bytes))
        for item in self.items.values():  # leases that ran out come back first
            lease = item.lease_until
            if item.state is ItemState.IN_FLIGHT and lease is not None and lease <= self.now:
                item.state, item.lease_until = ItemState.PENDING, None
        self.expire()
        waiting = sorted(
            (i for i in self.items.values() if i.state is ItemState.PENDING),
            key=lambda i: (urgency(i.priority, self.now - i.enqueued_at), i.enqueued_at, i.seq),
        )
        chosen, size = [], 0
        for item in waiting[:max_items]:
            if chosen and size + item.size > max_bytes:
                break
            size += item.size
            chosen.append(item)
            item.state, item.lease_until = ItemState.IN_FLIGHT, self.now + LEASE_S
            item.attempts += 1  # a delivery tried, whatever becomes of it
        assert [c.ticket for c in got] == [c.ticket for c in chosen]
        for c, item in zip(got, chosen, strict=True):
            assert (c.priority, c.attempts, len(c.payload)) == (
                item.priority,
                item.attempts,
                item.size,
            )
        return [c.ticket for c in chosen]

    @rule(tickets=claimed, result=st.integers(0, 3000), delivered=st.booleans())
    def end_claimed(self, tickets: list[str], result: int, delivered: bool) -> None:
        """Deliver (with an answer of `result` bytes) or reject what a claim handed out; it may
        have ended or been purged since, which the queue must say."""
        assert self.queue is not None
        for ticket in tickets:
            item = self.items.get(ticket)
            try:
                if delivered:
                    done = self.run(self.queue.mark_delivered(ticket, b"r" * result))
                else:
                    done = self.run(self.queue.mark_rejected(ticket, "refused"))
            except TicketNotFound:
                assert item is None
                continue
            assert item is not None
            assert done == (not item.ended)
            if done:
                if delivered:
                    self.end(item, ItemState.DELIVERED, self.room_for(item, result))
                else:
                    self.end(item, ItemState.REJECTED)

    def room_for(self, item: Item, result: int) -> int:
        """An answer larger than its request, over the cap: the oldest ended items go first;
        if they cannot make room, the answer is not kept (0 bytes)."""
        over = self.used() + result - item.size - ROW_OVERHEAD_BYTES - (self.cap or 0)
        if self.cap is None or over <= 0:
            return result
        ended = sorted(
            (i for i in self.items.values() if i.ended), key=lambda i: (i.finished_at, i.seq)
        )
        gone, freed = [], 0
        for old in ended:
            if freed >= over:
                break
            gone.append(old.ticket)
            freed += old.result
        if freed < over:
            return 0
        for ticket in gone:
            del self.items[ticket]
        self.evicted += len(gone)
        return result

    @rule(tickets=claimed)
    def release(self, tickets: list[str]) -> None:
        assert self.queue is not None
        for ticket in tickets:
            item = self.items.get(ticket)
            try:
                back = self.run(self.queue.release(ticket, "failed"))
            except TicketNotFound:
                assert item is None
                continue
            assert item is not None
            assert back == (item.state is ItemState.IN_FLIGHT)
            if back:
                item.state, item.lease_until = ItemState.PENDING, None

    @rule(seconds=st.sampled_from([0.5, 1.0, 8.0, 40.0, 130.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def expire_due(self) -> None:
        assert self.queue is not None
        before = {t for t, i in self.items.items() if i.state is ItemState.EXPIRED}
        ended = self.run(self.queue.expire_due())
        self.expire()
        after = {t for t, i in self.items.items() if i.state is ItemState.EXPIRED}
        assert set(ended) == after - before

    @rule(older_than=st.sampled_from([0.0, 10.0, 1000.0]))
    def purge(self, older_than: float) -> None:
        assert self.queue is not None
        n = self.run(self.queue.purge(older_than))
        gone = [
            t
            for t, i in self.items.items()
            if i.finished_at is not None and i.finished_at < self.now - older_than
        ]
        for t in gone:
            del self.items[t]
        assert n == len(gone)

    @precondition(lambda self: self.queue is not None)
    @rule()
    def restart(self) -> None:
        """The process stops and starts again: what was in flight may have been sent, so it is
        sent again."""
        assert self.queue is not None
        self.run(self.queue.close())
        self.queue = self.run(self._open())
        for item in self.items.values():
            if item.state is ItemState.IN_FLIGHT:
                item.state, item.lease_until = ItemState.PENDING, None

    # -- what must hold after every step ------------------------------------------------------

    @invariant()
    def the_queue_agrees_with_the_model(self) -> None:
        if self.queue is None:
            return
        assert self.queue.used_bytes == self.used()
        stats = self.run(self.queue.stats())
        depth = dict.fromkeys(range(1, PRIORITY_LEVELS + 1), 0)
        for item in self.items.values():
            if not item.ended:
                depth[item.priority] += 1
        assert stats.depth_by_priority == depth
        assert stats.in_flight == sum(i.state is ItemState.IN_FLIGHT for i in self.items.values())
        assert stats.admission_rejected == self.refused
        assert stats.results_evicted == self.evicted
        if self.cap is not None:
            assert stats.used_bytes <= self.cap
        for ticket in TICKETS:
            item = self.items.get(ticket)
            try:
                status = self.run(self.queue.get(ticket))
            except TicketNotFound:
                assert item is None, ticket
                continue
            assert item is not None, ticket
            assert (status.state, status.priority, status.attempts) == (
                item.state,
                item.priority,
                item.attempts,
            ), ticket
            assert (status.enqueued_at, status.expires_at, status.finished_at) == (
                item.enqueued_at,
                item.expires_at,
                item.finished_at,
            ), ticket
            assert len(status.result or b"") == (item.result if item.ended else 0)


QueueMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
test_the_queue_behaves_as_its_model = QueueMachine.TestCase
