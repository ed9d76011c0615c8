"""The status store: run history, event log, plans and conditions in one SQLite file.

``<state dir>/status.db``, in WAL mode so the daemon writes while ``status`` and ``plan`` read at the
same moment (readers open it read-only and never block the writer). stdlib ``sqlite3`` only: nothing to
install on a NAS, one file to back up or delete.

The run history is the reconciler's memory between loops and restarts: when each scheduled job last
started and succeeded, and how long a failing one waits (:mod:`.backoff`). The event log (every outcome,
config reload, condition change and notification: :mod:`.history`, ``store.events``) and the last plans
are for people (``status``, ``history``) and are trimmed so the file stays small over months.

The schema has a version: a file of an older version is migrated when opened for writing (each step in
:data:`MIGRATIONS`, in one transaction), and read as it is when opened read-only; a newer one is refused.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from reconciler.planning.actions import Outcome, Plan, RunBackup, RunTestRestore, RunVerify
from reconciler.planning.observed import RunRecord, backup_key, verify_key
from reconciler.status.backoff import retry_delay
from reconciler.status.conditions import Condition, ConditionStatus, ObjectKind, sort_conditions
from reconciler.status.history import (
    ACTION_KINDS,
    OUTCOME_CONTEXT,
    EventLog,
    event_from_outcome,
    migrate_actions,
)
from reconciler.status.source import SourceStatus

log = structlog.get_logger(__name__)

STATUS_FILE = "status.db"
SCHEMA_VERSION = 2
KEEP_PLANS = 50
BUSY_TIMEOUT_SECONDS = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    last_started TEXT,
    last_succeeded TEXT,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    retry_after TEXT,
    last_error TEXT,
    terminal INTEGER NOT NULL DEFAULT 0,
    failed_revision TEXT
);
CREATE TABLE IF NOT EXISTS plans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    revision TEXT NOT NULL,
    actions INTEGER NOT NULL,
    notices INTEGER NOT NULL,
    next_due TEXT,
    plan TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS conditions (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    last_success TEXT,
    next_due TEXT,
    revision TEXT,
    updated TEXT,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS source (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    updated TEXT NOT NULL
);
"""


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: migrate_actions,
}
"""From version N to N + 1 (the tables of the new version exist already: ``_SCHEMA`` and
:meth:`EventLog.create` only add what is missing)."""

_LEGACY_V1 = """
CREATE TEMP VIEW events AS SELECT id, time, kind, subject, status AS outcome,
    COALESCE(error, status) AS message, revision,
    CASE WHEN instr(subject, '/') > 0 AND kind IN ('backup', 'cbt', 'remove-snapshot', 'test-restore')
        THEN substr(subject, 1, instr(subject, '/') - 1) END AS host,
    CASE WHEN instr(subject, '/') > 0 AND kind IN ('backup', 'cbt', 'remove-snapshot', 'test-restore')
        THEN substr(subject, instr(subject, '/') + 1) END AS vm,
    NULL AS policy, CASE WHEN kind IN ('gc', 'verify') THEN subject END AS repository,
    NULL AS started, attempts, detail, 0 AS compacted
    FROM main.actions;
CREATE TEMP TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated TEXT NOT NULL);
"""
"""A version-1 file opened read-only (a daemon of the older version still runs): its action log read
as events, through a view in the connection's own temporary schema (nothing is written to the file)."""


class StatusStoreError(Exception):
    """The status file cannot be opened or has a newer schema than this version understands."""


@dataclass(frozen=True)
class ActionLogEntry:
    """One applied action, as ``status`` lists recent failures."""

    time: datetime
    revision: str
    kind: str
    subject: str
    status: str
    error: str | None
    attempts: int
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "time": self.time.isoformat()}


@dataclass(frozen=True)
class PlanRecord:
    """The summary of a recorded plan (and the plan itself, as saved JSON)."""

    time: datetime
    revision: str
    actions: int
    notices: int
    next_due: datetime | None
    plan: dict[str, Any]


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("status store times must be timezone-aware")
    return value.astimezone(timezone.utc).isoformat()


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class StatusStore:
    """One open status file. Thread-safe: the daemon records outcomes from apply's worker threads."""

    def __init__(self, connection: sqlite3.Connection, path: Path, *, readonly: bool) -> None:
        self._db = connection
        self.path = path
        self.readonly = readonly
        self._lock = threading.RLock()
        self.events = EventLog(connection, self._lock, self._write)
        """The event log and job history (:class:`~reconciler.status.history.EventLog`)."""

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> StatusStore:
        """Open (creating it and its directory unless ``readonly``) the status file at ``path``.

        Read-only opens fail with :class:`StatusStoreError` when the file does not exist yet.
        """
        try:
            if readonly:
                if not path.exists():
                    raise StatusStoreError(f"{path}: no status recorded yet")
                db = sqlite3.connect(
                    f"{path.resolve().as_uri()}?mode=ro",
                    uri=True,
                    timeout=BUSY_TIMEOUT_SECONDS,
                    check_same_thread=False,
                )
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)  # idempotent: only what is missing
                EventLog.create(db)
                with db:  # the version check and any migration: one transaction
                    cls._check_version(db, path, create=True)
                return cls(db, path, readonly=False)
            if cls._check_version(db, path, create=False) == 1:
                db.executescript(_LEGACY_V1)
        except sqlite3.Error as exc:
            raise StatusStoreError(f"{path}: {exc}") from exc
        return cls(db, path, readonly=True)

    @staticmethod
    def _check_version(db: sqlite3.Connection, path: Path, *, create: bool) -> int:
        """The file's schema version; opened for writing (``create``), an older one is migrated."""
        row = db.execute("SELECT version FROM schema_version").fetchone()
        if row is None and create:
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            return SCHEMA_VERSION
        version = row[0] if row else None
        if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
            raise StatusStoreError(
                f"{path}: status schema version {version}, this program reads {SCHEMA_VERSION}"
                + ("; a newer esxi-reconciler wrote it" if isinstance(version, int) and version > 1 else "")
            )
        if create:
            for step in range(version, SCHEMA_VERSION):
                MIGRATIONS[step](db)
                log.info("status.migrated", path=str(path), version=step + 1)
            db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        return int(version)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> StatusStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise StatusStoreError(f"{self.path}: opened read-only")
        with self._lock, self._db:
            yield self._db

    # -- run history ---------------------------------------------------------------------------------

    def history(self, revision: str | None = None) -> dict[str, RunRecord]:
        """Every job's :class:`RunRecord`. With the current config ``revision``, a terminal failure
        recorded under another revision no longer holds the job back (the config was changed)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, last_started, last_succeeded, consecutive_failures, retry_after, last_error,"
                " terminal, failed_revision FROM runs"
            ).fetchall()
        out: dict[str, RunRecord] = {}
        for key, started, succeeded, failures, retry_after, error, terminal, failed_revision in rows:
            retry = _time(retry_after)
            if terminal and revision is not None and failed_revision != revision:
                retry = None
            out[key] = RunRecord(_time(started), _time(succeeded), int(failures), retry, error)
        return out

    def record_outcome(self, outcome: Outcome, revision: str, *, rng: random.Random | None = None) -> None:
        """Log the outcome; for backups, verifications and test restores also update the job's run
        record (skipped actions were not attempted: they change no record)."""
        action = outcome.action
        with self._write() as db:
            self.events.insert(db, event_from_outcome(outcome, revision))
            key: str | None = None
            if isinstance(action, RunBackup):
                key = backup_key(action.policy, action.host_name, action.vm)
            elif isinstance(action, (RunVerify, RunTestRestore)):
                key = verify_key(action.verify_policy)
            if key is None or outcome.status == "skipped":
                return
            db.execute("INSERT OR IGNORE INTO runs (key) VALUES (?)", (key,))
            if outcome.ok:
                db.execute(
                    "UPDATE runs SET last_started = ?, last_succeeded = ?, consecutive_failures = 0,"
                    " retry_after = NULL, last_error = NULL, terminal = 0, failed_revision = NULL"
                    " WHERE key = ?",
                    (_iso(outcome.started), _iso(outcome.finished), key),
                )
                return
            (failures,) = db.execute("SELECT consecutive_failures FROM runs WHERE key = ?", (key,)).fetchone()
            failures = int(failures) + 1
            terminal = not outcome.transient
            retry_after = outcome.finished + retry_delay(failures, terminal=terminal, rng=rng)
            db.execute(
                "UPDATE runs SET last_started = ?, consecutive_failures = ?, retry_after = ?, last_error = ?,"
                " terminal = ?, failed_revision = ? WHERE key = ?",
                (
                    _iso(outcome.started),
                    failures,
                    _iso(retry_after),
                    outcome.error or "failed",
                    int(terminal),
                    revision,
                    key,
                ),
            )
        log.debug("status.run_recorded", key=key, status=outcome.status)

    def actions(self, *, limit: int = 20, status: str | None = None) -> list[ActionLogEntry]:
        """The most recent outcomes of actions, newest first (only those of ``status`` if given)."""
        from reconciler.status.history import HistoryQuery

        query = HistoryQuery(kinds=ACTION_KINDS, outcomes=(status,) if status else (), limit=limit)
        return [
            ActionLogEntry(
                e.time,
                e.revision or "",
                e.kind,
                e.subject,
                e.outcome,
                None if e.outcome == "ok" else e.message,
                e.attempts,
                {k: v for k, v in e.detail.items() if k not in OUTCOME_CONTEXT},
            )
            for e in self.events.events(query)
        ]

    # -- plans ---------------------------------------------------------------------------------------

    def record_plan(self, plan: Plan) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO plans (time, revision, actions, notices, next_due, plan)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    _iso(plan.created),
                    plan.revision,
                    len(plan.actions),
                    len(plan.notices),
                    _iso(plan.next_due),
                    json.dumps(plan.to_dict(), ensure_ascii=False),
                ),
            )
            db.execute("DELETE FROM plans WHERE id <= (SELECT MAX(id) FROM plans) - ?", (KEEP_PLANS,))

    def last_plan(self) -> PlanRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT time, revision, actions, notices, next_due, plan FROM plans ORDER BY id DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        time, revision, actions, notices, next_due, plan = row
        return PlanRecord(
            datetime.fromisoformat(time),
            revision,
            int(actions),
            int(notices),
            _time(next_due),
            json.loads(plan),
        )

    # -- conditions ----------------------------------------------------------------------------------

    def set_condition(self, condition: Condition) -> None:
        """Insert or replace one object's condition."""
        with self._write() as db:
            self._upsert(db, condition)

    def replace_conditions(self, conditions: Iterable[Condition], *, keep_kinds: Sequence[str] = ()) -> None:
        """Make ``conditions`` the whole set, except rows of ``keep_kinds`` (objects no longer in the
        config disappear from ``status``)."""
        with self._write() as db:
            if keep_kinds:
                marks = ", ".join("?" for _ in keep_kinds)
                db.execute(f"DELETE FROM conditions WHERE kind NOT IN ({marks})", tuple(keep_kinds))  # noqa: S608
            else:
                db.execute("DELETE FROM conditions")
            for condition in conditions:
                self._upsert(db, condition)

    @staticmethod
    def _upsert(db: sqlite3.Connection, c: Condition) -> None:
        db.execute(
            "INSERT OR REPLACE INTO conditions"
            " (kind, name, status, reason, message, last_success, next_due, revision, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                c.kind,
                c.name,
                c.status,
                c.reason,
                c.message,
                _iso(c.last_success),
                _iso(c.next_due),
                c.revision,
                _iso(c.updated),
            ),
        )

    def conditions(self) -> list[Condition]:
        """Every recorded condition, sorted by kind then name."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, name, status, reason, message, last_success, next_due, revision, updated"
                " FROM conditions"
            ).fetchall()
        out = []
        for kind, name, status, reason, message, last_success, next_due, revision, updated in rows:
            kind_: ObjectKind = kind
            status_: ConditionStatus = status
            out.append(
                Condition(
                    kind_,
                    name,
                    status_,
                    reason,
                    message,
                    _time(last_success),
                    _time(next_due),
                    revision,
                    _time(updated),
                )
            )
        return sort_conditions(out)

    # -- the git source -------------------------------------------------------------------------------

    def record_source(self, status: SourceStatus, now: datetime, condition: Condition | None = None) -> None:
        """Store the git source's revisions (one row per source, replaced) and, in the same
        transaction, its condition: a reader never sees a refused revision with a Ready condition."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO source (name, status, updated) VALUES (?, ?, ?)",
                (status.name, json.dumps(status.to_dict(), ensure_ascii=False), _iso(now)),
            )
            if condition is not None:
                self._upsert(db, condition)

    def forget_source(self) -> None:
        """The daemon follows no git source (any more): drop its row and condition."""
        with self._write() as db:
            db.execute("DELETE FROM source")
            db.execute("DELETE FROM conditions WHERE kind = 'source'")

    def source_status(self) -> SourceStatus | None:
        """The git source's revisions, or None when the daemon does not follow one (or never did)."""
        with self._lock:
            try:
                row = self._db.execute("SELECT status FROM source ORDER BY updated DESC LIMIT 1").fetchone()
            except sqlite3.OperationalError:  # a file written before the table existed, opened read-only
                return None
        return SourceStatus.from_dict(json.loads(row[0])) if row else None


def status_path(state_dir: Path) -> Path:
    """Where the status file of a state directory is."""
    return state_dir / STATUS_FILE


def read_history(state_dir: Path, revision: str | None = None) -> dict[str, RunRecord]:
    """The run history of ``state_dir`` for one-shot commands (``plan``, ``apply``): read-only, and empty
    when nothing has been recorded yet."""
    path = status_path(state_dir)
    if not path.exists():
        return {}
    with StatusStore.open(path, readonly=True) as store:
        return store.history(revision)
