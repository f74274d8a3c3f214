"""`edge-agent queue status | list | show TICKET | purge --expired`: look into a site's queue.

Works while the agent runs: reads go through a read-only SQLite connection (WAL lets readers
in beside the writer) and `purge` takes SQLite's write lock like the agent does, waiting its turn.
It leaves the running agent's figures true: it deletes only rows they no longer count (see PURGED).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from edge_agent.settings import SettingsError, load_settings
from model_runtime.command_line import EXIT_CODES_HELP
from router.config import QUEUE_FILE
from router.durable_queue import ROW_OVERHEAD_BYTES
from router.queue_schema import QUEUE_MIGRATIONS, ItemState

__all__ = ["queue_app"]

queue_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Inspect the durable queue, also while the agent runs; purge asks before deleting.",
)

StateDirOpt = Annotated[
    Path | None,
    typer.Option(help="The agent's state directory (default as serve: var/edge-agent)."),
]
ConfigOpt = Annotated[
    Path | None, typer.Option(help="The agent's TOML config; its state_dir is used.")
]
WAITING = (ItemState.PENDING.value, ItemState.IN_FLIGHT.value)
PURGED = "state = 'expired' AND payload_bytes = 0 AND result_bytes = 0"
"""The rows purge deletes, beside a running agent that keeps its queue's bytes and end counts in
memory (DurableQueue) rather than re-reading them. An expired row holds no payload and no result,
so it accounts for no bytes, and the end counts live in the counters table: deleting it changes
none of those figures. Testing the bytes keeps that true should an expired row ever hold some."""
BUSY_TIMEOUT_S = 10.0
"""How long purge waits for the agent to finish a write (its commits take milliseconds)."""


class QueueFileError(Exception):
    """The queue file is missing, not a queue, or from a newer edge-agent."""


def _queue_path(state_dir: Path | None, config: Path | None) -> Path:
    try:
        settings = load_settings(config, state_dir=state_dir)
    except SettingsError as exc:
        _fail(f"invalid settings: {exc}", 2)
    return settings.state_dir / QUEUE_FILE


@contextlib.contextmanager
def _connect(path: Path, *, write: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection to an existing queue file; read-only unless `write`; never creates one."""
    if not path.is_file():
        raise QueueFileError(f"no queue file at {path} (has an agent run with this state dir?)")
    mode = "rw" if write else "ro"
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode={mode}",
        uri=True,
        timeout=BUSY_TIMEOUT_S,
        isolation_level=None,
    )
    try:
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            raise QueueFileError(f"cannot read {path}: {exc}") from None
        if version > len(QUEUE_MIGRATIONS):
            raise QueueFileError(
                f"{path} has queue schema v{version}; this edge-agent knows up to "
                f"v{len(QUEUE_MIGRATIONS)}: use the edge-agent that wrote it"
            )
        if version == 0:
            raise QueueFileError(f"{path} is not a queue file (no schema)")
        if write:
            conn.execute("PRAGMA synchronous = FULL")  # as the agent: a commit survives a power cut
        yield conn
    finally:
        conn.close()
        _keep_owner(path)


def _keep_owner(path: Path) -> None:
    """Give the -wal and -shm files SQLite made for us back to the queue's owner.

    Even a read-only connection creates them when the agent is stopped; made by root, the
    agent's own user could not open them, and the agent would not start.
    """
    if os.geteuid() != 0:
        return
    owner = path.stat()
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        with contextlib.suppress(FileNotFoundError):
            if side.stat().st_uid != owner.st_uid or side.stat().st_gid != owner.st_gid:
                os.chown(side, owner.st_uid, owner.st_gid)


@queue_app.command(epilog=EXIT_CODES_HELP)
def status(state_dir: StateDirOpt = None, config: ConfigOpt = None) -> None:
    """Items by state and priority, the oldest waiting item, disk use, totals since creation."""
    path = _queue_path(state_dir, config)
    now = time.time()
    with _guard(), _connect(path) as conn:
        by_state = dict(conn.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
        by_priority = dict(
            conn.execute(
                "SELECT priority, COUNT(*) FROM items WHERE state IN (?, ?) GROUP BY priority",
                WAITING,
            ).fetchall()
        )
        oldest, next_expiry, past_ttl = conn.execute(
            "SELECT MIN(enqueued_at), MIN(expires_at), SUM(expires_at <= ?) FROM items"
            " WHERE state = 'pending'",
            (now,),
        ).fetchone()
        # The agent's own accounting (DurableQueue), compared with its disk cap.
        used = conn.execute(
            "SELECT COALESCE(SUM(payload_bytes + result_bytes"
            " + CASE WHEN finished_at IS NULL THEN ? ELSE 0 END), 0) FROM items",
            (ROW_OVERHEAD_BYTES,),
        ).fetchone()[0]
        totals = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    files = [path, Path(f"{path}-wal")]
    quarantined = sorted(path.parent.glob(f"{path.name}.corrupt-*"))

    console = Console()
    console.print(f"queue [bold]{path}[/bold]")
    states = Table("state", "items", title="items now")
    for state in ItemState:
        states.add_row(state.value, str(by_state.get(state.value, 0)))
    console.print(states)
    waiting = Table(
        "priority", "waiting items", title="waiting (pending and in flight; priority 1 first)"
    )
    for p in sorted(by_priority):
        waiting.add_row(str(p), str(by_priority[p]))
    if not by_priority:
        waiting.add_row("—", "0")
    console.print(waiting)
    facts = Table("", "", show_header=False, title="figures")
    facts.add_row("oldest waiting item", "none" if oldest is None else f"{_age(now - oldest)} old")
    facts.add_row("next expiry", "none" if next_expiry is None else _until(next_expiry - now))
    facts.add_row("waiting past their TTL (the agent expires them)", str(past_ttl or 0))
    facts.add_row("accounted bytes (vs queue_cap_bytes)", f"{used:,}")
    facts.add_row("file bytes (database + WAL)", f"{sum(_size(f) for f in files):,}")
    for name in ("delivered", "expired", "dropped", "rejected", "admission_rejected"):
        facts.add_row(f"{name} since the file was created", f"{int(totals.get(name, 0)):,}")
    facts.add_row("quarantined files beside it", "\n".join(q.name for q in quarantined) or "none")
    console.print(facts)


@queue_app.command("list", epilog=EXIT_CODES_HELP)
def list_items(
    state: Annotated[
        list[ItemState] | None,
        typer.Option(help="Only items in this state (repeatable; default: pending, in_flight)."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 50,
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Items, waiting ones first by priority then age (the drain order, before ageing)."""
    path = _queue_path(state_dir, config)
    states = [s.value for s in state] if state else list(WAITING)
    now = time.time()
    marks = ", ".join("?" * len(states))
    with _guard(), _connect(path) as conn:
        total = conn.execute(
            f"SELECT COUNT(*) FROM items WHERE state IN ({marks})", states
        ).fetchone()[0]
        rows = conn.execute(
            "SELECT ticket, model, state, priority, enqueued_at, expires_at, attempts,"
            f" finished_at, last_error FROM items WHERE state IN ({marks})"
            " ORDER BY finished_at IS NOT NULL, priority, enqueued_at, seq LIMIT ?",
            (*states, limit),
        ).fetchall()
    table = Table(title=f"{len(rows)} of {total} item(s) in state {', '.join(states)}")
    table.add_column("ticket", no_wrap=True)  # whole, to copy into `queue show`
    for column in ("model", "state", "priority", "age", "expires", "attempts", "last error"):
        table.add_column(column)
    for ticket, model, st, priority, enqueued, expires, attempts, finished, error in rows:
        ends = "—" if finished is not None else _until(expires - now)
        table.add_row(
            ticket, model, st, str(priority), _age(now - enqueued), ends, str(attempts), error or ""
        )
    Console().print(table)


@queue_app.command(epilog=EXIT_CODES_HELP)
def show(
    ticket: Annotated[str, typer.Argument(help="The ticket (the request's id) to show.")],
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """One item: its state, times, attempts, last error and sizes (never its payload)."""
    path = _queue_path(state_dir, config)
    now = time.time()
    with _guard(), _connect(path) as conn:
        row = conn.execute(
            "SELECT ticket, model, state, priority, enqueued_at, expires_at, attempts,"
            " lease_until, finished_at, last_error, payload_bytes, result_bytes, end_seq"
            " FROM items WHERE ticket = ?",
            (ticket,),
        ).fetchone()
    if row is None:
        _fail(f"ticket {ticket!r} is not in {path} (never queued here, or purged)", 1)
    (_, model, st, priority, enqueued, expires, attempts, lease, finished, error, payload,
     result, end_seq) = row  # fmt: skip
    table = Table("field", "value", title=f"ticket {ticket}")
    table.add_row("model", model)
    table.add_row("state", st)
    table.add_row("priority", str(priority))
    table.add_row("enqueued", f"{_when(enqueued)} ({_age(now - enqueued)} ago)")
    table.add_row("expires", f"{_when(expires)} ({_until(expires - now)})")
    table.add_row("attempts before this one", str(attempts))
    if lease is not None:
        table.add_row("leased until", _when(lease))
    if finished is not None:
        table.add_row("ended", f"{_when(finished)} ({_age(now - finished)} ago)")
        table.add_row("end number (watch cursor)", str(end_seq))
    table.add_row("last error", error or "")
    table.add_row("payload bytes", f"{payload:,}")
    table.add_row("result bytes", f"{result:,}")
    Console().print(table)


@queue_app.command(epilog=EXIT_CODES_HELP)
def purge(
    expired: Annotated[
        bool, typer.Option("--expired", help="Delete items that ended because their TTL passed.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Delete ended items now rather than after the agent's retention; asks first."""
    if not expired:
        _fail("say what to purge: --expired", 2)
    path = _queue_path(state_dir, config)
    with _guard(), _connect(path, write=True) as conn:
        count, last = conn.execute(
            f"SELECT COUNT(*), MAX(end_seq) FROM items WHERE {PURGED}"
        ).fetchone()
        if count == 0:
            typer.echo(f"no expired items in {path}; nothing changed")
            return
        question = f"Delete {count} expired item(s) from {path}? Their tickets will read as unknown"
        if not yes and not typer.confirm(question, default=False):
            typer.echo("nothing changed")
            raise typer.Exit(1)
        # BEGIN IMMEDIATE takes the write lock as the agent's own transactions do, waiting up
        # to BUSY_TIMEOUT_S for a commit in progress; only the items counted above go.
        conn.execute("BEGIN IMMEDIATE")
        deleted = conn.execute(
            f"DELETE FROM items WHERE {PURGED} AND end_seq <= ?", (last,)
        ).rowcount
        conn.execute("COMMIT")
    typer.echo(f"deleted {deleted} expired item(s) from {path}")


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """Queue file problems become one line on stderr and exit code 1."""
    try:
        yield
    except QueueFileError as exc:
        _fail(str(exc), 1)
    except sqlite3.Error as exc:  # e.g. still locked after BUSY_TIMEOUT_S
        _fail(f"queue file: {exc}", 1)


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"edge-agent: {message}", err=True)
    raise typer.Exit(code)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _until(seconds: float) -> str:
    return f"in {_age(seconds)}" if seconds > 0 else f"{_age(-seconds)} ago"
