"""How long a failed scheduled job waits before it is tried again (exponential, with jitter).

Exponential from :data:`BASE` to :data:`MAXIMUM`, so a host down for a night is tried a handful of times,
not every loop; jitter spreads the retries of many VMs that failed together. A terminal failure (bad
credentials, VM gone) waits the maximum: only a config change (a new revision) lifts it earlier.
"""

from __future__ import annotations

import random
from datetime import timedelta

BASE = timedelta(minutes=1)
MAXIMUM = timedelta(hours=6)
JITTER = 0.2
"""Each delay is drawn from ``[d * (1 - JITTER), d]``: never longer than the exponential step."""


def retry_delay(failures: int, *, terminal: bool = False, rng: random.Random | None = None) -> timedelta:
    """The wait after the ``failures``-th consecutive failure (1 → about a minute, doubling, at most
    :data:`MAXIMUM`)."""
    if terminal:
        return MAXIMUM
    steps = max(0, failures - 1)
    nominal = MAXIMUM if steps >= 20 else min(MAXIMUM, BASE * (2**steps))
    factor = 1.0 - JITTER * (rng or random).random()
    return nominal * factor
