"""A pytest plugin: no process started by the suite may outlive it.

After each test it notes every process descended from pytest (daemons, their workers, redis,
MLServer...) with the test during which it was first seen. At the end of the session, once
every fixture has been torn down, any of them still running fails the run, naming that test,
and is then killed so that nothing is left behind. Read from /proc: Linux only.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["LeakCheck", "ProcessInfo", "descendants", "read_process"]

PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    ppid: int
    state: str
    start_ticks: int
    """Start time in clock ticks since boot: with the pid, names one process even if the pid
    is reused later."""
    command: str


def read_process(pid: int) -> ProcessInfo | None:
    """The process `pid`, or None if it is gone (or a zombie, which no longer runs)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain ") ".
    fields = stat[stat.rindex(")") + 2 :].split()
    state, ppid, start = fields[0], int(fields[1]), int(fields[19])
    if state in ("Z", "X"):
        return None
    command = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    return ProcessInfo(pid, ppid, state, start, command or stat.split()[1])


def descendants(root: int) -> list[ProcessInfo]:
    """Every live process whose chain of parents leads to `root`."""
    children: dict[int, list[ProcessInfo]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            info = read_process(int(entry.name))
            if info is not None:
                children.setdefault(info.ppid, []).append(info)
    found: list[ProcessInfo] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


class LeakCheck:
    """Registered by tests/conftest.py; see the module docstring."""

    def __init__(self) -> None:
        self.first_seen: dict[tuple[int, int], tuple[ProcessInfo, str]] = {}

    def _note(self, when: str) -> None:
        for info in descendants(os.getpid()):
            self.first_seen.setdefault((info.pid, info.start_ticks), (info, when))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, None, None]:
        yield
        self._note(item.nodeid)

    def leaked(self) -> list[tuple[ProcessInfo, str]]:
        """The noted processes that still run (the same pid and start time)."""
        self._note("session teardown")
        alive = []
        for (pid, start), (info, test) in self.first_seen.items():
            now = read_process(pid)
            if now is not None and now.start_ticks == start:
                alive.append((info, test))
        return alive

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        leaked = self.leaked()
        if not leaked:
            return
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [
            f"process {info.pid} ({info.command[:120]}) outlived the test suite; "
            f"first seen after {test}"
            for info, test in leaked
        ]
        if reporter is not None:
            reporter.write("\n")  # after the progress dots of -q
        for line in lines:
            if reporter is not None:
                reporter.write_line(f"LEAKED {line}", red=True, bold=True)
            else:
                print(f"LEAKED {line}")
        for info, _ in leaked:
            with contextlib.suppress(OSError):  # it may have ended meanwhile
                os.kill(info.pid, signal.SIGKILL)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
