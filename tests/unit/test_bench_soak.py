"""The soak bench's memory trend: a least-squares slope, in MB per hour."""

from __future__ import annotations

import pytest

from bench.soak import growth_per_hour


def test_slope_of_a_straight_line() -> None:
    points = [(t, 100.0 + 0.01 * t) for t in range(0, 600, 30)]  # 0.01 MB/s
    assert growth_per_hour(points) == pytest.approx(36.0)


def test_memory_given_back_is_a_negative_slope() -> None:
    points = [(60.0 * i, 200.0 - 0.5 * i) for i in range(10)]  # 0.5 MB less every minute
    assert growth_per_hour(points) == pytest.approx(-30.0)


def test_too_few_points_or_one_moment() -> None:
    assert growth_per_hour([]) is None
    assert growth_per_hour([(5.0, 100.0)]) is None
    assert growth_per_hour([(5.0, 100.0), (5.0, 120.0)]) is None
