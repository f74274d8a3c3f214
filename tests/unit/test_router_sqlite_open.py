"""Processes opening a new router file together each switch it to WAL and open it: SQLite does
not call the busy handler for that switch, so without model_runtime.sqlite_wal's retry one of
them got "database is locked" (this test failed 20 runs in 20). The agent's state-dir lock keeps
a second agent off its files, and a reader (`edge-agent queue status`) never switches, so this
guards the opener itself. Real processes, forked, and real files.
"""

from __future__ import annotations

from pathlib import Path

from router.sqlite_files import open_database
from tests.support.together import run_together

OPENERS = 4
STARTS = 60


def open_new_file(where: Path) -> None:
    # No migrations: two openers would both run a new file's first one (the agent's lock rules
    # that out); the switch to WAL is what is tested.
    db = open_database(where / "queue.sqlite", (), now=lambda: 0.0).connection
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_openers_of_a_new_file_together_all_open_it_in_wal_mode(tmp_path: Path) -> None:
    assert run_together(open_new_file, tmp_path, processes=OPENERS, times=STARTS) == []
