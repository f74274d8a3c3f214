"""IdempotencyGuard over the real SQLite store: once per key, replays, conflicts, lapses, purge."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloud_gateway.errors import ClientGone, IdempotencyInProgress, IdempotencyKeyReused
from cloud_gateway.idempotency import (
    IdempotencyGuard,
    IdempotencyPolicy,
    SqliteIdempotencyStore,
    scope_id,
)
from cloud_gateway.settings import FAULT_POINTS
from model_runtime.fault_points import FaultPlan


class Work:
    """The model run: counts its calls, can be held open or made to fail."""

    def __init__(self, answer: bytes = b'{"outputs":[]}') -> None:
        self.answer = answer
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.fail_with: Exception | None = None

    async def __call__(self) -> bytes:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return self.answer


class WallClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "idempotency.sqlite3"


def guard(db: Path, **policy: float) -> IdempotencyGuard:
    """A guard as one worker has it; two guards on one file are two workers of a host."""
    return IdempotencyGuard(SqliteIdempotencyStore(db), IdempotencyPolicy(**policy))


SCOPE = scope_id("clinic-1", "req-1")


async def test_first_request_runs_and_repeats_replay(db: Path) -> None:
    g, work = guard(db), Work()
    first = await g.run(SCOPE, "fp", work)
    again = await g.run(SCOPE, "fp", work)
    assert (first.replayed, again.replayed) == (False, True)
    assert again.body == first.body == work.answer
    assert work.calls == 1
    # Another worker of the host replays from the file.
    assert (await guard(db).run(SCOPE, "fp", work)).replayed
    assert work.calls == 1


async def test_keys_are_scoped_per_device(db: Path) -> None:
    g, work = guard(db), Work()
    await g.run(scope_id("clinic-1", "req-1"), "fp", work)
    await g.run(scope_id("clinic-2", "req-1"), "fp", work)
    assert work.calls == 2


async def test_same_key_with_another_request_is_refused(db: Path) -> None:
    g, work = guard(db), Work()
    await g.run(SCOPE, "fp-a", work)
    with pytest.raises(IdempotencyKeyReused):
        await g.run(SCOPE, "fp-b", work)
    with pytest.raises(IdempotencyKeyReused):
        await guard(db).run(SCOPE, "fp-b", work)
    assert work.calls == 1


async def test_a_failed_run_stores_nothing_so_the_retry_runs(db: Path) -> None:
    g, work = guard(db), Work()
    work.fail_with = RuntimeError("upstream 503")
    with pytest.raises(RuntimeError):
        await g.run(SCOPE, "fp", work)
    assert SqliteIdempotencyStore(db).record(SCOPE) is None
    work.fail_with = None
    outcome = await g.run(SCOPE, "fp", work)
    assert not outcome.replayed
    assert work.calls == 2


async def test_concurrent_duplicates_in_one_worker_run_once(db: Path) -> None:
    g, work = guard(db), Work()
    work.release.clear()
    tasks = [asyncio.create_task(g.run(SCOPE, "fp", work)) for _ in range(50)]
    await asyncio.wait_for(work.started.wait(), 5)
    await asyncio.sleep(0)  # let the other 49 reach the guard while the first one runs
    work.release.set()
    outcomes = await asyncio.gather(*tasks)
    assert work.calls == 1
    assert sum(not o.replayed for o in outcomes) == 1
    assert {o.body for o in outcomes} == {work.answer}


async def test_concurrent_duplicates_across_workers_run_once(db: Path) -> None:
    workers = [guard(db, poll_min_s=0.001) for _ in range(3)]
    work = Work()
    work.release.clear()
    tasks = [asyncio.create_task(workers[i % 3].run(SCOPE, "fp", work)) for i in range(30)]
    await asyncio.wait_for(work.started.wait(), 5)
    await asyncio.sleep(0.05)  # the other workers find the mark and poll while it runs
    work.release.set()
    outcomes = await asyncio.gather(*tasks)
    assert work.calls == 1
    assert sum(not o.replayed for o in outcomes) == 1


async def test_a_duplicate_that_waits_too_long_gets_in_progress(db: Path) -> None:
    first, work = guard(db), Work()
    work.release.clear()
    running = asyncio.create_task(first.run(SCOPE, "fp", work))
    await asyncio.wait_for(work.started.wait(), 5)
    with pytest.raises(IdempotencyInProgress) as err:
        await guard(db, wait_s=0.05).run(SCOPE, "fp", work)
    assert err.value.retry_after_s > 0
    work.release.set()
    await running


class CountingStore(SqliteIdempotencyStore):
    """The real store, telling the test how many claims and renewals it has done."""

    def __init__(self, path: Path, clock: WallClock) -> None:
        super().__init__(path, now=clock)
        self.claims = 0
        self.renewals = 0
        self._changed = asyncio.Event()

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        found = await super().claim(*args, **kwargs)
        self.claims += 1
        self._changed.set()
        return found

    async def renew(self, scope: str, owner: str, pending_ttl_s: float) -> None:
        await super().renew(scope, owner, pending_ttl_s)
        self.renewals += 1
        self._changed.set()

    async def reach(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


async def test_a_live_worker_renews_its_mark(db: Path) -> None:
    # The run outlasts the mark's TTL several times over; renewal keeps the duplicate waiting
    # for the answer instead of running the model a second time. The store's clock is the
    # test's, and so is the renewer's sleep: time passes only when the test says, each step
    # after the renewal it allows, so a busy machine cannot make a renewal late.
    clock = WallClock()
    naps: asyncio.Queue[asyncio.Event] = asyncio.Queue()

    async def renewer_sleep(seconds: float) -> None:
        woken = asyncio.Event()
        await naps.put(woken)
        await woken.wait()

    ours, theirs = CountingStore(db, clock), CountingStore(db, clock)
    policy = IdempotencyPolicy(pending_ttl_s=1.0)
    first = IdempotencyGuard(ours, policy, sleep=renewer_sleep)
    duplicate_worker = IdempotencyGuard(theirs, policy, monotonic=clock)
    work = Work()
    work.release.clear()
    running = asyncio.create_task(first.run(SCOPE, "fp", work))
    await asyncio.wait_for(work.started.wait(), 5)
    duplicate = asyncio.create_task(duplicate_worker.run(SCOPE, "fp", work))
    for _ in range(6):  # three TTLs, half a TTL at a time, the mark renewed before each
        renewed, polled = ours.renewals, theirs.claims
        (await asyncio.wait_for(naps.get(), 5)).set()
        await ours.reach(lambda: ours.renewals > renewed)  # noqa: B023
        clock.now += 0.5
        await theirs.reach(lambda: theirs.claims > polled + 1)  # noqa: B023  # looked after it
    assert work.calls == 1  # the duplicate found a live mark at every step
    work.release.set()
    assert not (await running).replayed
    assert (await duplicate).replayed
    assert work.calls == 1
    await first.aclose()


async def test_the_mark_of_a_dead_worker_lapses(db: Path) -> None:
    clock = WallClock()
    store = SqliteIdempotencyStore(db, now=clock)
    # A worker claimed the key, then died: nobody renews or completes its mark.
    assert await store.claim(SCOPE, "fp", "dead-worker", 10.0) is None
    pending = await store.claim(SCOPE, "fp", "other", 10.0)
    assert pending is not None
    assert pending.body is None
    clock.now += 10.5
    assert await store.claim(SCOPE, "fp", "other", 10.0) is None
    # The dead worker's late completion does not overwrite the new owner's mark.
    await store.complete(SCOPE, "dead-worker", b"stale", 100.0)
    await store.complete(SCOPE, "other", b"fresh", 100.0)
    done = await store.claim(SCOPE, "fp", "third", 10.0)
    assert done is not None
    assert done.body == b"fresh"


async def test_answers_are_kept_for_the_retention_then_purged(db: Path) -> None:
    clock = WallClock()
    store = SqliteIdempotencyStore(db, now=clock)
    g = IdempotencyGuard(store, IdempotencyPolicy(retention_s=7 * 86_400.0))
    work = Work()
    await g.run(SCOPE, "fp", work)
    clock.now += 7 * 86_400.0 - 1
    assert await store.purge_expired() == 0
    assert (await g.run(SCOPE, "fp", work)).replayed
    clock.now += 2
    assert await store.purge_expired() == 1
    assert store.record(SCOPE) is None
    assert not (await g.run(SCOPE, "fp", work)).replayed
    assert work.calls == 2


async def test_writes_of_one_loop_turn_share_one_commit(db: Path) -> None:
    store = SqliteIdempotencyStore(db)
    before = store.commits
    results = await asyncio.gather(
        *(store.claim(scope_id("clinic-1", f"k{i}"), "fp", f"o{i}", 10.0) for i in range(20))
    )
    assert results == [None] * 20
    assert store.commits == before + 1
    again = await store.claim(scope_id("clinic-1", "k3"), "fp", "other", 10.0)
    assert again is not None
    assert again.body is None


async def test_a_locked_database_is_waited_for_off_the_event_loop(db: Path) -> None:
    store = SqliteIdempotencyStore(db)
    other_worker = sqlite3.connect(db, isolation_level=None)
    other_worker.execute("BEGIN IMMEDIATE")  # holds the write lock
    claim = asyncio.create_task(store.claim(SCOPE, "fp", "me", 10.0))
    ticks = 0
    for _ in range(20):  # the loop keeps turning while the claim waits for the lock
        await asyncio.sleep(0.005)
        ticks += 1
    assert not claim.done()
    other_worker.execute("COMMIT")
    assert await asyncio.wait_for(claim, 10) is None
    assert ticks == 20
    other_worker.close()


async def test_a_worker_opens_the_store_while_another_holds_its_lock(tmp_path: Path) -> None:
    """Workers start together; one that finds the file locked waits instead of dying."""
    db = tmp_path / "idempotency.sqlite3"
    # A new file, still in rollback-journal mode, locked by a worker that is creating it.
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("CREATE TABLE being_created (x)")
    released = asyncio.get_running_loop().call_later(0.3, holder.execute, "COMMIT")
    try:
        store = await asyncio.to_thread(SqliteIdempotencyStore, db)
    finally:
        released.cancel()
        holder.close()
    await store.aclose()


RETENTION_S = 7 * 86_400.0


@pytest.mark.parametrize(
    ("after_s", "replayed"),
    [(RETENTION_S - 0.001, True), (RETENTION_S, False), (RETENTION_S + 0.001, False)],
)
async def test_retention_edges_on_an_injected_clock(
    db: Path, after_s: float, replayed: bool
) -> None:
    """An answer is replayed until the instant its retention ends and never from then on; a
    key whose answer is gone may come with another request (no 422), one still kept may not."""
    clock = WallClock()
    store = SqliteIdempotencyStore(db, now=clock)
    g = IdempotencyGuard(store, IdempotencyPolicy(retention_s=RETENTION_S))
    work = Work()
    await g.run(SCOPE, "fp", work)
    clock.now += after_s
    if replayed:
        with pytest.raises(IdempotencyKeyReused):
            await g.run(SCOPE, "another request", work)
        assert (await g.run(SCOPE, "fp", work)).replayed
        assert await store.purge_expired() == 0
    else:
        assert store.record(SCOPE) is not None  # still on disk until the purge ...
        assert not (await g.run(SCOPE, "another request", work)).replayed  # ... but expired
        assert work.calls == 2


@pytest.mark.parametrize(("after_s", "lapsed"), [(0.999, False), (1.0, True)])
async def test_a_pending_mark_lapses_at_its_ttl_exactly(
    db: Path, after_s: float, lapsed: bool
) -> None:
    clock = WallClock()
    store = SqliteIdempotencyStore(db, now=clock)
    assert await store.claim(SCOPE, "fp", "dead-worker", 1.0) is None
    clock.now += after_s
    existing = await store.claim(SCOPE, "fp", "live-worker", 1.0)
    assert (existing is None) is lapsed


# -- a waiting duplicate whose client has gone; a store that fails after the run ----------------


class Client:
    """`gone()` as the routes pass it (request.is_disconnected); counts how often it is asked."""

    def __init__(self, gone: bool = False) -> None:
        self.is_gone = gone
        self.asked = 0

    async def gone(self) -> bool:
        self.asked += 1
        return self.is_gone


async def test_a_first_request_runs_without_asking_after_its_client(db: Path) -> None:
    client, work = Client(gone=True), Work()
    assert not (await guard(db).run(SCOPE, "fp", work, client_gone=client.gone)).replayed
    assert (work.calls, client.asked) == (1, 0)  # nothing waited: no cost on the usual path


async def test_a_duplicate_whose_client_left_does_not_run_when_the_mark_lapses(db: Path) -> None:
    clock = WallClock()
    store = SqliteIdempotencyStore(db, now=clock)
    # A worker claimed the key and died mid-run; a device's retry waits for its mark to lapse.
    assert await store.claim(SCOPE, "fp", "dead-worker", 10.0) is None
    client, work = Client(), Work()
    duplicate = IdempotencyGuard(store, IdempotencyPolicy(poll_max_s=0.01))
    waiting = asyncio.create_task(duplicate.run(SCOPE, "fp", work, client_gone=client.gone))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    client.is_gone = True  # the device hung up (or was killed) while it waited...
    clock.now += 10.5  # ...and then the dead worker's mark lapsed
    with pytest.raises(ClientGone):
        await waiting
    assert work.calls == 0  # nobody was left to receive an answer
    # Its claim is not left behind: the device's next retry runs at once, and once.
    again = await IdempotencyGuard(store).run(SCOPE, "fp", work, client_gone=Client().gone)
    assert (again.replayed, work.calls) == (False, 1)


async def test_a_duplicate_whose_client_left_stops_waiting(db: Path) -> None:
    first, work = guard(db), Work()
    work.release.clear()
    running = asyncio.create_task(first.run(SCOPE, "fp", work))
    await asyncio.wait_for(work.started.wait(), 5)
    client = Client()
    waiting = asyncio.create_task(
        guard(db, poll_max_s=0.01).run(SCOPE, "fp", work, client_gone=client.gone)
    )
    await asyncio.sleep(0.05)
    client.is_gone = True
    with pytest.raises(ClientGone):
        await asyncio.wait_for(waiting, 5)  # freed while the first run still goes on
    work.release.set()
    assert not (await running).replayed
    assert work.calls == 1


async def test_a_local_duplicate_whose_client_left_does_not_run_after_its_leader_is_cancelled(
    db: Path,
) -> None:
    g, work = guard(db), Work()
    work.release.clear()
    leader = asyncio.create_task(g.run(SCOPE, "fp", work))
    await asyncio.wait_for(work.started.wait(), 5)
    client = Client(gone=True)
    duplicate = asyncio.create_task(g.run(SCOPE, "fp", work, client_gone=client.gone))
    await asyncio.sleep(0)
    leader.cancel()  # the first request's connection dropped: its run is abandoned
    with pytest.raises(ClientGone):
        await duplicate
    assert work.calls == 1


async def test_an_answer_the_store_cannot_keep_is_still_given_and_its_mark_released(
    db: Path,
) -> None:
    # Commit 1 claims the key, commit 2 would store the answer: it fails as a failing disk does.
    plan = FaultPlan.parse("idempotency.commit:2:eio", FAULT_POINTS)
    store = SqliteIdempotencyStore(db, faults=plan)
    work = Work()
    outcome = await IdempotencyGuard(store).run(SCOPE, "fp", work)
    assert (outcome.body, outcome.replayed, outcome.stored) == (work.answer, False, False)
    assert store.record(SCOPE) is None  # released, not left to lapse
    again = await IdempotencyGuard(store).run(SCOPE, "fp", work)
    assert (again.replayed, again.stored, work.calls) == (False, True, 2)


async def test_the_crash_point_lies_between_the_run_and_the_stored_answer(db: Path) -> None:
    class Crashed(Exception):
        pass

    def crash() -> None:
        raise Crashed

    # In a test process the crash raises instead of SIGKILLing the process.
    plan = FaultPlan.parse("gateway.after_run_before_store:1", FAULT_POINTS, kill=crash)
    store = SqliteIdempotencyStore(db)
    work = Work()
    with pytest.raises(Crashed):
        await IdempotencyGuard(store, faults=plan).run(SCOPE, "fp", work)
    record = store.record(SCOPE)
    assert record is not None
    assert (work.calls, record[1] is not None, record[2]) == (1, True, None)  # ran; pending
