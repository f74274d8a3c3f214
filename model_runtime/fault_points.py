"""Fault points for tests: crash the process, or fail a write, the k-th time a named point is hit.

Off unless a daemon's `<PREFIX>FAULTS` variable is set, which only tests do; read once at start-up
by the daemon's command line and handed down. A part with no plan holds None and pays nothing.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

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


IO_ACTIONS = frozenset({Action.EIO, Action.ENOSPC})


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
    `crash` (the default), `eio` or `enospc` (at write points only).
    """

    def __init__(self, faults: Sequence[Fault], *, kill: Callable[[], None] = _kill_self) -> None:
        self.faults = tuple(faults)
        self._kill = kill
        self._hits: dict[str, int] = {}
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[FaultPlan], tuple[tuple[Fault, ...]]]:
        # Handed to a gateway's worker processes: the faults go, the counts start afresh.
        return (FaultPlan, (self.faults,))

    @classmethod
    def parse(
        cls,
        spec: str,
        points: Mapping[str, bool],
        *,
        variable: str = "",
        kill: Callable[[], None] = _kill_self,
    ) -> FaultPlan:
        """`points`: every point the daemon has, and whether it is a write (takes I/O actions).
        `kill`: what a crash does (SIGKILL this process; a test of the plan itself may raise)."""
        where = f"{variable}: " if variable else ""
        faults = []
        for item in (part.strip() for part in spec.split(",")):
            match = _ITEM.fullmatch(item)
            if match is None:
                raise FaultSpecError(
                    f"{where}{item!r} is not <point>:<k>[+|-<m>][:crash|eio|enospc]"
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
                    f"{where}{item!r}: the action must be crash, eio or enospc"
                ) from None
            if action in IO_ACTIONS and not points[point]:
                raise FaultSpecError(f"{where}{item!r}: {point} is not a write; it can only crash")
            faults.append(Fault(point, first, last, action))
        return cls(faults, kill=kill)

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str], variable: str, points: Mapping[str, bool]
    ) -> FaultPlan | None:
        """The plan `variable` holds, or None when it is unset or empty (always, outside tests)."""
        spec = environ.get(variable, "").strip()
        return cls.parse(spec, points, variable=variable) if spec else None

    def hit(self, point: str) -> Action | None:
        """Count a hit of `point`. A crash happens here (this call does not return); an I/O
        action is returned for the caller to fail its write with; None: carry on."""
        with self._lock:
            n = self._hits[point] = self._hits.get(point, 0) + 1
        for fault in self.faults:
            if fault.point == point and fault.covers(n):
                if fault.action is Action.CRASH:
                    # Straight to the file descriptor: no buffer is flushed on SIGKILL.
                    os.write(2, f"fault point {point}: hit {n}, crashing (SIGKILL)\n".encode())
                    self._kill()
                return fault.action
        return None

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
