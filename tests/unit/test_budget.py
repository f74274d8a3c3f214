"""DataBudget: limits per UTC day and month, rollover at the boundaries, counters that survive restarts."""

from __future__ import annotations

import logging
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from router.budget import BudgetPeriod, DataBudget, ProbeBudget
from router.clock import FakeClock
from router.errors import BudgetExhausted


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "budget.sqlite3"


async def test_day_limit_and_rollover_at_utc_midnight(path: Path) -> None:
    clock = FakeClock(at("2024-05-14T23:59:00"))
    budget = await DataBudget.open(path, daily_bytes=1_000, clock=clock)
    try:
        assert budget.allows(1_000)
        await budget.record(700)
        assert budget.allows(300)
        assert not budget.allows(301)
        with pytest.raises(BudgetExhausted, match="day data budget spent: 700 of 1000") as caught:
            budget.require(301)
        assert (caught.value.period, caught.value.used_bytes) == ("day", 700)
        day, month = budget.usage()
        assert (day.period, day.key, day.used_bytes, day.left_bytes) == (
            BudgetPeriod.DAY,
            "2024-05-14",
            700,
            300,
        )
        assert (month.key, month.used_bytes, month.left_bytes) == ("2024-05", 700, None)

        clock.advance(60)  # 2024-05-15T00:00:00Z
        assert budget.allows(1_000)
        day, month = budget.usage()
        assert (day.key, day.used_bytes, month.used_bytes) == ("2024-05-15", 0, 700)
    finally:
        await budget.close()


async def test_month_limit_spans_days_and_resets_on_the_first(path: Path) -> None:
    clock = FakeClock(at("2024-02-28T12:00:00"))
    budget = await DataBudget.open(path, daily_bytes=600, monthly_bytes=1_000, clock=clock)
    try:
        await budget.record(500)
        clock.advance(24 * 3600)  # Feb 29th, a leap day: new day, same month
        assert budget.allows(500)
        assert not budget.allows(501)
        over = budget.exhausted_by(501)
        assert over is not None
        assert over.period is BudgetPeriod.MONTH
        await budget.record(500)
        assert not budget.allows(1)
        clock.advance(12 * 3600)  # 2024-03-01T00:00:00Z
        assert budget.allows(600)
        assert not budget.allows(601)  # now the day limit binds
    finally:
        await budget.close()


async def test_counters_survive_a_restart(path: Path) -> None:
    clock = FakeClock(at("2024-12-31T10:00:00"))
    budget = await DataBudget.open(path, daily_bytes=1_000, monthly_bytes=5_000, clock=clock)
    await budget.record(400)
    await budget.record(450)
    await budget.close()

    reopened = await DataBudget.open(path, daily_bytes=1_000, monthly_bytes=5_000, clock=clock)
    try:
        day, month = reopened.usage()
        assert (day.used_bytes, month.used_bytes) == (850, 850)
        assert not reopened.allows(151)
        clock.advance(14 * 3600)  # 2025-01-01T00:00:00Z: a new year, day and month
        assert [u.used_bytes for u in reopened.usage()] == [0, 0]
    finally:
        await reopened.close()
    # What a restart reads back is what is on disk, committed.
    with closing(sqlite3.connect(path)) as conn:
        rows = dict(conn.execute("SELECT period, used_bytes FROM usage").fetchall())
    assert rows == {"day:2024-12-31": 850, "month:2024-12": 850}


async def test_unlimited_by_default_and_with_zero(path: Path) -> None:
    budget = await DataBudget.open(path, daily_bytes=0, clock=FakeClock())
    try:
        assert not budget.limited
        await budget.record(10**12)
        assert budget.allows(10**12)
        budget.require(10**12)
        assert [u.left_bytes for u in budget.usage()] == [None, None]
    finally:
        await budget.close()


async def test_old_periods_are_forgotten(path: Path) -> None:
    clock = FakeClock(at("2024-03-31T12:00:00"))
    budget = await DataBudget.open(path, monthly_bytes=10_000, clock=clock)
    try:
        await budget.record(100)  # March
        clock.advance(40 * 24 * 3600)  # May 10th
        await budget.record(200)
        assert await budget.forget_before(keep_months=2) == 2  # March's day and month
        assert [u.used_bytes for u in budget.usage()] == [200, 200]
    finally:
        await budget.close()


@pytest.mark.parametrize("n", [-1, 1.5, True])
async def test_bad_record_changes_nothing(path: Path, n: object) -> None:
    budget = await DataBudget.open(path, daily_bytes=100, clock=FakeClock())
    try:
        with pytest.raises(ValueError, match="n_bytes"):
            await budget.record(n)  # type: ignore[arg-type]
        assert budget.usage()[0].used_bytes == 0
    finally:
        await budget.close()


def test_bad_limits_are_refused(path: Path) -> None:
    with pytest.raises(ValueError, match="monthly_bytes"):
        DataBudget(path, monthly_bytes=-5)


GARBAGE = b"not a database at all" * 100


def plant_garbage(path: Path) -> None:
    path.write_bytes(GARBAGE)


def read(path: Path) -> bytes:
    return path.read_bytes()


async def test_corrupt_budget_file_is_quarantined_not_deleted(path: Path) -> None:
    plant_garbage(path)
    budget = await DataBudget.open(
        path, daily_bytes=100, clock=FakeClock(at("2024-01-02T03:04:05"))
    )
    try:
        assert [p.name for p in budget.quarantined] == ["budget.sqlite3.corrupt-20240102T030405Z"]
        assert read(budget.quarantined[0]) == GARBAGE
        await budget.record(10)
        assert budget.usage()[0].used_bytes == 10
    finally:
        await budget.close()


# -- reservations and the pace of probes -------------------------------------------------------


async def test_reservations_hold_bytes_until_settled_with_what_was_used(path: Path) -> None:
    budget = await DataBudget.open(path, daily_bytes=1_000, clock=FakeClock(at("2024-05-14T12:00")))
    try:
        first = budget.reserve(600)
        assert budget.reserved_bytes == 600
        assert not budget.allows(401)  # in flight together, they may not overspend
        with pytest.raises(BudgetExhausted):
            budget.reserve(401)
        second = budget.reserve(400)
        budget.settle(first, 550)  # counted at once, before its bytes are free for others
        assert (budget.usage()[0].used_bytes, budget.reserved_bytes) == (550, 400)
        assert budget.allows(50)
        assert not budget.allows(51)
        budget.grow(second, 50)  # an answer larger than expected, while it fits
        with pytest.raises(BudgetExhausted, match="day data budget spent: 550 of 1000"):
            budget.grow(second, 1)
        budget.settle(second, 450)
        assert (budget.usage()[0].used_bytes, budget.reserved_bytes) == (1_000, 0)
    finally:
        await budget.close()
    again = await DataBudget.open(path, daily_bytes=1_000, clock=FakeClock(at("2024-05-14T13:00")))
    try:
        assert again.usage()[0].used_bytes == 1_000  # settled bytes reach the disk
    finally:
        await again.close()


async def test_periods_end_at_utc_midnight_and_the_first_of_the_month(path: Path) -> None:
    budget = await DataBudget.open(path, clock=FakeClock(at("2024-02-28T18:00")))
    try:
        assert budget.seconds_left(BudgetPeriod.DAY) == 6 * 3600
        assert budget.seconds_left(BudgetPeriod.MONTH) == (24 + 6) * 3600  # a leap year
    finally:
        await budget.close()


async def test_probes_are_spaced_to_spend_a_share_of_what_is_left(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "router.budget")
    clock = FakeClock(at("2024-05-14T00:00"))
    budget = await DataBudget.open(path, daily_bytes=1_000_000, clock=clock)
    try:
        probes = ProbeBudget(budget, share=0.1, interval_s=30.0, clock=clock)
        assert probes.wait_s() == 0
        probes.spent(0, answered=False)  # a probe that could not connect: no cost, no pause
        assert probes.wait_s() == 0
        await budget.record(360)
        probes.spent(360, answered=True)
        # 360 bytes out of 10 % of 999,640 left over 86,400 s: one probe every 311 s
        assert probes.wait_s() == pytest.approx(360 * 86_400 / (0.1 * 999_640))
        assert "link probes slowed to one per 311 s" in caplog.text
        clock.advance(311.2)
        assert probes.wait_s() == 0
        await budget.record(999_400)  # 240 bytes left: not even a probe fits
        assert probes.wait_s() == 86_400 - 311.2
        assert "the day data budget is spent (999760 of 1000000 bytes); link probes stop" in (
            caplog.text
        )
        assert "until 2024-05-15 00:00 UTC" in caplog.text
        clock.advance(86_400 - 311.2)  # the next day
        assert probes.wait_s() == 0
        assert "link probes back to their usual pace" in caplog.text
    finally:
        await budget.close()


async def test_without_limits_probes_keep_their_interval(path: Path) -> None:
    clock = FakeClock(at("2024-05-14T00:00"))
    budget = await DataBudget.open(path, clock=clock)
    try:
        probes = ProbeBudget(budget, share=0.1, interval_s=30.0, clock=clock)
        probes.spent(360, answered=True)
        assert probes.wait_s() == 0
        with pytest.raises(ValueError, match="share"):
            ProbeBudget(budget, share=0, interval_s=30.0, clock=clock)
    finally:
        await budget.close()


async def test_urgent_probes_wait_only_for_bytes_spent_without_an_answer(path: Path) -> None:
    clock = FakeClock(at("2024-05-14T00:00"))
    budget = await DataBudget.open(path, daily_bytes=1_000_000, clock=clock)
    try:
        probes = ProbeBudget(budget, share=0.1, interval_s=30.0, clock=clock)
        probes.spent(360, answered=True)
        assert probes.wait_s() > 300
        assert probes.wait_s(urgent=True) == 0  # items wait for a down link: look now
        probes.spent(200, answered=False)  # black-holed: its request went out, no answer came
        assert probes.wait_s(urgent=True) == pytest.approx(200 * 86_400 / (0.1 * 1_000_000))
        assert probes.probe_bytes == 360  # what an answered probe takes, for the stop rule
    finally:
        await budget.close()
