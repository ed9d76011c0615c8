"""The event log and job history: every backup, prune, GC, CBT change, restore, verify, config reload,
notification and error, with its time, config revision and outcome, in the status file.

Read by ``esxi-reconciler history``, by the notifications (:mod:`reconciler.notify`: what was sent, the
latest verify per repository, the figures of a summary) and meant for the status page and the metrics:
those read through the query methods of :class:`EventLog` only (:meth:`EventLog.events`,
:meth:`EventLog.latest`, :meth:`EventLog.counts`, :meth:`EventLog.totals`), never the table.

Kept for a configurable time (:class:`Retention`): :meth:`EventLog.compact` deletes what is older, drops
the per-disk detail of old backups (their totals stay), caps the number of rows whatever the clock says,
and gives the freed pages back to the file system, so the file never grows without bound.

One row per event; ``detail`` holds what is specific to the kind as JSON (a backup's mode, bytes read,
sent and stored, duration, and per disk mode and reasons). Secrets are never passed in (messages come
from outcomes and conditions, which hold none; notification errors are redacted before they get here).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from reconciler.planning.actions import (
    Action,
    CollectGarbage,
    Outcome,
    PrunePoint,
    RemoveSnapshot,
    RunBackup,
    RunTestRestore,
    RunVerify,
    SetCbt,
)

EventOutcome = Literal["ok", "failed", "skipped", "info", "warning"]
"""``ok``/``failed``/``skipped`` for work that was done (or not); ``info`` and ``warning`` for things that
happened (a config loaded, a condition changed)."""

ACTION_KINDS = ("remove-snapshot", "cbt", "backup", "prune", "gc", "verify", "test-restore")
"""Event kinds that are the outcome of a planned action (the daemon's or ``apply``'s)."""
EVENT_KINDS = (*ACTION_KINDS, "restore", "export", "config", "condition", "notify", "daemon", "error")
"""Every kind of event: the actions; ``restore``/``export`` from the command line; ``config`` (loaded,
rejected); ``condition`` (an object's status or reason changed); ``notify`` (a notification sent or
not); ``daemon`` (started, stopped); ``error`` (a cycle that failed as a whole)."""

OUTCOME_CONTEXT = ("reason", "transient")
"""Detail keys an action's event adds to its outcome's detail: why it was planned, whether a failure
was worth retrying."""
BULKY_DETAIL = ("disks", "reasons", "plan")
"""Detail keys dropped by compaction: the per-disk breakdown; the totals stay."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    outcome TEXT NOT NULL,
    message TEXT NOT NULL,
    revision TEXT,
    host TEXT,
    vm TEXT,
    policy TEXT,
    repository TEXT,
    started TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL,
    compacted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE INDEX IF NOT EXISTS events_vm ON events (vm, time);
CREATE INDEX IF NOT EXISTS events_policy ON events (policy, time);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, subject, time);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated TEXT NOT NULL
);
"""

_COLUMNS = (
    "id, time, kind, subject, outcome, message, revision, host, vm, policy, repository, started, attempts,"
    " detail, compacted"
)


def _stamp(value: datetime) -> str:
    """A fixed-width UTC time, so that text order is time order in SQL."""
    if value.tzinfo is None:
        raise ValueError("history times must be timezone-aware")
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Event:
    """One thing that happened. ``subject`` is what it is about as people read it (``esxi1/web01``,
    ``nas``, ``web01@2026-11-26T02:00Z``, a notifier's name); ``host``, ``vm``, ``policy`` and
    ``repository`` are set where they apply, for queries (``vm`` is the display name, without host)."""

    time: datetime
    kind: str
    subject: str
    outcome: EventOutcome
    message: str = ""
    revision: str | None = None
    host: str | None = None
    vm: str | None = None
    policy: str | None = None
    repository: str | None = None
    started: datetime | None = None
    attempts: int = 0
    detail: Mapping[str, Any] = field(default_factory=dict)
    id: int | None = None
    compacted: bool = False

    @property
    def seconds(self) -> float | None:
        """How long the work took (None for events that are an instant)."""
        return (self.time - self.started).total_seconds() if self.started is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time.isoformat(),
            "kind": self.kind,
            "subject": self.subject,
            "outcome": self.outcome,
            "message": self.message,
            "revision": self.revision,
            "host": self.host,
            "vm": self.vm,
            "policy": self.policy,
            "repository": self.repository,
            "started": self.started.isoformat() if self.started else None,
            "seconds": round(self.seconds, 3) if self.seconds is not None else None,
            "attempts": self.attempts,
            "detail": dict(self.detail),
            "compacted": self.compacted,
        }


def _size(value: object) -> str:
    from reconciler.units import human_size

    return human_size(int(value)) if isinstance(value, int | float) else "?"


def _outcome_message(outcome: Outcome) -> str:
    """One line for people: the error of a failed or skipped action, the gist of a done one."""
    if outcome.status != "ok":
        return outcome.error or outcome.status
    d = outcome.detail
    kind = outcome.action.kind
    if kind == "backup":
        mode = d.get("mode") or "?"
        text = (
            f"{mode}: {_size(d.get('bytes_read'))} read, {_size(d.get('bytes_sent'))} sent,"
            f" {_size(d.get('bytes_stored'))} stored"
        )
        return text + (f" ({d['fallback_reason']})" if d.get("fallback_reason") else "")
    if kind == "gc":
        return f"{d.get('chunks_freed', 0)} chunks freed, {_size(d.get('bytes_freed', 0))}"
    if kind == "verify":
        return f"{d.get('points', 0)} points, {d.get('chunks_read', 0)} chunks read: no problem"
    if kind == "cbt":
        return f"CBT {d.get('cbt', '?')} ({d.get('method', '?')})"
    if kind == "test-restore":
        return f"booted: {d.get('power_state', '?')}, heartbeat {d.get('heartbeat', '?')}"
    if kind == "prune":
        return f"restore point {d.get('point_id', '?')} deleted"
    if kind == "remove-snapshot":
        return f"snapshot {d.get('snapshot', '?')!r} removed"
    return outcome.action.reason


def _action_fields(action: Action) -> dict[str, str | None]:
    if isinstance(action, RunBackup):
        return {
            "host": action.host_name,
            "vm": action.vm,
            "policy": action.policy,
            "repository": action.repository,
        }
    if isinstance(action, SetCbt):
        return {"host": action.host_name, "vm": action.vm, "policy": action.policy}
    if isinstance(action, RemoveSnapshot):
        return {"host": action.host_name, "vm": action.vm}
    if isinstance(action, PrunePoint):
        return {"vm": action.vm, "policy": action.policy, "repository": action.repository}
    if isinstance(action, CollectGarbage):
        return {"repository": action.repository}
    if isinstance(action, RunVerify):
        return {"policy": action.verify_policy, "repository": action.repository}
    if isinstance(action, RunTestRestore):
        return {
            "host": action.host_name,
            "vm": action.vm,
            "policy": action.verify_policy,
            "repository": action.repository,
        }
    return {}


def event_from_outcome(outcome: Outcome, revision: str) -> Event:
    """The history's record of one applied action."""
    detail = dict(outcome.detail)
    detail["reason"] = outcome.action.reason
    if outcome.status == "failed":
        detail["transient"] = outcome.transient
    return Event(
        time=outcome.finished,
        kind=outcome.action.kind,
        subject=outcome.action.subject,
        outcome=outcome.status,
        message=_outcome_message(outcome),
        revision=revision,
        started=outcome.started,
        attempts=outcome.attempts,
        detail=detail,
        **_action_fields(outcome.action),  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class HistoryQuery:
    """Which events: all conditions given must hold. ``vm`` matches the display name or
    ``host/name``; ``kinds`` empty means every kind. Newest first, at most ``limit``."""

    since: datetime | None = None
    until: datetime | None = None
    kinds: Sequence[str] = ()
    vm: str | None = None
    host: str | None = None
    policy: str | None = None
    repository: str | None = None
    subject: str | None = None
    outcomes: Sequence[str] = ()
    limit: int | None = 1000


@dataclass(frozen=True)
class Retention:
    """How long the history is kept: ``keep`` whole; the per-disk detail only ``keep_detail``; never more
    than ``max_events`` rows (a clock gone wrong or a flood of events cannot fill the disk)."""

    keep: timedelta = timedelta(days=400)
    keep_detail: timedelta = timedelta(days=90)
    max_events: int = 200_000

    def to_dict(self) -> dict[str, float | int]:
        return {
            "keep_seconds": self.keep.total_seconds(),
            "keep_detail_seconds": self.keep_detail.total_seconds(),
            "max_events": self.max_events,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Retention:
        """The retention :meth:`to_dict` wrote; the default for None or a document it cannot read."""
        if data is None:
            return cls()
        try:
            return cls(
                timedelta(seconds=float(data["keep_seconds"])),
                timedelta(seconds=float(data["keep_detail_seconds"])),
                int(data["max_events"]),
            )
        except (TypeError, KeyError, ValueError):
            return cls()


COMPACTED_KEY = "history/compacted"
"""The state document saying when the event log was last compacted, and with which retention."""
COMPACT_EVERY = timedelta(days=1)


@dataclass(frozen=True)
class CompactionReport:
    deleted: int
    compacted: int
    vacuumed: bool


def _row_event(row: Sequence[Any]) -> Event:
    (id_, time, kind, subject, outcome, message, revision, host, vm, policy, repo, started, attempts,
     detail, compacted) = row  # fmt: skip
    return Event(
        time=datetime.fromisoformat(time),
        kind=kind,
        subject=subject,
        outcome=outcome,
        message=message,
        revision=revision,
        host=host,
        vm=vm,
        policy=policy,
        repository=repo,
        started=datetime.fromisoformat(started) if started else None,
        attempts=int(attempts),
        detail=json.loads(detail),
        id=int(id_),
        compacted=bool(compacted),
    )


def _split_vm(subject: str) -> tuple[str | None, str | None]:
    host, slash, vm = subject.partition("/")
    return (host, vm) if slash else (None, None)


def migrate_actions(db: sqlite3.Connection) -> None:
    """Schema 1 → 2: the action log becomes events (it was the history of outcomes), then goes."""
    rows = db.execute(
        "SELECT time, revision, kind, subject, status, error, attempts, detail FROM actions ORDER BY id"
    ).fetchall()
    for time, revision, kind, subject, status, error, attempts, detail in rows:
        host, vm = _split_vm(subject) if kind in ("backup", "cbt", "remove-snapshot", "test-restore") else (
            None, None,
        )  # fmt: skip
        repository = subject if kind in ("gc", "verify") else None
        db.execute(
            "INSERT INTO events (time, kind, subject, outcome, message, revision, host, vm, repository,"
            " attempts, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                _stamp(datetime.fromisoformat(time)),
                kind,
                subject,
                status,
                error or status,
                revision,
                host,
                vm,
                repository,
                int(attempts),
                detail,
            ),
        )
    db.execute("DROP TABLE actions")


class EventLog:
    """The history tables of one open status file (see :class:`reconciler.status.store.StatusStore`,
    which owns the connection and its lock: ``store.events``)."""

    def __init__(
        self,
        db: sqlite3.Connection,
        lock: threading.RLock,
        write: Callable[[], AbstractContextManager[sqlite3.Connection]],
    ) -> None:
        self._db = db
        self._lock = lock
        self._write = write
        """The store's write transaction (refused on a read-only store)."""

    @staticmethod
    def create(db: sqlite3.Connection) -> None:
        db.executescript(_SCHEMA)

    # -- writing -------------------------------------------------------------------------------------

    def insert(self, db: sqlite3.Connection, event: Event) -> None:
        """Add ``event`` inside a write the caller holds (the store records an outcome's run record in
        the same transaction)."""
        db.execute(
            "INSERT INTO events (time, kind, subject, outcome, message, revision, host, vm, policy,"
            " repository, started, attempts, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                _stamp(event.time),
                event.kind,
                event.subject,
                event.outcome,
                " ".join(event.message.split()),
                event.revision,
                event.host,
                event.vm,
                event.policy,
                event.repository,
                _stamp(event.started) if event.started else None,
                event.attempts,
                json.dumps(dict(event.detail), ensure_ascii=False, default=str),
            ),
        )

    def record(self, event: Event) -> None:
        """Add one event."""
        with self._write() as db:
            self.insert(db, event)

    # -- reading (the interface of the status page, the metrics and `history`) --------------------------

    def events(self, query: HistoryQuery = HistoryQuery()) -> list[Event]:
        """The events matching ``query``, newest first."""
        where: list[str] = []
        params: list[Any] = []
        if query.since is not None:
            where.append("time >= ?")
            params.append(_stamp(query.since))
        if query.until is not None:
            where.append("time < ?")
            params.append(_stamp(query.until))
        for column, values in (("kind", query.kinds), ("outcome", query.outcomes)):
            if values:
                where.append(f"{column} IN ({', '.join('?' for _ in values)})")
                params.extend(values)
        if query.vm is not None:
            host, name = _split_vm(query.vm)
            if host is not None:
                where.append("host = ? AND vm = ?")
                params.extend((host, name))
            else:
                where.append("vm = ?")
                params.append(query.vm)
        for column, value in (
            ("host", query.host),
            ("policy", query.policy),
            ("repository", query.repository),
            ("subject", query.subject),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = f"SELECT {_COLUMNS} FROM events"  # noqa: S608 - columns are ours, values are parameters
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY time DESC, id DESC"
        if query.limit is not None:
            sql += " LIMIT ?"
            params.append(query.limit)
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [_row_event(row) for row in rows]

    def latest(
        self,
        kinds: Sequence[str],
        *,
        outcomes: Sequence[str] = ("ok", "failed"),
        command_line: bool = True,
    ) -> dict[tuple[str, str], Event]:
        """The newest event of each (kind, subject) among ``kinds`` with one of ``outcomes`` (by default
        work that was done: skipped attempts say nothing about the data): the last verify of each
        repository, the last backup of each VM. ``command_line=False`` leaves out the runs of verbs from
        the command line (:func:`reconciler.commands.common.record_command`): the notifications judge the
        daemon's own checks, which a hand-run verify of other repositories, or one that stopped at a
        lock, must neither hide nor fake."""
        kind_marks = ", ".join("?" for _ in kinds)
        outcome_marks = ", ".join("?" for _ in outcomes)
        origin = "" if command_line else " AND json_extract(detail, '$.command_line') IS NULL"
        sql = (
            f"SELECT {_COLUMNS} FROM events WHERE id IN (SELECT MAX(id) FROM events"  # noqa: S608
            f" WHERE kind IN ({kind_marks}) AND outcome IN ({outcome_marks}){origin} GROUP BY kind, subject)"
        )
        with self._lock:
            rows = self._db.execute(sql, (*kinds, *outcomes)).fetchall()
        out = {}
        for row in rows:
            event = _row_event(row)
            out[(event.kind, event.subject)] = event
        return out

    def counts(self, since: datetime, until: datetime | None = None) -> dict[tuple[str, str], int]:
        """How many events of each (kind, outcome) happened in ``[since, until)``."""
        sql = "SELECT kind, outcome, COUNT(*) FROM events WHERE time >= ?"
        params: list[Any] = [_stamp(since)]
        if until is not None:
            sql += " AND time < ?"
            params.append(_stamp(until))
        with self._lock:
            rows = self._db.execute(sql + " GROUP BY kind, outcome", params).fetchall()
        return {(kind, outcome): int(n) for kind, outcome, n in rows}

    def totals(self, since: datetime, until: datetime | None = None) -> dict[str, int]:
        """Bytes read, sent and stored by the successful backups in ``[since, until)``."""
        sql = (
            "SELECT COALESCE(SUM(json_extract(detail, '$.bytes_read')), 0),"
            " COALESCE(SUM(json_extract(detail, '$.bytes_sent')), 0),"
            " COALESCE(SUM(json_extract(detail, '$.bytes_stored')), 0)"
            " FROM events WHERE kind = 'backup' AND outcome = 'ok' AND time >= ?"
        )
        params: list[Any] = [_stamp(since)]
        if until is not None:
            sql += " AND time < ?"
            params.append(_stamp(until))
        with self._lock:
            read, sent, stored = self._db.execute(sql, params).fetchone()
        return {"bytes_read": int(read), "bytes_sent": int(sent), "bytes_stored": int(stored)}

    # -- keeping it small ------------------------------------------------------------------------------

    def compact(self, now: datetime, retention: Retention = Retention()) -> CompactionReport:
        """Delete events older than ``retention.keep``, drop the bulky detail of those older than
        ``keep_detail``, keep at most ``max_events`` rows, and vacuum when a quarter of the file is free
        pages."""
        with self._write() as db:
            deleted = db.execute(
                "DELETE FROM events WHERE time < ?", (_stamp(now - retention.keep),)
            ).rowcount
            deleted += db.execute(
                "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (retention.max_events,)
            ).rowcount
            rows = db.execute(
                "SELECT id, detail FROM events WHERE compacted = 0 AND time < ?",
                (_stamp(now - retention.keep_detail),),
            ).fetchall()
            for id_, detail in rows:
                data = json.loads(detail)
                for key in BULKY_DETAIL:
                    data.pop(key, None)
                db.execute(
                    "UPDATE events SET detail = ?, compacted = 1 WHERE id = ?",
                    (json.dumps(data, ensure_ascii=False), id_),
                )
        vacuumed = False
        with self._lock:
            (free,) = self._db.execute("PRAGMA freelist_count").fetchone()
            (pages,) = self._db.execute("PRAGMA page_count").fetchone()
            if free > 256 and free * 4 > pages:
                self._db.execute("VACUUM")
                vacuumed = True
        return CompactionReport(deleted, len(rows), vacuumed)

    def compact_daily(self, now: datetime, retention: Retention | None = None) -> CompactionReport | None:
        """:meth:`compact` when a day has passed since the last time (None when not yet). ``retention``:
        the daemon's (``run --keep-history``), remembered here; None (``apply`` from cron, without a
        daemon) uses the one the daemon last used on this file, else the default, so a run of ``apply``
        never deletes what the daemon was told to keep."""
        last = self.get_state(COMPACTED_KEY)
        if retention is None:
            retention = Retention.from_dict(last.get("retention") if last else None)
        if last is not None and now - datetime.fromisoformat(last["time"]) < COMPACT_EVERY:
            return None
        report = self.compact(now, retention)
        self.put_state(COMPACTED_KEY, {"time": now.isoformat(), "retention": retention.to_dict()}, now)
        return report

    # -- small state documents (the notifications' memory) --------------------------------------------

    def get_state(self, key: str) -> dict[str, Any] | None:
        """The JSON document stored under ``key`` (None if none)."""
        with self._lock:
            try:
                row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
            except sqlite3.OperationalError:  # an older file opened read-only: no state yet
                return None
        return json.loads(row[0]) if row else None

    def put_state(self, key: str, value: Mapping[str, Any], now: datetime) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO state (key, value, updated) VALUES (?, ?, ?)",
                (key, json.dumps(dict(value), ensure_ascii=False, default=str), _stamp(now)),
            )

    def state_keys(self, prefix: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key FROM state WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)
            ).fetchall()
        return [key for (key,) in rows]

    def delete_state(self, key: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM state WHERE key = ?", (key,))
