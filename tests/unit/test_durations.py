"""The one duration formatter of schedule texts and retention reasons."""

from __future__ import annotations

from datetime import timedelta

import pytest

from reconciler.rules.durations import format_duration
from reconciler.rules.retention import RetentionPolicy
from reconciler.rules.schedule import Every, Schedule, describe


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(days=1, hours=2), "1d2h"),
        (timedelta(days=2), "2d"),
        (timedelta(minutes=15), "15m"),
        (timedelta(seconds=45), "45s"),
        (timedelta(days=1, seconds=1), "1d1s"),
        (timedelta(0), "0s"),
        (timedelta(milliseconds=500), "0s"),
        (timedelta(seconds=-5), "0s"),
    ],
)
def test_parts_largest_first_zero_parts_left_out(delta: timedelta, text: str) -> None:
    assert format_duration(delta) == text


def test_minutes_read_min_where_m_means_months() -> None:
    assert format_duration(timedelta(hours=1, minutes=30), minute="min") == "1h30min"


def test_schedule_and_retention_use_it_each_in_their_own_language() -> None:
    assert describe(Schedule(Every(timedelta(minutes=90)))) == "every 1h30m"
    policy = RetentionPolicy(keep_within=timedelta(hours=36, minutes=30))
    assert policy.describe() == "keep-within 1d12h30min (UTC)"
