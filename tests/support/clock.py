"""A clock for integration tests that must cover hours or days: real time that the test can
also move forward at once, waking whatever sleeps on it.

FakeClock (router.clock) moves only when told to, and its `sleep` moves it, which suits unit
tests of one component. With real sockets and several tasks sleeping at once, time must pass
by itself (an HTTP exchange takes real milliseconds) and jump when the test says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

__all__ = ["JumpClock"]


class JumpClock:
    """The system clock plus an offset that only grows; `jump` adds to it.

    `sleep(s)` ends once `s` seconds have passed on this clock, by waiting or by jumps; use it
    from one event loop (the one the router runs on).
    """

    def __init__(self, wall_start: float) -> None:
        self._wall_offset = wall_start - time.time()
        self._offset = 0.0
        self._jumped = asyncio.Event()

    def monotonic(self) -> float:
        return time.monotonic() + self._offset

    def wall(self) -> float:
        return time.time() + self._wall_offset + self._offset

    def jump(self, seconds: float) -> None:
        """Move both clocks forward by `seconds` at once."""
        if seconds < 0:
            raise ValueError(f"seconds: a clock never goes back, got {seconds}")
        self._offset += seconds
        jumped, self._jumped = self._jumped, asyncio.Event()
        jumped.set()

    async def sleep(self, seconds: float) -> None:
        until = self.monotonic() + seconds
        while (left := until - self.monotonic()) > 0:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # that comes as the event is set, and this sleep would then never end.
            with contextlib.suppress(TimeoutError):  # the time is up, or it jumped: look again
                async with asyncio.timeout(left):
                    await self._jumped.wait()
        await asyncio.sleep(0)
