"""The soak's p99 per 5-minute window and route: over every answer sent in the window, not
the largest of its samples' p99s."""

from __future__ import annotations

import pytest

from benchmarks.soak import window_p99s


def test_each_window_and_route_gets_the_p99_of_its_own_answers() -> None:
    # Window 0: 100 local answers of 1..100 ms; window 1: local all 5 ms, one cloud answer.
    answers = [(10.0 + i, "edge", (i + 1) / 1000) for i in range(100)]
    answers += [(400.0 + i, "edge", 0.005) for i in range(50)]
    answers += [(450.0, "cloud", 0.2), (5.0, "edge", 9.9)]  # the last one before the start
    p99s = window_p99s(answers, start=10.0, end=610.0, window_s=300.0)
    assert p99s["edge"][0] == pytest.approx(99.01)  # numpy's linear p99 of 1..100
    assert p99s["edge"][1] == pytest.approx(5.0)
    assert p99s["cloud"] == [None, pytest.approx(200.0)]
    assert p99s["queue"] == [None, None]


def test_a_short_last_window_joins_the_one_before_and_a_long_one_stands() -> None:
    answers = [(650.0, "edge", 0.1)]
    assert window_p99s(answers, 0.0, 700.0)["edge"] == [None, pytest.approx(100.0)]  # 100 s
    assert window_p99s(answers, 0.0, 751.0)["edge"] == [None, None, pytest.approx(100.0)]
    assert window_p99s(answers, 0.0, 100.0)["edge"] == [None]  # shorter than one window
