"""DataBudget: how many bytes a metered link may carry per UTC day and per UTC calendar month.

Counters live in a small SQLite file of their own (WAL, synchronous=FULL), so restarts and power
cuts do not hand out a fresh budget; `allows` answers from memory, `record` returns once durable.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from router.clock import Clock, SystemClock
from router.errors import BudgetExhausted
from router.sqlite_files import Migration, OpenedDatabase, SqliteWorker, open_database

__all__ = ["BUDGET_MIGRATIONS", "BudgetPeriod", "DataBudget", "PeriodUsage"]

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


class DataBudget:
    """Bytes per UTC day and per UTC month; a limit of 0 or None means unlimited.

    What counts is up to the caller: the router records the bytes it puts on the wire (compressed
    request bodies plus response bodies). Concurrent calls that all passed `allows` before any of
    them was recorded may overshoot a limit by the requests in flight.
    """

    def __init__(
        self,
        path: Path,
        *,
        daily_bytes: int | None = None,
        monthly_bytes: int | None = None,
        clock: Clock | None = None,
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
        self._worker = SqliteWorker(f"budget:{self.path.name}")

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        daily_bytes: int | None = None,
        monthly_bytes: int | None = None,
        clock: Clock | None = None,
    ) -> DataBudget:
        budget = cls(path, daily_bytes=daily_bytes, monthly_bytes=monthly_bytes, clock=clock)
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

    def allows(self, n_bytes: int) -> bool:
        """Whether `n_bytes` more fit in both the current day and month."""
        # Asked for every unsure item: without limits, skip working out today's periods.
        return not self.limited or self.exhausted_by(n_bytes) is None

    def exhausted_by(self, n_bytes: int) -> PeriodUsage | None:
        """The first period that `n_bytes` more would overspend, or None if they fit."""
        for usage in self.usage():
            if usage.limit_bytes is not None and usage.used_bytes + n_bytes > usage.limit_bytes:
                return usage
        return None

    def require(self, n_bytes: int) -> None:
        """Raise BudgetExhausted if `n_bytes` more do not fit."""
        over = self.exhausted_by(n_bytes)
        if over is not None:
            assert over.limit_bytes is not None
            raise BudgetExhausted(over.period.value, over.used_bytes, over.limit_bytes)

    async def record(self, n_bytes: int) -> None:
        """Count bytes sent; counted in memory at once, returns once it is on disk."""
        if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 0:
            raise ValueError(f"n_bytes: must be an integer >= 0, got {n_bytes!r}")
        if n_bytes == 0:
            return
        keys = list(self._keys().values())
        for key in keys:
            self._used[key] = self._used.get(key, 0) + n_bytes

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
