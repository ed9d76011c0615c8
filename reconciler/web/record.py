"""What the status page and the metrics need that the rest of the status store does not keep, written
after every daemon cycle as small state documents (``store.events.put_state``): the inventory the cycle
observed, the restore points each repository holds after the cycle, each repository's usage (``repo
stats``: dedup and compression), and the monotonic counters of the backups.

**Doing**: it lists restore points and reads disk indexes (under a shared repository lock), in the
cycle's worker thread after everything was applied, so it never delays a backup nor races the cycle's
own prune or garbage collection. The usage is computed again only when a repository's set of points
changed (it reads every point's indexes).

Readers (:mod:`reconciler.web.read`) take these documents as they are: the page and the metrics are
derived from the status store alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

import structlog

from reconciler.config.model import DesiredState, RepositoryConfig
from reconciler.facts.points import RestorePoint
from reconciler.planning.observed import ObservedState
from reconciler.repository.repo import Repository
from reconciler.status.history import Event, HistoryQuery
from reconciler.status.store import StatusStore

log = structlog.get_logger(__name__)

INVENTORY_KEY = "web/inventory"
POINTS_KEY = "web/points/"
"""+ repository name: the points of one repository after the last cycle."""
USAGE_KEY = "web/usage/"
"""+ repository name: the usage report of one repository and which points it counted."""
COUNTERS_KEY = "web/counters"
"""The backups' counters, folded up to an event id (:func:`fold_counters`)."""
COUNTER_FIELDS = ("bytes_read", "bytes_sent", "bytes_stored")
FOLD_MARGIN_DAYS = 2
"""Events are folded by id; this many days before the last folded one are looked at again, for an event
recorded late with an earlier time (an action's event carries its finish time)."""

RepoOpener = Callable[[RepositoryConfig], Repository]


def point_summary(point: RestorePoint) -> dict[str, Any]:
    """One restore point as the page lists it: what it is, how big, what it added."""
    return {
        "id": point.id,
        "policy": point.policy,
        "vm": point.vm.name,
        "host": point.vm.host,
        "uuid": point.vm.uuid,
        "started": point.started.isoformat(),
        "finished": point.finished.isoformat(),
        "status": point.status,
        "mode": point.mode,
        "protected": point.protected,
        "disks": len(point.disks),
        "logical_bytes": sum(d.capacity for d in point.disks) + sum(f.size for f in point.files),
        "read_bytes": sum(d.bytes_read for d in point.disks),
        "stored_bytes": sum(d.bytes_stored for d in point.disks),
    }


def _inventory(observed: ObservedState, desired: DesiredState, now: datetime) -> dict[str, Any]:
    hosts = []
    for name in desired.hosts:
        host = observed.hosts.get(name)
        if host is None:
            continue
        hosts.append(
            {
                "name": name,
                "reachable": host.reachable,
                "error": host.error,
                "license": host.license,
                "vms": [
                    {
                        "name": vm.name,
                        "uuid": vm.uuid,
                        "power_state": vm.power_state,
                        "cbt": vm.cbt_enabled,
                        "disks": len(vm.disks),
                        "capacity_bytes": sum(d.capacity for d in vm.disks),
                        "protected_by": [p.name for p in desired.policies_for_vm(name, vm.name)],
                    }
                    for vm in sorted(host.vms, key=lambda v: v.name)
                ],
                "datastores": [
                    {"name": d.name, "capacity_bytes": d.capacity, "free_bytes": d.free}
                    for d in sorted(host.datastores, key=lambda d: d.name)
                ],
            }
        )
    repositories = [
        {
            "name": name,
            "reachable": repo.reachable,
            "error": repo.error,
            "capacity_bytes": repo.capacity_bytes,
            "free_bytes": repo.free_bytes,
        }
        for name, repo in sorted(observed.repositories.items())
        if name in desired.repositories
    ]
    return {
        "time": now.isoformat(),
        "revision": desired.revision.id,
        "hosts": hosts,
        "repositories": repositories,
    }


def _points_id(points: Iterable[RestorePoint]) -> str:
    return hashlib.sha256("\n".join(sorted(p.id for p in points)).encode()).hexdigest()


def record_repository(
    store: StatusStore, config: RepositoryConfig, opener: RepoOpener, now: datetime
) -> None:
    """List one repository's points (and count its usage when they changed) into the store."""
    from reconciler.repository.stats import usage_report

    previous = store.events.get_state(USAGE_KEY + config.name)
    try:
        repo = opener(config)
        with repo.lock(exclusive=False, purpose="status page") as lock:
            points = repo.list_points()
            lock.check()
            usage = None
            digest = _points_id(points)
            if previous is None or previous.get("points_id") != digest:
                usage = usage_report(repo, points).to_dict()
    except Exception as exc:  # noqa: BLE001  unreadable now (locked, missing, a bad key): the page says so and keeps the last figures
        store.events.put_state(
            POINTS_KEY + config.name,
            {"time": now.isoformat(), "reachable": False, "error": str(exc), "points": None},
            now,
        )
        log.warning("web.repository_unreadable", repository=config.name, error=str(exc))
        return
    store.events.put_state(
        POINTS_KEY + config.name,
        {
            "time": now.isoformat(),
            "reachable": True,
            "error": None,
            "points": [point_summary(p) for p in sorted(points, key=lambda p: p.id)],
        },
        now,
    )
    if usage is not None:
        store.events.put_state(
            USAGE_KEY + config.name, {"time": now.isoformat(), "points_id": digest, "usage": usage}, now
        )


def fold(state: Mapping[str, Any] | None, events: Iterable[Event]) -> dict[str, Any]:
    """Add the backup events newer than the folded id to the counters (pure). Counters never go down,
    even when compaction deletes the events they came from."""
    last_id = int(state["last_id"]) if state else 0
    series: dict[str, dict[str, float]] = {k: dict(v) for k, v in (state or {}).get("series", {}).items()}
    for event in sorted(events, key=lambda e: e.id or 0):
        if event.id is None or event.id <= last_id or event.kind != "backup":
            continue
        last_id = event.id
        if not event.host or not event.vm:  # a policy run from the command line: its VMs have their own
            continue
        key = "\t".join((event.host or "", event.vm or "", event.policy or ""))
        counts = series.setdefault(key, {})
        counts[f"backups_{event.outcome}"] = counts.get(f"backups_{event.outcome}", 0) + 1
        if event.outcome == "ok":
            for name in COUNTER_FIELDS:
                value = event.detail.get(name)
                if isinstance(value, int | float):
                    counts[name] = counts.get(name, 0) + value
            seconds = event.seconds
            if seconds is not None:
                counts["duration_count"] = counts.get("duration_count", 0) + 1
                counts["duration_sum"] = counts.get("duration_sum", 0.0) + seconds
    return {"last_id": last_id, "series": series}


def unfolded_backups(store: StatusStore, state: Mapping[str, Any] | None) -> list[Event]:
    """The backup events not yet in the counters ``state``."""
    from datetime import timedelta

    last_id = int(state["last_id"]) if state else 0
    since = None
    if state and state.get("last_time"):
        since = datetime.fromisoformat(state["last_time"]) - timedelta(days=FOLD_MARGIN_DAYS)
    events = store.events.events(HistoryQuery(since=since, kinds=("backup",), limit=None))
    return [e for e in events if e.id is not None and e.id > last_id]


def fold_counters(store: StatusStore, now: datetime) -> None:
    """Fold the new backup events into the stored counters (before the history is compacted)."""
    state = store.events.get_state(COUNTERS_KEY)
    events = unfolded_backups(store, state)
    if not events:
        return
    folded = fold(state, events)
    folded["last_time"] = max(e.time for e in events).isoformat()
    store.events.put_state(COUNTERS_KEY, folded, now)


def record_cycle(
    store: StatusStore, desired: DesiredState, observed: ObservedState, now: datetime, opener: RepoOpener
) -> None:
    """Everything above, after one cycle: the inventory, each repository's points and usage, the
    counters. Each repository on its own: one unreadable repository does not hide the others."""
    store.events.put_state(INVENTORY_KEY, _inventory(observed, desired, now), now)
    for config in desired.repositories.values():
        record_repository(store, config, opener, now)
    for key in store.events.state_keys(POINTS_KEY) + store.events.state_keys(USAGE_KEY):
        if key.rpartition("/")[2] not in desired.repositories:
            store.events.delete_state(key)
    fold_counters(store, now)
