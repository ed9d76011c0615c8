"""Waiting for a state in tests: poll with a deadline instead of sleeping and asserting.

A deadline costs nothing when things are fast and gives a busy 2-core machine room (docs/lab.md,
"Writing lab tests that hold up under load"); each module binds its own bound with
``functools.partial(wait_until, timeout=...)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any


def wait_until(what: str, check: Callable[[], Any], *, timeout: float, poll: float = 0.1) -> Any:
    """``check()``'s first truthy value, polled every ``poll`` seconds; AssertionError naming ``what``
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(poll)


class OffsetClock:
    """Real time plus an offset the test moves forward (the daemon plans with it; hosts keep real time)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta
