"""Fault points for tests: crash the process, fail a write, or hold, at a named point's k-th hit.

Off unless a daemon's `<PREFIX>FAULTS` variable is set, which only tests do; read once at start-up
by the daemon's command line and handed down. A part with no plan holds None and pays nothing.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

__all__ = ["Action", "Fault", "FaultPlan", "FaultSpecError", "sqlite_error"]


class FaultSpecError(ValueError):
    """The fault switch cannot be read; the message names the variable and the problem."""


class Action(StrEnum):
    CRASH = "crash"
    """SIGKILL the process itself: a power cut, as far as it can tell."""
    EIO = "eio"
    """The write fails as a failing disk fails it (EIO; SQLite's SQLITE_IOERR)."""
    ENOSPC = "enospc"
    """The write fails as a full disk fails it (ENOSPC; SQLite's SQLITE_FULL)."""
    HOLD = "hold"
    """Wait until the release file exists, then carry on: a step as slow as the test wants."""


IO_ACTIONS = frozenset({Action.EIO, Action.ENOSPC})
RELEASE_SUFFIX = "_RELEASE"
"""`<variable>_RELEASE` names the file whose creation ends every hold."""
HOLD_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Fault:
    """`action` at the hits `first`..`last` of `point` (1-based; `last` None: every later one)."""

    point: str
    first: int
    last: int | None
    action: Action

    def covers(self, hit: int) -> bool:
        return self.first <= hit and (self.last is None or hit <= self.last)


_ITEM = re.compile(
    r"(?P<point>[a-z_.]+):(?P<first>[1-9][0-9]*)(?P<range>\+|-[1-9][0-9]*)?(?::(?P<action>[a-z]+))?"
)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class FaultPlan:
    """What to do at which hits of which points. Hits are counted per process (a gateway worker
    restarted by its supervisor counts from zero), from any thread.

    The switch: a comma-separated list of `<point>:<k>[+|-<m>][:<action>]`: the k-th hit only,
    the k-th and every later one (`+`, a persistent fault), or hits k to m; the action is
    `crash` (the default), `hold` (until the file `release` exists), `eio` or `enospc` (at
    write points only).
    """

    def __init__(
        self,
        faults: Sequence[Fault],
        release: Path | None = None,
        *,
        kill: Callable[[], None] = _kill_self,
    ) -> None:
        self.faults = tuple(faults)
        self.release = release
        self._kill = kill
        self._hits: dict[str, int] = {}
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[FaultPlan], tuple[tuple[Fault, ...], Path | None]]:
        # Handed to a gateway's worker processes: the faults go, the counts start afresh.
        return (FaultPlan, (self.faults, self.release))

    @classmethod
    def parse(
        cls,
        spec: str,
        points: Mapping[str, bool],
        *,
        variable: str = "",
        release: Path | None = None,
        kill: Callable[[], None] = _kill_self,
    ) -> FaultPlan:
        """`points`: every point the daemon has, and whether it is a write (takes I/O actions).
        `release`: the file whose creation ends a hold (None: holds are refused).
        `kill`: what a crash does (SIGKILL this process; a test of the plan itself may raise)."""
        where = f"{variable}: " if variable else ""
        faults = []
        for item in (part.strip() for part in spec.split(",")):
            match = _ITEM.fullmatch(item)
            if match is None:
                raise FaultSpecError(
                    f"{where}{item!r} is not <point>:<k>[+|-<m>][:crash|hold|eio|enospc]"
                )
            point = match["point"]
            if point not in points:
                raise FaultSpecError(
                    f"{where}unknown point {point!r}; known: {', '.join(sorted(points))}"
                )
            first = int(match["first"])
            span = match["range"]
            last = None if span == "+" else int(span[1:]) if span else first
            if last is not None and last < first:
                raise FaultSpecError(f"{where}{item!r}: the range ends before it starts")
            try:
                action = Action(match["action"] or Action.CRASH)
            except ValueError:
                raise FaultSpecError(
                    f"{where}{item!r}: the action must be crash, hold, eio or enospc"
                ) from None
            if action in IO_ACTIONS and not points[point]:
                raise FaultSpecError(
                    f"{where}{item!r}: {point} is not a write; it can only crash or hold"
                )
            if action is Action.HOLD and release is None:
                raise FaultSpecError(
                    f"{where}{item!r}: a hold needs {variable or '<variable>'}{RELEASE_SUFFIX}, "
                    "the file whose creation ends it"
                )
            faults.append(Fault(point, first, last, action))
        return cls(faults, release, kill=kill)

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str], variable: str, points: Mapping[str, bool]
    ) -> FaultPlan | None:
        """The plan `variable` holds, or None when it is unset or empty (always, outside tests)."""
        spec = environ.get(variable, "").strip()
        if not spec:
            return None
        release = environ.get(variable + RELEASE_SUFFIX, "").strip()
        return cls.parse(
            spec, points, variable=variable, release=Path(release) if release else None
        )

    def hit(self, point: str) -> Action | None:
        """Count a hit of `point`. A crash happens here (this call does not return), a hold
        waits here; an I/O action is returned for the caller to fail its write with; None:
        carry on."""
        with self._lock:
            n = self._hits[point] = self._hits.get(point, 0) + 1
        for fault in self.faults:
            if fault.point == point and fault.covers(n):
                if fault.action is Action.CRASH:
                    # Straight to the file descriptor: no buffer is flushed on SIGKILL.
                    os.write(2, f"fault point {point}: hit {n}, crashing (SIGKILL)\n".encode())
                    self._kill()
                if fault.action is Action.HOLD:
                    self._hold(point, n)
                    return None
                return fault.action
        return None

    def _hold(self, point: str, hit: int) -> None:
        assert self.release is not None  # parse refuses a hold without one
        os.write(
            2,
            f"fault point {point}: hit {hit}, process {os.getpid()} holding until "
            f"{self.release} exists\n".encode(),
        )
        parent = os.getppid()
        while not self.release.exists():
            if os.getppid() != parent:
                # Orphaned (its supervisor or the test was killed): end rather than linger.
                self._kill()
            time.sleep(HOLD_POLL_S)

    def hits(self, point: str) -> int:
        with self._lock:
            return self._hits.get(point, 0)


def sqlite_error(action: Action) -> sqlite3.OperationalError:
    """What SQLite raises when a write meets `action` (EIO or ENOSPC) on a real disk."""
    if action is Action.ENOSPC:
        error = sqlite3.OperationalError("database or disk is full")
        code, name = sqlite3.SQLITE_FULL, "SQLITE_FULL"
    else:
        error = sqlite3.OperationalError("disk I/O error")
        code, name = sqlite3.SQLITE_IOERR, "SQLITE_IOERR"
    error.sqlite_errorcode = code
    error.sqlite_errorname = name
    return error
