"""DataBudget: how many bytes a metered link may carry per UTC day and per UTC calendar month.

Counters live in a small SQLite file of their own (WAL, synchronous=FULL), so restarts and power
cuts do not hand out a fresh budget; `allows` answers from memory, `record` returns once durable.
An exchange reserves its bytes before it starts and settles them after, so exchanges in flight
together can never overspend a period. ProbeBudget spaces the link's probes within what is left.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from router.clock import Clock, SystemClock
from router.errors import BudgetExhausted
from router.sqlite_files import (
    Migration,
    OpenedDatabase,
    SqliteWorker,
    WriteHooks,
    open_database,
)

__all__ = [
    "BUDGET_MIGRATIONS",
    "BudgetPeriod",
    "DataBudget",
    "PeriodUsage",
    "ProbeBudget",
    "Reservation",
]

log = logging.getLogger(__name__)

BUDGET_MIGRATIONS: tuple[Migration, ...] = (
    # One row per calendar period seen, keyed like 'day:2024-05-31' or 'month:2024-05'.
    ("CREATE TABLE usage (period TEXT PRIMARY KEY, used_bytes INTEGER NOT NULL)",),
)


class BudgetPeriod(StrEnum):
    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class PeriodUsage:
    period: BudgetPeriod
    key: str
    """The current period, e.g. '2024-05-31' or '2024-05' (UTC)."""
    used_bytes: int
    limit_bytes: int | None
    """None: unlimited."""

    @property
    def left_bytes(self) -> int | None:
        return None if self.limit_bytes is None else max(0, self.limit_bytes - self.used_bytes)


@dataclass(eq=False, slots=True)
class Reservation:
    """Bytes held back for one exchange with the cloud, from before it starts until it is
    settled with what it really took (`DataBudget.settle`)."""

    n_bytes: int


class DataBudget:
    """Bytes per UTC day and per UTC month; a limit of 0 or None means unlimited.

    What counts is up to the caller: the router's cloud client reserves what an exchange may take
    (its request exactly, its answer as large as the largest recent one) before sending, and
    settles what it took, so the bytes in flight are always within what is left.
    """

    def __init__(
        self,
        path: Path,
        *,
        daily_bytes: int | None = None,
        monthly_bytes: int | None = None,
        clock: Clock | None = None,
        hooks: WriteHooks | None = None,
    ) -> None:
        """Use `await DataBudget.open(...)`."""
        for name, value in (("daily_bytes", daily_bytes), ("monthly_bytes", monthly_bytes)):
            if value is not None and (isinstance(value, bool) or value < 0):
                raise ValueError(f"{name}: must be >= 0 (0 or None: unlimited), got {value!r}")
        self.path = Path(path)
        self.limits = {
            BudgetPeriod.DAY: daily_bytes or None,
            BudgetPeriod.MONTH: monthly_bytes or None,
        }
        self.clock: Clock = clock or SystemClock()
        self.quarantined: list[Path] = []
        self._used: dict[str, int] = {}
        self._reserved = 0
        self._writes: set[asyncio.Future[None]] = set()
        self._worker = SqliteWorker(f"budget:{self.path.name}", store="budget", hooks=hooks)

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        daily_bytes: int | None = None,
        monthly_bytes: int | None = None,
        clock: Clock | None = None,
        hooks: WriteHooks | None = None,
    ) -> DataBudget:
        budget = cls(
            path, daily_bytes=daily_bytes, monthly_bytes=monthly_bytes, clock=clock, hooks=hooks
        )
        opened = await budget._worker.start(budget._open)
        if opened.quarantined is not None:
            budget.quarantined.append(opened.quarantined)
        return budget

    def _open(self) -> OpenedDatabase:
        opened = open_database(self.path, BUDGET_MIGRATIONS, now=self.clock.wall)
        rows = opened.connection.execute("SELECT period, used_bytes FROM usage").fetchall()
        self._used = {period: int(used) for period, used in rows}
        return opened

    async def close(self) -> None:
        """Wait for the settled bytes still being written, then close the file."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self._worker.close()

    @property
    def limited(self) -> bool:
        return any(limit is not None for limit in self.limits.values())

    def usage(self) -> list[PeriodUsage]:
        """Used and left in the current day and month."""
        keys = self._keys()
        return [
            PeriodUsage(p, keys[p].split(":", 1)[1], self._used.get(keys[p], 0), self.limits[p])
            for p in BudgetPeriod
        ]

    @property
    def reserved_bytes(self) -> int:
        """Bytes held for exchanges in flight."""
        return self._reserved

    def allows(self, n_bytes: int) -> bool:
        """Whether `n_bytes` more fit in both the current day and month, beside what is
        reserved."""
        # Asked for every unsure item: without limits, skip working out today's periods.
        return not self.limited or self.exhausted_by(n_bytes) is None

    def exhausted_by(self, n_bytes: int) -> PeriodUsage | None:
        """The first period that `n_bytes` more (beside what is reserved) would overspend, or
        None if they fit."""
        for usage in self.usage():
            if usage.limit_bytes is not None and (
                usage.used_bytes + self._reserved + n_bytes > usage.limit_bytes
            ):
                return usage
        return None

    def reserve(self, n_bytes: int) -> Reservation:
        """Hold `n_bytes` for an exchange about to start; BudgetExhausted if they do not fit."""
        if self.limited:  # asked for every exchange: without limits, skip today's periods
            self.require(n_bytes)
        self._reserved += n_bytes
        return Reservation(n_bytes)

    def grow(self, reservation: Reservation, n_bytes: int) -> None:
        """Hold `n_bytes` more for `reservation` (an answer larger than expected);
        BudgetExhausted if they do not fit."""
        self.require(n_bytes)
        self._reserved += n_bytes
        reservation.n_bytes += n_bytes

    def settle(self, reservation: Reservation, used_bytes: int) -> None:
        """The exchange is over and took `used_bytes`: free its reservation and count them (in
        memory at once; on disk in the background, awaited by `close`)."""
        self._reserved -= reservation.n_bytes
        reservation.n_bytes = 0
        # Counted before the reservation's bytes are free for others, or two exchanges could
        # both see them as left.
        counted = self._count(used_bytes)
        if used_bytes:
            write = asyncio.ensure_future(self._write(counted))
            self._writes.add(write)
            write.add_done_callback(self._written)

    def _written(self, write: asyncio.Future[None]) -> None:
        self._writes.discard(write)
        if not write.cancelled() and write.exception() is not None:
            log.error("could not record data budget use: %s", write.exception())

    def seconds_left(self, period: BudgetPeriod) -> float:
        """Seconds until `period` (the current day or month, UTC) ends."""
        now = datetime.fromtimestamp(self.clock.wall(), UTC)
        if period is BudgetPeriod.DAY:
            end = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
        else:
            year, month = divmod(now.year * 12 + now.month, 12)
            end = datetime(year, month + 1, 1, tzinfo=UTC)
        return (end - now).total_seconds()

    def spacing(self, n_bytes: int, share: float) -> float:
        """Seconds to leave after spending `n_bytes` so that spends of that size, at that pace,
        take at most `share` of what each limited period has left by the time it ends; 0 without
        limits, the rest of the period when nothing is left of it."""
        spacing = 0.0
        for usage in self.usage():
            if usage.limit_bytes is None:
                continue
            left = usage.limit_bytes - usage.used_bytes - self._reserved
            period_s = self.seconds_left(usage.period)
            if left <= 0:
                return period_s
            spacing = max(spacing, min(period_s, n_bytes * period_s / (share * left)))
        return spacing

    def require(self, n_bytes: int) -> None:
        """Raise BudgetExhausted if `n_bytes` more do not fit."""
        over = self.exhausted_by(n_bytes)
        if over is not None:
            assert over.limit_bytes is not None
            raise BudgetExhausted(over.period.value, over.used_bytes, over.limit_bytes)

    async def record(self, n_bytes: int) -> None:
        """Count bytes sent; counted in memory at once, returns once it is on disk."""
        await self._write(self._count(n_bytes))

    def _count(self, n_bytes: int) -> tuple[list[str], int]:
        if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 0:
            raise ValueError(f"n_bytes: must be an integer >= 0, got {n_bytes!r}")
        keys = list(self._keys().values()) if n_bytes else []
        for key in keys:
            self._used[key] = self._used.get(key, 0) + n_bytes
        return keys, n_bytes

    async def _write(self, counted: tuple[list[str], int]) -> None:
        keys, n_bytes = counted
        if not keys:
            return

        def job(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO usage (period, used_bytes) VALUES (?, ?) ON CONFLICT (period)"
                " DO UPDATE SET used_bytes = used_bytes + excluded.used_bytes",
                [(key, n_bytes) for key in keys],
            )

        await self._worker.call(job)

    async def forget_before(self, keep_months: int = 2) -> int:
        """Delete counters of periods older than the last `keep_months` months; return how many."""
        now = datetime.fromtimestamp(self.clock.wall(), UTC)
        year, month = divmod(now.year * 12 + now.month - 1 - (keep_months - 1), 12)
        cutoff = f"{year:04d}-{month + 1:02d}"
        old = [k for k in self._used if k.split(":", 1)[1] < cutoff]

        def job(conn: sqlite3.Connection) -> int:
            conn.executemany("DELETE FROM usage WHERE period = ?", [(k,) for k in old])
            return len(old)

        for key in old:
            del self._used[key]
        return await self._worker.call(job)

    def _keys(self) -> dict[BudgetPeriod, str]:
        now = datetime.fromtimestamp(self.clock.wall(), UTC)
        return {
            BudgetPeriod.DAY: f"day:{now:%Y-%m-%d}",
            BudgetPeriod.MONTH: f"month:{now:%Y-%m}",
        }


class ProbeBudget:
    """How often the data budget lets the link be probed (ConnectivityMonitor's `probe_wait`).

    A probe that took b bytes is followed by a pause of `DataBudget.spacing(b, share)`, so probes
    spend at most `share` of what is left of each limited period however long it has to run; a
    probe that could not connect took nothing and costs no pause. Urgent probes (a down link
    that items wait for) only wait out pauses of probes that spent bytes without an answer (a
    black-holed link), so the link's return is noticed soon; there are as many answered ones as
    outages. While a probe's bytes do not fit at all, probing stops until the period ends. Each
    change of pace is logged once.
    """

    GUESS_BYTES = 512
    """A probe's cost until one has been measured."""

    def __init__(
        self, budget: DataBudget, *, share: float, interval_s: float, clock: Clock
    ) -> None:
        if not (math.isfinite(share) and 0 < share <= 1):
            raise ValueError(f"share: must be a number in (0, 1], got {share!r}")
        self.budget = budget
        self.share = share
        self.interval_s = interval_s
        self.clock = clock
        self.probe_bytes = self.GUESS_BYTES
        """What the last probe that reached the cloud took."""
        self._next_at = -math.inf
        self._next_unanswered_at = -math.inf
        self._pace = "normal"

    def spent(self, n_bytes: int, *, answered: bool) -> None:
        """A probe took `n_bytes` (0: it never reached the cloud); `answered`: the cloud
        answered it (ready or not)."""
        if n_bytes <= 0 or not self.budget.limited:
            return
        if answered:
            self.probe_bytes = n_bytes
        spacing = self.budget.spacing(n_bytes, self.share)
        self._next_at = self.clock.monotonic() + spacing
        if not answered:
            self._next_unanswered_at = self._next_at
        self._say("slowed" if spacing > self.interval_s else "normal", spacing)

    def wait_s(self, urgent: bool = False) -> float:
        """Seconds until the budget lets the next probe go; 0: now. `urgent`: items wait for a
        down link."""
        if not self.budget.limited:
            return 0.0
        over = self.budget.exhausted_by(self.probe_bytes)
        if over is not None:
            left = self.budget.seconds_left(over.period)
            self._say("stopped", left, over)
            return left
        if self._pace == "stopped":
            self._say("normal", 0.0)
        next_at = self._next_unanswered_at if urgent else self._next_at
        return max(0.0, next_at - self.clock.monotonic())

    def _say(self, pace: str, seconds: float, over: PeriodUsage | None = None) -> None:
        if pace == self._pace:
            return
        self._pace = pace
        if over is not None:
            until = datetime.fromtimestamp(self.clock.wall() + seconds, UTC)
            log.warning(
                "the %s data budget is spent (%d of %s bytes); link probes stop until %s",
                over.period.value,
                over.used_bytes,
                over.limit_bytes,
                f"{until:%Y-%m-%d %H:%M} UTC",
            )
        elif pace == "slowed":
            log.warning(
                "link probes slowed to one per %.0f s, to spend at most %.0f %% of what is left"
                " of the data budget",
                seconds,
                self.share * 100,
            )
        else:
            log.info("link probes back to their usual pace (data budget)")
