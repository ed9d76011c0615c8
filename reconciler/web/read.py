"""Read one :class:`~reconciler.web.view.Snapshot` from the status store (a read-only connection of its
own per request: SQLite's WAL lets it read while the daemon writes). The only module of ``web/`` that
reads the store; the page and the metrics are computed from what it returns."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from reconciler import __version__
from reconciler.status.history import Event, HistoryQuery
from reconciler.status.store import StatusStore, StatusStoreError
from reconciler.web.record import COUNTERS_KEY, INVENTORY_KEY, POINTS_KEY, USAGE_KEY, fold, unfolded_backups
from reconciler.web.view import Counters, DaemonState, EventRow, Snapshot

CHART_DAYS = 30
"""The charts cover this many days of history."""
RECENT_EVENTS = 40
RECENT_NOTIFICATIONS = 15


def _row(event: Event) -> EventRow:
    return EventRow(
        id=event.id or 0,
        time=event.time,
        kind=event.kind,
        subject=event.subject,
        outcome=event.outcome,
        message=event.message,
        host=event.host,
        vm=event.vm,
        policy=event.policy,
        repository=event.repository,
        seconds=event.seconds,
        detail={k: v for k, v in event.detail.items() if k not in ("disks", "plan")},
    )


def _counters(state: Mapping[str, Any] | None, fresh: Iterable[Event]) -> list[Counters]:
    folded = fold(state, fresh)
    out = []
    for key, values in sorted(folded["series"].items()):
        host, vm, policy = [*key.split("\t"), "", "", ""][:3]
        known = {k: float(v) for k, v in values.items() if k in Counters.__dataclass_fields__}
        out.append(Counters(host=host, vm=vm, policy=policy, **known))
    return out


def _plan_text(plan: Mapping[str, Any]) -> str | None:
    import json

    from reconciler.planning.actions import Plan
    from reconciler.planning.render import render_text

    try:
        return render_text(Plan.from_json(json.dumps(plan)), color=False)
    except ValueError:  # a plan saved by another version: the page still shows the rest
        return None


def read_snapshot(store: StatusStore, now: datetime, daemon: DaemonState | None) -> Snapshot:
    """Everything the page and the metrics show, from an open store."""
    plan = store.last_plan()
    counters_state = store.events.get_state(COUNTERS_KEY)
    backups = store.events.events(
        HistoryQuery(since=now - timedelta(days=CHART_DAYS), kinds=("backup", "gc"), limit=20_000)
    )
    last_backup: dict[str, EventRow] = {}
    for event in store.events.latest(("backup",)).values():
        if event.host and event.vm:
            last_backup[f"{event.host}/{event.vm}"] = _row(event)
    points = {
        key.removeprefix(POINTS_KEY): doc
        for key in store.events.state_keys(POINTS_KEY)
        if (doc := store.events.get_state(key)) is not None
    }
    usage = {
        key.removeprefix(USAGE_KEY): doc
        for key in store.events.state_keys(USAGE_KEY)
        if (doc := store.events.get_state(key)) is not None
    }
    return Snapshot(
        now=now,
        version=__version__,
        daemon=daemon,
        conditions=store.conditions(),
        runs=store.history(),
        plan_time=plan.time if plan else None,
        plan_text=_plan_text(plan.plan) if plan else None,
        inventory=store.events.get_state(INVENTORY_KEY),
        points=points,
        usage=usage,
        counters=_counters(counters_state, unfolded_backups(store, counters_state)),
        backups=[_row(e) for e in reversed(backups)],
        events=[_row(e) for e in store.events.events(HistoryQuery(limit=RECENT_EVENTS))],
        notifications=[
            _row(e) for e in store.events.events(HistoryQuery(kinds=("notify",), limit=RECENT_NOTIFICATIONS))
        ],
        last_backup=last_backup,
    )


def load_snapshot(path: Path, now: datetime, daemon: DaemonState | None) -> Snapshot:
    """:func:`read_snapshot` of the status file at ``path``; before the first cycle wrote it, an empty
    snapshot."""
    try:
        store = StatusStore.open(path, readonly=True)
    except StatusStoreError:
        if path.exists():
            raise
        return Snapshot(now=now, version=__version__, daemon=daemon)
    with store:
        return read_snapshot(store, now, daemon)
