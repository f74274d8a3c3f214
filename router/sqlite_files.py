"""The router's SQLite files: opening with durable pragmas (WAL, synchronous=FULL), versioned
migrations, quarantine of corrupt files, and `SqliteWorker`, the one thread that owns a connection
and groups commits. Used by the durable queue and the data budget.

Schema versions live in `PRAGMA user_version`; migration N (0-based) takes a file from version N to
N + 1 inside one transaction, so a crash mid-migration leaves the old version intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from model_runtime.fault_points import FaultPlan, sqlite_error
from model_runtime.private_files import private_dir, private_file
from model_runtime.sqlite_wal import enable_wal
from router.errors import DiskFull, QueueSchemaTooNew, StorageError

__all__ = [
    "STORES",
    "Migration",
    "OpenedDatabase",
    "SqliteWorker",
    "WriteHooks",
    "open_database",
    "storage_error",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

STORES = ("queue", "budget", "audit", "hard_examples")
"""The router's files, as StorageError, fault points and the storage_errors metric name them."""

Migration = Sequence[str]
"""The statements of one migration; run one by one so they share the migration's transaction."""


@dataclass
class OpenedDatabase:
    connection: sqlite3.Connection
    quarantined: Path | None = None
    """Where a corrupt file found at this path was moved, if one was."""
    problem: str = ""


def open_database(
    path: Path, migrations: Sequence[Migration], *, now: Callable[[], float]
) -> OpenedDatabase:
    """Open (creating if needed) and migrate the database at `path`; blocking.

    A file SQLite reports as corrupt or not a database, or one failing `PRAGMA quick_check`, is
    moved aside (with its -wal and -shm files) to `<name>.corrupt-<UTC timestamp>` and a fresh
    database is created in its place. A file from a newer schema is not corrupt: QueueSchemaTooNew
    is raised and nothing moves. Other errors (permissions, a lock held elsewhere) are raised.
    """
    private_dir(path.parent)
    problem = _check(path, len(migrations)) if path.exists() else None
    moved_to = None if problem is None else _quarantine(path, now())
    private_file(path)  # before SQLite makes it: its -wal and -shm then get the same 0600
    return OpenedDatabase(_open(path, migrations), moved_to, problem or "")


def _check(path: Path, supported: int) -> str | None:
    """What is wrong with the file at `path`, or None; read-only, so it changes nothing on disk."""
    # A read-write connection would checkpoint the WAL into a damaged file and delete the WAL
    # when it closes; a read-only one leaves both exactly as found.
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    try:
        check = [str(row[0]) for row in conn.execute("PRAGMA quick_check").fetchall()]
        if check != ["ok"]:
            return "quick_check: " + "; ".join(check[:3])
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > supported:
            raise QueueSchemaTooNew(str(path), version, supported)
        return None
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            return str(exc)
        raise
    finally:
        conn.close()


def _open(path: Path, migrations: Sequence[Migration]) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if enable_wal(conn).lower() != "wal":
            raise sqlite3.OperationalError("could not switch the journal to WAL")
        # FULL: every commit fsyncs the WAL, so an acknowledged commit survives a power cut.
        conn.execute("PRAGMA synchronous = FULL")
        for target in range(version, len(migrations)):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in migrations[target]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target + 1}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return conn
    except BaseException:
        conn.close()
        raise


def _quarantine(path: Path, wall: float) -> Path:
    stamp = datetime.fromtimestamp(wall, UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
        n += 1
    # The -wal keeps its pairing under the new name, so the quarantined copy can still be opened
    # for forensics with whatever committed frames it holds.
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        if side.exists():
            os.replace(side, f"{target}{suffix}")
    os.replace(path, target)
    return target


@dataclass(frozen=True, slots=True)
class WriteHooks:
    """What the owner of a SqliteWorker hands it about failed writes."""

    on_error: Callable[[StorageError], None] | None = None
    """Hears of every write that failed (the error says which store and why): for metrics."""
    faults: FaultPlan | None = None
    """Tests only: fail or crash at the k-th commit, the point `<store>.commit`."""


@dataclass
class _Job(Generic[T]):
    fn: Callable[[sqlite3.Connection], T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    then: Callable[[asyncio.Future[T]], None] | None = None
    outcome: tuple[bool, Any] = field(default=(False, None))


_STOP = object()


class SqliteWorker:
    """One thread owning one SQLite connection; the only door to it from async code.

    Jobs submitted while a commit is in progress queue up and then run together in the next
    transaction, which is committed once (group commit): under load one fsync acknowledges many
    jobs, idle a lone job commits at once. Each job's future resolves only after that commit.
    Each job runs in a savepoint, so one that raises is undone and fails alone; a failed COMMIT
    fails the whole group, and `on_rollback` lets the owner resynchronise its in-memory state.
    Jobs should change the owner's in-memory state only after their last statement.
    """

    def __init__(
        self,
        name: str,
        *,
        store: str = "",
        max_group: int = 1024,
        on_commit: Callable[[], None] | None = None,
        on_rollback: Callable[[sqlite3.Connection], None] | None = None,
        hooks: WriteHooks | None = None,
    ) -> None:
        """`store` names the file in errors, metrics and fault points (queue, budget...)."""
        self.name = name
        self.store = store or name
        self.max_group = max_group
        self.on_commit = on_commit
        self.on_rollback = on_rollback
        hooks = hooks or WriteHooks()
        self.on_error = hooks.on_error
        self._faults = hooks.faults
        self._fault_point = f"{self.store}.commit"
        self.commits = 0
        """Transactions that wrote something: the number of durable commits (fsyncs) made."""
        self.jobs = 0
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closing = False

    async def start(self, opener: Callable[[], OpenedDatabase]) -> OpenedDatabase:
        """Start the thread, open the database on it with `opener`, then serve jobs."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[OpenedDatabase] = loop.create_future()

        def run() -> None:
            try:
                opened = opener()
            except BaseException as exc:
                failure = storage_error(self.store, exc) if isinstance(exc, sqlite3.Error) else exc
                loop.call_soon_threadsafe(_settle, ready, (False, failure))
                return
            loop.call_soon_threadsafe(_settle, ready, (True, opened))
            self._serve(opened.connection)

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        return await ready

    def submit(
        self,
        fn: Callable[[sqlite3.Connection], T],
        then: Callable[[asyncio.Future[T]], None] | None = None,
    ) -> asyncio.Future[T]:
        """Queue `fn(connection)` for the next group; the future resolves once it is committed.

        `then(future)` runs on the event loop as soon as it resolves, without a turn of the loop
        in between (a done-callback would wait for the next one).
        """
        if self._closing or self._thread is None or not self._thread.is_alive():
            raise RuntimeError(f"{self.name} is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn, future, loop, then))
        return future

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` in the next group transaction; return once it is committed."""
        return await self.submit(fn)

    async def close(self) -> None:
        """Finish the jobs already submitted, close the connection, stop the thread."""
        thread = self._thread
        if thread is None:
            return
        # Nothing may queue up behind the stop marker: it would never run.
        self._closing = True
        self._queue.put(_STOP)
        await asyncio.to_thread(thread.join)
        self._thread = None

    def _serve(self, conn: sqlite3.Connection) -> None:
        stopping = False
        try:
            while not stopping:
                first = self._queue.get()
                if first is _STOP:
                    break
                group: list[_Job[Any]] = [first]  # type: ignore[list-item]
                while len(group) < self.max_group:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        stopping = True
                        break
                    group.append(nxt)  # type: ignore[arg-type]
                self._run_group(conn, group)
        finally:
            conn.close()

    def _run_group(self, conn: sqlite3.Connection, group: list[_Job[Any]]) -> None:
        if conn.in_transaction:  # a failed group whose rollback failed too: undo it first
            self._roll_back(conn)
        before = conn.total_changes
        # A lone job needs no savepoint: if it fails, the whole transaction is its own.
        alone = len(group) == 1
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in group:
                if not alone:
                    conn.execute("SAVEPOINT job")
                try:
                    job.outcome = (True, job.fn(conn))
                except Exception as exc:
                    if not conn.in_transaction:
                        raise  # SQLite rolled the whole group back (disk full, I/O error)
                    conn.execute("ROLLBACK" if alone else "ROLLBACK TO job")
                    job.outcome = (False, self._storage_error(exc))
                if not alone:
                    conn.execute("RELEASE job")
            wrote = conn.in_transaction and conn.total_changes != before
            if wrote and self._faults is not None:
                action = self._faults.hit(self._fault_point)  # a crash does not return
                if action is not None:
                    raise sqlite_error(action)
            if conn.in_transaction:
                conn.execute("COMMIT")
        except BaseException as exc:
            self._roll_back(conn)
            failure = self._storage_error(exc)
            for job in group:
                job.outcome = (False, failure)
        else:
            self.commits += wrote
            if self.on_commit is not None:
                self.on_commit()
        self.jobs += len(group)
        # One wake-up per event loop for the whole group, not one per job.
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job[Any]]] = {}
        for job in group:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed while the job ran
                loop.call_soon_threadsafe(_settle_all, jobs)

    def _roll_back(self, conn: sqlite3.Connection) -> None:
        """After a failed group: undo it and resynchronise the owner. Neither may kill the
        thread: on a failing disk they can fail too, and the next group tries again."""
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if self.on_rollback is not None:
                self.on_rollback(conn)
        except sqlite3.Error as exc:
            log.warning("%s: could not roll back a failed write: %s", self.name, exc)

    def _storage_error(self, exc: BaseException) -> BaseException:
        """SQLite's errors as the router's StorageError (counted); any other error as it is."""
        if not isinstance(exc, sqlite3.Error):
            return exc
        error = storage_error(self.store, exc)
        if self.on_error is not None:
            self.on_error(error)
        return error


def storage_error(store: str, exc: sqlite3.Error) -> StorageError:
    """`exc`, raised by SQLite on `store`'s file, as DiskFull or StorageError, caused by it."""
    full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    error = (DiskFull if full else StorageError)(store, str(exc))
    error.__cause__ = exc
    return error


def _settle(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.cancelled():
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def _settle_all(jobs: list[_Job[Any]]) -> None:
    for job in jobs:
        _settle(job.future, job.outcome)
        if job.then is not None:
            job.then(job.future)
