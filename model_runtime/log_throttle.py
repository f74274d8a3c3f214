"""Log lines for events a stranger can cause by the thousand (refused connections, malformed
requests): counted by kind, written at most once a second with how many there were.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

__all__ = ["INTERVAL_S", "LogThrottle"]

INTERVAL_S = 1.0
"""The most often one throttle reports."""


class LogThrottle:
    """Events counted by kind and reported at most once an INTERVAL_S: the first at once,
    those that follow it within the interval together when it ends, so that every event is in
    some line however many come."""

    def __init__(
        self, report: Callable[[dict[str, int]], None], monotonic: Callable[[], float]
    ) -> None:
        self._report = report
        self._monotonic = monotonic
        self._unreported: dict[str, int] = {}
        self._last_report = -math.inf
        self._pending: asyncio.TimerHandle | None = None

    def note(self, loop: asyncio.AbstractEventLoop, kind: str) -> None:
        self._unreported[kind] = self._unreported.get(kind, 0) + 1
        if self._pending is not None:
            return  # reported when the interval ends
        wait = self._last_report + INTERVAL_S - self._monotonic()
        if wait <= 0:
            self._flush()
        else:
            self._pending = loop.call_later(wait, self._flush)

    def _flush(self) -> None:
        self._pending = None
        counts, self._unreported = self._unreported, {}
        self._last_report = self._monotonic()
        self._report(counts)
