"""The values the status page and the metrics are made from: one :class:`Snapshot` of the status store at
an instant (read by :mod:`reconciler.web.read`). Plain frozen data, standard library only, so the page
(:mod:`reconciler.web.page`) and the metrics families (:mod:`reconciler.web.metrics`) are pure functions
of it, tested with hand-made values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from reconciler.planning.observed import RunRecord
from reconciler.status.conditions import Condition


@dataclass(frozen=True)
class DaemonState:
    """What the daemon's loop knows of itself (not in the store): for /readyz, the page's header and the
    daemon metrics."""

    started: datetime
    config_loaded: bool
    """A valid config is in force (the last good one counts when a newer one was rejected)."""
    revision: str | None
    cycles: int
    cycle_running: bool
    last_cycle_started: datetime | None = None
    last_cycle_finished: datetime | None = None
    last_cycle_ok: bool | None = None
    git_source: bool = False


@dataclass(frozen=True)
class EventRow:
    """One event of the history, as shown and charted."""

    id: int
    time: datetime
    kind: str
    subject: str
    outcome: str
    message: str
    host: str | None = None
    vm: str | None = None
    policy: str | None = None
    repository: str | None = None
    seconds: float | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Counters:
    """Monotonic totals of one (host, VM, policy)'s backups."""

    host: str
    vm: str
    policy: str
    bytes_read: float = 0
    bytes_sent: float = 0
    bytes_stored: float = 0
    backups_ok: float = 0
    backups_failed: float = 0
    backups_skipped: float = 0
    duration_count: float = 0
    duration_sum: float = 0


@dataclass(frozen=True)
class Snapshot:
    """Everything one page or one scrape shows. ``inventory``, ``points`` and ``usage`` are the state
    documents of :mod:`reconciler.web.record` as stored (None/empty before the first cycle)."""

    now: datetime
    version: str
    daemon: DaemonState | None
    conditions: Sequence[Condition] = ()
    runs: Mapping[str, RunRecord] = field(default_factory=dict)
    plan_time: datetime | None = None
    plan_text: str | None = None
    inventory: Mapping[str, Any] | None = None
    points: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Repository name → ``{time, reachable, error, points: [point summary…]}``."""
    usage: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Repository name → ``{time, usage: UsageReport.to_dict()}``."""
    counters: Sequence[Counters] = ()
    backups: Sequence[EventRow] = ()
    """Backups (and garbage collections) of the charted period, oldest first."""
    events: Sequence[EventRow] = ()
    """The newest events of every kind, newest first."""
    notifications: Sequence[EventRow] = ()
    """The newest notifications sent or not, newest first."""
    last_backup: Mapping[str, EventRow] = field(default_factory=dict)
    """``host/vm`` → its newest backup that ran (ok or failed)."""

    def condition(self, kind: str, name: str) -> Condition | None:
        return next((c for c in self.conditions if c.kind == kind and c.name == name), None)
