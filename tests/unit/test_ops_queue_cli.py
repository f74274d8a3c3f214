"""`edge-agent queue ...` on queue files made by DurableQueue itself: files it must refuse,
a purge that is declined, and side files that stay the agent's (the running agent is in
tests/integration/test_ops_queue.py)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edge_agent.queue_cli import queue_app
from router.durable_queue import DurableQueue


def cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(queue_app, name="queue")
    return app


def queue(state: Path, *args: str, answer: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli(), ["queue", *args, "--state-dir", str(state)], input=answer)
    return result.exit_code, result.output


def fill(path: Path, expired: int, waiting: int) -> None:
    async def run() -> None:
        q = await DurableQueue.open(path)
        for i in range(expired):
            await q.enqueue(f"old-{i}", "digits-large", b"x", ttl_s=1e-6)
        await q.expire_due(now=q.clock.wall() + 1)
        for i in range(waiting):
            await q.enqueue(f"new-{i}", "digits-large", b"x", ttl_s=3600)
        await q.close()

    asyncio.run(run())


def rows(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        return sorted(conn.execute("SELECT ticket, state FROM items").fetchall())


@pytest.fixture(autouse=True)
def _wide_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


def test_declined_purge_changes_nothing_and_accepted_one_only_expired(tmp_path: Path) -> None:
    fill(tmp_path / "queue.sqlite", expired=2, waiting=1)
    before = rows(tmp_path / "queue.sqlite")
    code, out = queue(tmp_path, "purge", "--expired", answer="\n")  # the default is no
    assert code == 1
    assert "nothing changed" in out
    assert rows(tmp_path / "queue.sqlite") == before
    code, out = queue(tmp_path, "purge", "--expired", answer="y\n")
    assert code == 0
    assert "deleted 2 expired item(s)" in out
    assert rows(tmp_path / "queue.sqlite") == [("new-0", "pending")]


def test_purge_needs_to_be_told_what(tmp_path: Path) -> None:
    fill(tmp_path / "queue.sqlite", expired=1, waiting=0)
    code, out = queue(tmp_path, "purge", "--yes")
    assert code == 2
    assert "say what to purge: --expired" in out
    assert rows(tmp_path / "queue.sqlite") == [("old-0", "expired")]


def test_files_that_are_not_this_agents_queue_are_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer"
    newer.mkdir()
    fill(newer / "queue.sqlite", expired=0, waiting=1)
    with sqlite3.connect(newer / "queue.sqlite") as conn:
        conn.execute("PRAGMA user_version = 99")
    code, out = queue(newer, "status")
    assert code == 1
    assert "queue schema v99" in out

    other = tmp_path / "other"
    other.mkdir()
    sqlite3.connect(other / "queue.sqlite").close()
    code, out = queue(other, "list")
    assert code == 1
    assert "not a queue file" in out

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "queue.sqlite").write_bytes(b"not a database at all" * 100)
    code, out = queue(garbage, "show", "t")
    assert code == 1
    assert "cannot read" in out


def test_status_of_an_empty_queue(tmp_path: Path) -> None:
    fill(tmp_path / "queue.sqlite", expired=0, waiting=0)
    code, out = queue(tmp_path, "status")
    assert code == 0, out
    assert "oldest waiting item" in out
    assert "none" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as another user")
def test_root_leaves_the_side_files_to_the_queues_owner(tmp_path: Path) -> None:
    # With the agent stopped, even a read-only look creates queue.sqlite-wal and -shm; made by
    # root they would lock the agent's own user out of its queue.
    path = tmp_path / "queue.sqlite"
    fill(path, expired=1, waiting=1)
    for side in tmp_path.glob("queue.sqlite-*"):
        side.unlink()
    os.chown(path, 65534, 65534)
    code, out = queue(tmp_path, "status")
    assert code == 0, out
    sides = list(tmp_path.glob("queue.sqlite-*"))
    assert sides  # SQLite made them...
    for side in sides:  # ...and they are the owner's
        assert (side.stat().st_uid, side.stat().st_gid) == (65534, 65534), side
