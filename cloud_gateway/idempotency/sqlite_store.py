"""The default idempotency store: one SQLite file in WAL mode, shared by the workers of a host.

Writes are group-committed: every claim, renewal, answer and release issued during one turn of
the event loop goes into one `BEGIN IMMEDIATE` transaction, so two workers cannot both claim a
key, and sixteen requests in flight cost one commit instead of sixteen. Commits use
synchronous=NORMAL: a power cut may lose the last answers, and their retries then run the model
again, which is the at-least-once the devices already cope with; no fsync per request.

The transaction first runs on the event loop's own connection, which never waits: it has no
busy timeout and no automatic checkpoint, so it either finishes in tens of microseconds (a
page-cache write) or fails at once with SQLITE_BUSY. Only then, when another worker holds the
write lock, does the batch go to a worker thread that may wait for it: a thread round trip
costs more than the transaction itself. Checkpoints, which do fsync, run in a thread too.

Bounded: the database file by `max_page_count` (SQLite refuses to grow it further), the WAL
by checkpoints every quarter of its share of bytes written (writes wait when another half has
been written before the checkpoint is done) and by `journal_size_limit`, which cuts it back
when it starts over. A claim is admitted only with room for one more answer beside the stored
ones and those being computed, by any worker: every pending mark in the file holds room for a
`max_answer_bytes` answer, and the room is counted and the mark inserted in one `BEGIN
IMMEDIATE` transaction, which SQLite serialises across processes, so two workers cannot both
take the last room. Expired records are deleted, oldest first, to make room, and otherwise the
claim is refused (StoreFull) before the model runs.

Checkpoints let the WAL start over. A PASSIVE checkpoint alone never catches up with a loop that
keeps committing: under steady load the WAL grew without end (270 MB in ten seconds of
benchmarks/gateway.py), and every read got slower with it. So a checkpoint first copies the bulk
of the WAL passively while writes go on, then finishes with a RESTART checkpoint, which holds
writers off until the whole WAL is in the database, so the next commit starts the WAL over.
This worker's batches wait for that second phase (a few milliseconds; it gives up after 100 ms
when other workers keep the lock) rather than meet its lock; other workers' batches meet it and
take the thread path.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cloud_gateway.errors import StoreFull, StoreUnavailable
from cloud_gateway.idempotency.base import Existing, StoreBounds
from cloud_gateway.sqlite_pool import ConnectionPool
from cloud_gateway.worker_threads import run_blocking
from model_runtime.fault_points import FaultPlan, sqlite_error
from model_runtime.private_files import private_dir, private_file
from model_runtime.sqlite_wal import enable_wal, is_busy

__all__ = ["SqliteIdempotencyStore"]

_Op = Callable[[sqlite3.Connection], Any]

COMMIT = "idempotency.commit"
"""Fault point: a batch of claims, renewals, answers and releases is about to be committed."""
MID_CHECKPOINT = "idempotency.mid_checkpoint"
"""Fault point: a checkpoint has copied the WAL's bulk into the database; the WAL has not
started over."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    scope       TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    owner       TEXT,             -- set while pending, NULL once done
    body        BLOB,             -- the answer, once done
    expires_at  REAL NOT NULL     -- pending: when the mark lapses; done: end of retention
);
CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency (expires_at);
-- The pending marks, counted by every claim that checks for room: as few as requests in flight.
CREATE INDEX IF NOT EXISTS idempotency_pending ON idempotency (owner) WHERE owner IS NOT NULL;
"""

_CLAIM = (
    "INSERT INTO idempotency (scope, fingerprint, owner, body, expires_at) VALUES (?, ?, ?, NULL, ?) "
    "ON CONFLICT (scope) DO UPDATE SET fingerprint = excluded.fingerprint, owner = excluded.owner, "
    "body = NULL, expires_at = excluded.expires_at WHERE idempotency.expires_at <= ?"
)
_COMPLETE = (
    "UPDATE idempotency SET owner = NULL, body = ?, expires_at = ? WHERE scope = ? AND owner = ?"
)
# Copy the WAL into the database this often (in commits of this process), off the loop, or
# sooner when a quarter of the WAL's share of bytes has been written (StoreBounds.wal_bytes). Its second
# phase holds this worker's writes back for 5-15 ms.
_CHECKPOINT_EVERY = 1000
_SHM_BYTES = 64 * 1024  # the shared-memory file beside the WAL: 32 KiB per 4,000 pages
# Expired records deleted at most per claim that needs room: the claim's own cost stays small.
_EVICT_BATCH = 64
# How long a checkpoint waits for other workers' transactions before it gives up for now.
_CHECKPOINT_WAIT_MS = 100


_SETUP_TIMEOUT_S = 30.0
"""Opening waits this long for a lock: workers start together, and one creating the file or
switching it to WAL holds the others back for a moment."""


def _connect(
    path: Path, bounds: StoreBounds, *, busy_timeout_ms: int, autocheckpoint: bool
) -> sqlite3.Connection:
    db = sqlite3.connect(
        path, timeout=_SETUP_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    enable_wal(db)
    db.execute("PRAGMA synchronous=NORMAL")
    # A WAL file larger than this is cut back to it when it starts over: its disk use stays
    # bounded even after a burst, while the usual size is reused as it is.
    db.execute(f"PRAGMA journal_size_limit={bounds.wal_bytes}")
    page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
    db.execute(f"PRAGMA max_page_count={_max_pages(bounds, page_size)}")
    db.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    if not autocheckpoint:
        db.execute("PRAGMA wal_autocheckpoint=0")
    return db


def _max_pages(bounds: StoreBounds, page_size: int) -> int:
    # The WAL starts over at about a quarter of its share and is held to three quarters while
    # a checkpoint runs, but one batch of answers may cross that: it gets its share twice over.
    return max(16, (bounds.max_bytes - 2 * bounds.wal_bytes - _SHM_BYTES) // page_size)


class SqliteIdempotencyStore:
    name = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        bounds: StoreBounds | None = None,
        on_evicted: Callable[[str, int], None] | None = None,
        now: Callable[[], float] = time.time,
        retry_after_s: float = 5.0,
        faults: FaultPlan | None = None,
        connections: int = 1,
    ) -> None:
        """`on_evicted(reason, n)` counts deleted records: reason `expired` (the periodic
        purge) or `full` (deleted to make room for a claim). `connections`: as many as threads
        may wait on the file at once (the gateway's worker threads). `faults`: tests only, at
        the points `idempotency.commit` and `idempotency.mid_checkpoint`."""
        self.path = path
        self._faults = faults
        self.bounds = bounds or StoreBounds()
        self._on_evicted = on_evicted or (lambda reason, n: None)
        self._retry_after_s = retry_after_s
        self._now = now
        private_file(private_dir(path.parent) / path.name)
        with contextlib.closing(
            _connect(
                path,
                self.bounds,
                busy_timeout_ms=int(_SETUP_TIMEOUT_S * 1000),
                autocheckpoint=True,
            )
        ) as setup:
            setup.executescript(_SCHEMA)
            self._page_size = int(setup.execute("PRAGMA page_size").fetchone()[0])
        self._max_pages = _max_pages(self.bounds, self._page_size)
        self._loop_db = _connect(path, self.bounds, busy_timeout_ms=0, autocheckpoint=False)
        # Checkpoints have their own connection with a short busy timeout: this worker's writes
        # may be waiting for one, so it gives up soon when other workers keep the lock, and
        # tries again after the next _CHECKPOINT_EVERY commits.
        self._checkpoint_db = _connect(
            path, self.bounds, busy_timeout_ms=_CHECKPOINT_WAIT_MS, autocheckpoint=False
        )
        self._pool = ConnectionPool(
            lambda: _connect(path, self.bounds, busy_timeout_ms=10_000, autocheckpoint=True),
            connections,
        )
        self._batch: list[tuple[_Op, asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._commits = 0
        self._checkpoint: asyncio.Task[None] | None = None
        self._holding = False  # a checkpoint is holding this worker's writes back
        self._written = 0  # bytes written to the WAL since the last checkpoint began

    @property
    def commits(self) -> int:
        """Write transactions this store has committed; each may carry many requests' writes."""
        return self._commits

    def _in_pool(self, job: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `job` on a pooled connection (in a worker thread)."""
        with self._pool.connection() as db:
            return job(db)

    async def _write(self, op: _Op) -> Any:
        """Run `op` in the transaction of this turn of the event loop; its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._batch.append((op, future))
        if len(self._batch) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        if self._holding:
            return  # a checkpoint holds the write lock; the batch goes when it is done
        if self._checkpoint is not None and self._written >= self.bounds.wal_bytes // 2:
            return  # the WAL would outgrow its share before the checkpoint lets it start over
        batch, self._batch = self._batch, []
        try:
            results = _apply(self._loop_db, [op for op, _ in batch], self._faults)
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                task = asyncio.get_running_loop().create_task(self._flush_in_thread(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                self._fail(batch, exc)
            return
        except sqlite3.Error as exc:
            self._fail(batch, exc)
            return
        self._settle(batch, results)

    async def _flush_in_thread(self, batch: list[tuple[_Op, asyncio.Future[Any]]]) -> None:
        ops = [op for op, _ in batch]
        try:
            results = await run_blocking(
                lambda: self._in_pool(lambda db: _apply(db, ops, self._faults))
            )
        except sqlite3.Error as exc:
            self._fail(batch, exc)
            return
        self._settle(batch, results)

    def _settle(self, batch: list[tuple[_Op, asyncio.Future[Any]]], results: list[Any]) -> None:
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # its request may have been cancelled meanwhile
                future.set_result(result)
        self._commits += 1
        self._written += self._page_size * (1 + len(batch))  # a page per write, and the commit
        due = self._commits % _CHECKPOINT_EVERY == 0 or self._written >= self.bounds.wal_bytes // 4
        if due and self._checkpoint is None:
            self._written = 0
            self._checkpoint = asyncio.get_running_loop().create_task(self._wal_checkpoint())

    def _fail(self, batch: list[tuple[_Op, asyncio.Future[Any]]], exc: sqlite3.Error) -> None:
        for _, future in batch:
            if not future.done():
                error = StoreUnavailable(self.name, str(exc), self._retry_after_s)
                error.__cause__ = exc
                future.set_exception(error)

    async def _wal_checkpoint(self) -> None:
        try:
            # First the bulk of the copying, while this worker goes on writing...
            await run_blocking(self._checkpoint_now, "PASSIVE")
            if self._faults is not None:
                self._faults.hit(MID_CHECKPOINT)
            # ...then what was written meanwhile, with its writes held back so that the
            # checkpoint can finish and the next commit start the WAL over.
            self._holding = True
            await run_blocking(self._checkpoint_now, "RESTART")
        except sqlite3.Error:
            pass  # the next one catches up; a failed checkpoint loses nothing
        finally:
            self._holding = False
            self._checkpoint = None
            if self._batch:
                asyncio.get_running_loop().call_soon(self._flush)

    def _checkpoint_now(self, mode: str) -> None:
        self._checkpoint_db.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()

    # -- the protocol ----------------------------------------------------------------------------

    async def claim(
        self, scope: str, fingerprint: str, owner: str, pending_ttl_s: float
    ) -> Existing | None:
        now = self._now()
        room = _Room(self._max_pages, self._page_size, self.bounds.max_answer_bytes)

        def claim(db: sqlite3.Connection) -> Existing | _Full | None:
            return _claim(db, scope, fingerprint, owner, now, pending_ttl_s, room, self._evict)

        found = await self._write(claim)
        if isinstance(found, _Full):
            raise StoreFull(self.bounds.max_bytes, _retry_after(found.oldest_expiry - now))
        return cast(Existing | None, found)

    def _evict(self, db: sqlite3.Connection, now: float) -> int:
        evicted = _execute(
            db,
            "DELETE FROM idempotency WHERE scope IN (SELECT scope FROM idempotency "
            "WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)",
            (now, _EVICT_BATCH),
        )
        if evicted:
            self._on_evicted("full", evicted)
        return evicted

    async def renew(self, scope: str, owner: str, pending_ttl_s: float) -> None:
        args = (self._now() + pending_ttl_s, scope, owner)
        await self._write(
            lambda db: db.execute(
                "UPDATE idempotency SET expires_at = ? WHERE scope = ? AND owner = ?", args
            )
        )

    async def complete(self, scope: str, owner: str, body: bytes, retention_s: float) -> None:
        # Only over our own mark: if it lapsed and another worker took over, its answer wins.
        args = (body, self._now() + retention_s, scope, owner)
        self._written += len(body)
        try:
            await self._write(lambda db: db.execute(_COMPLETE, args))
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, sqlite3.OperationalError) and _is_full(exc.__cause__):
                # The last pages went meanwhile (the mark lapsed and was evicted, or the room
                # an answer was counted for did not hold its pages): a retry runs it again.
                raise StoreFull(self.bounds.max_bytes, self._retry_after_s) from None
            raise

    async def release(self, scope: str, owner: str) -> None:
        await self._write(
            lambda db: db.execute(
                "DELETE FROM idempotency WHERE scope = ? AND owner = ?", (scope, owner)
            )
        )

    async def purge_expired(self) -> int:
        # Possibly many rows: always in a thread.
        try:
            now = self._now()
            purged: int = await run_blocking(
                lambda: self._in_pool(
                    lambda db: _execute(db, "DELETE FROM idempotency WHERE expires_at <= ?", (now,))
                )
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(self.name, str(exc), self._retry_after_s) from exc
        if purged:
            self._on_evicted("expired", purged)
        return purged

    async def ping(self) -> None:
        try:
            self._loop_db.execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(self.name, str(exc), self._retry_after_s) from exc

    async def aclose(self) -> None:
        if self._checkpoint is not None:
            await self._checkpoint
        for task in list(self._tasks):
            await task
        self._checkpoint_db.close()
        self._pool.close()
        self._loop_db.close()

    def record(self, scope: str) -> tuple[str, str | None, bytes | None, float] | None:
        """(fingerprint, owner, body, expires_at) of a record: for operators and tests."""
        row = self._in_pool(
            lambda db: db.execute(
                "SELECT fingerprint, owner, body, expires_at FROM idempotency WHERE scope = ?",
                (scope,),
            ).fetchone()
        )
        return None if row is None else (row[0], row[1], row[2], row[3])


def _apply(db: sqlite3.Connection, ops: list[_Op], faults: FaultPlan | None) -> list[Any]:
    """Run `ops` in one write transaction: all of them or none."""
    db.execute("BEGIN IMMEDIATE")
    try:
        results = [op(db) for op in ops]
        if faults is not None:
            action = faults.hit(COMMIT)  # a crash does not return
            if action is not None:
                raise sqlite_error(action)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return results


@dataclass(frozen=True, slots=True)
class _Full:
    oldest_expiry: float


@dataclass(frozen=True, slots=True)
class _Room:
    """What a claim needs: room in the file's pages for one more answer beside those stored
    and one for each pending mark, whichever worker holds it."""

    max_pages: int
    page_size: int
    answer_bytes: int

    def short(self, db: sqlite3.Connection) -> bool:
        """Whether the file lacks that room now; in the claim's transaction, so no other
        worker can add a mark or an answer between this count and the claim's insert."""
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
        pending = int(
            db.execute("SELECT COUNT(*) FROM idempotency WHERE owner IS NOT NULL").fetchone()[0]
        )
        free_bytes = (self.max_pages - pages + free) * self.page_size
        return free_bytes < self.answer_bytes * (pending + 1)


def _claim(
    db: sqlite3.Connection,
    scope: str,
    fingerprint: str,
    owner: str,
    now: float,
    pending_ttl_s: float,
    room: _Room,
    evict: Callable[[sqlite3.Connection, float], int],
) -> Existing | _Full | None:
    if room.short(db):
        existing = _existing(db, scope, now)
        if existing is not None:
            return existing  # a repeat is answered however full the store is
        # Lapsed marks are evicted too (their expiry has passed), and hold room no more.
        while room.short(db):
            if not evict(db, now):
                oldest = db.execute("SELECT MIN(expires_at) FROM idempotency").fetchone()[0]
                return _Full(oldest if oldest is not None else now)
    # One statement for the usual case, a new key: it inserts the mark, or takes over a record
    # whose mark or retention has lapsed, and changes nothing when a live record is there.
    if db.execute(_CLAIM, (scope, fingerprint, owner, now + pending_ttl_s, now)).rowcount:
        return None
    return _existing(db, scope, now)


def _existing(db: sqlite3.Connection, scope: str, now: float) -> Existing | None:
    row = db.execute(
        "SELECT fingerprint, owner, body FROM idempotency WHERE scope = ? AND expires_at > ?",
        (scope, now),
    ).fetchone()
    if row is None:
        return None
    return Existing(row[0], None if row[1] is not None else bytes(row[2]))


def _is_full(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def _retry_after(seconds: float) -> float:
    # Until the oldest record expires and makes room, within reason.
    return min(3600.0, max(1.0, seconds))


def _execute(db: sqlite3.Connection, sql: str, args: tuple[object, ...]) -> int:
    return db.execute(sql, args).rowcount
