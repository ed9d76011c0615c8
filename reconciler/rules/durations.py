"""How a duration reads in plans and reasons: ``1h30m``, ``2d``, ``45s``.

One formatter for the schedule texts (``every 1h30m``, ``jitter up to 15m``) and retention's exact
keep-within (``keep-within 36h``). The units are those a user writes in the config, so the text can be
pasted back; the one difference is the minute: ``m`` in intervals, ``min`` in keep-within, where ``m``
means calendar months. Standard library only.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

MinuteUnit = Literal["m", "min"]


def format_duration(delta: timedelta, *, minute: MinuteUnit = "m") -> str:
    """Whole days, hours, minutes and seconds, largest first, zero parts left out: ``1d2h``,
    ``1h30m`` (``1h30min`` with ``minute="min"``); ``0s`` for anything under a second or negative."""
    seconds = int(delta.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), (minute, 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"
