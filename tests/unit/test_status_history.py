"""The event log and job history: outcomes become events with their detail, queries by VM, policy, kind
and time, the latest check per subject, counts and totals, compaction that bounds the file, state
documents, and a version-1 status file migrated (writer) or read as it is (reader)."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.planning.actions import Outcome, OutcomeStatus, RunBackup, RunVerify
from reconciler.status.history import Event, HistoryQuery, Retention
from reconciler.status.store import SCHEMA_VERSION, StatusStore, StatusStoreError, status_path

UTC = timezone.utc
T0 = datetime(2026, 11, 26, 2, 0, tzinfo=UTC)
REV = "git:" + "b" * 40


def backup(vm: str = "web01", host: str = "esxi1", policy: str = "web-daily") -> RunBackup:
    return RunBackup(
        reason="due since 02:00", policy=policy, host_name=host, vm=vm, vmid="1", repository="nas"
    )


def backup_detail() -> dict[str, object]:
    return {
        "point_id": "p1",
        "mode": "cbt",
        "bytes_read": 3 << 20,
        "bytes_sent": 3 << 20,
        "bytes_stored": 1 << 20,
        "seconds": 42.0,
        "fallback_reason": None,
        "disks": [{"label": "Hard disk 1", "mode": "cbt", "reasons": ["CBT changeId of the last point"]}],
    }


def test_a_backup_outcome_is_an_event_with_its_disks(tmp_path: Path) -> None:
    with StatusStore.open(status_path(tmp_path)) as store:
        store.record_outcome(
            Outcome(backup(), "ok", T0, T0 + timedelta(seconds=42), detail=backup_detail()), REV
        )
        (event,) = store.events.events()
    assert (event.kind, event.subject, event.outcome) == ("backup", "esxi1/web01", "ok")
    assert (event.host, event.vm, event.policy, event.repository) == ("esxi1", "web01", "web-daily", "nas")
    assert event.revision == REV and event.seconds == 42.0 and event.attempts == 1
    assert event.message == "cbt: 3.0 MiB read, 3.0 MiB sent, 1.0 MiB stored"
    assert event.detail["disks"][0]["reasons"] == ["CBT changeId of the last point"]
    assert event.detail["reason"] == "due since 02:00"


def test_queries_by_vm_policy_kind_outcome_and_time(tmp_path: Path) -> None:
    with StatusStore.open(status_path(tmp_path)) as store:
        runs: list[tuple[str, str, OutcomeStatus]] = [
            ("web01", "esxi1", "ok"),
            ("db01", "esxi1", "failed"),
            ("web01", "esxi2", "ok"),
        ]
        for i, (vm, host, status) in enumerate(runs):
            at = T0 + timedelta(hours=i)
            store.record_outcome(
                Outcome(backup(vm, host), status, at, at, error="boom" if status != "ok" else None), REV
            )
        verify = RunVerify(reason="due", verify_policy="weekly", repository="nas", read_data_percent=10)
        store.record_outcome(Outcome(verify, "failed", T0, T0 + timedelta(hours=5), error="2 problems"), REV)
        store.events.record(Event(T0 + timedelta(hours=6), "config", "config", "info", "loaded"))
        q = store.events.events
        assert [e.host for e in q(HistoryQuery(vm="web01"))] == ["esxi2", "esxi1"]
        assert [e.subject for e in q(HistoryQuery(vm="esxi1/web01"))] == ["esxi1/web01"]
        assert [e.kind for e in q(HistoryQuery(policy="weekly"))] == ["verify"]
        assert [e.subject for e in q(HistoryQuery(outcomes=("failed",)))] == ["nas", "esxi1/db01"]
        assert [e.kind for e in q(HistoryQuery(since=T0 + timedelta(hours=5)))] == ["config", "verify"]
        assert len(q(HistoryQuery(kinds=("backup",), limit=2))) == 2
        latest = store.events.latest(("verify", "backup"))
        assert latest[("verify", "nas")].message == "2 problems"
        assert latest[("backup", "esxi2/web01")].outcome == "ok"
        assert store.events.counts(T0) == {
            ("backup", "ok"): 2,
            ("backup", "failed"): 1,
            ("verify", "failed"): 1,
            ("config", "info"): 1,
        }
        assert store.events.totals(T0) == {"bytes_read": 0, "bytes_sent": 0, "bytes_stored": 0}
        # status's recent failures come from the same log
        assert [a.subject for a in store.actions(status="failed")] == ["nas", "esxi1/db01"]


def test_the_daemons_checks_apart_from_runs_of_verbs_from_the_command_line(tmp_path: Path) -> None:
    """A verify run by hand (recorded with its command line) is in the history, but the newest check the
    notifications judge stays the daemon's own: a hand-run verify that stopped at a lock neither hides
    the daemon's damage report nor becomes one."""
    with StatusStore.open(status_path(tmp_path)) as store:
        verify = RunVerify(reason="due", verify_policy="weekly", repository="nas", read_data_percent=10)
        store.record_outcome(Outcome(verify, "failed", T0, T0, error="2 damaged chunks"), REV)
        by_hand = {"command_line": {"command": "verify", "repositories": ["nas"]}, "exit_code": 1}
        later = T0 + timedelta(hours=1)
        store.events.record(Event(later, "verify", "nas", "failed", "locked by a backup", detail=by_hand))
        store.events.record(Event(later, "verify", "every repository", "failed", "locked", detail=by_hand))
        assert store.events.latest(("verify",))[("verify", "nas")].message == "locked by a backup"
        daemons = store.events.latest(("verify",), command_line=False)
    assert list(daemons) == [("verify", "nas")] and daemons[("verify", "nas")].message == "2 damaged chunks"


def test_compaction_deletes_old_events_drops_old_detail_and_bounds_the_rows(tmp_path: Path) -> None:
    now = T0 + timedelta(days=500)
    with StatusStore.open(status_path(tmp_path)) as store:
        for days in (450, 100, 10):
            at = now - timedelta(days=days)
            store.record_outcome(Outcome(backup(), "ok", at, at, detail=backup_detail()), REV)
        report = store.events.compact(
            now, Retention(keep=timedelta(days=400), keep_detail=timedelta(days=90))
        )
        assert (report.deleted, report.compacted) == (1, 1)
        old, new = sorted(store.events.events(), key=lambda e: e.time)
        assert old.compacted and "disks" not in old.detail and old.detail["bytes_stored"] == 1 << 20
        assert not new.compacted and new.detail["disks"]
        for i in range(30):
            store.events.record(Event(now, "condition", f"vm esxi1/v{i}", "info", "Ready"))
        report = store.events.compact(now, Retention(max_events=10))
        assert len(store.events.events(HistoryQuery(limit=None))) == 10


def test_compacted_once_a_day_with_the_retention_the_daemon_was_given(tmp_path: Path) -> None:
    """The daemon compacts once a day with its ``--keep-history``; ``apply`` (cron, no daemon) compacts
    with the retention the daemon last used, so it never deletes what the daemon keeps."""
    now = T0 + timedelta(days=1000)
    with StatusStore.open(status_path(tmp_path)) as store:
        for days in (900, 500, 10):
            at = now - timedelta(days=days)
            store.record_outcome(Outcome(backup(), "ok", at, at, detail=backup_detail()), REV)
        long = Retention(keep=timedelta(days=800), keep_detail=timedelta(days=30))
        first = store.events.compact_daily(now, long)
        assert first is not None and (first.deleted, first.compacted) == (1, 1)
        assert store.events.compact_daily(now + timedelta(hours=23), long) is None  # once a day
        at = now + timedelta(days=1)
        store.record_outcome(Outcome(backup(), "ok", at, at, detail=backup_detail()), REV)
        later = store.events.compact_daily(now + timedelta(days=2))  # apply: no retention of its own
        assert later is not None and later.deleted == 0  # 502 days old: kept for the daemon's 800
        assert len(store.events.events()) == 3
    with StatusStore.open(status_path(tmp_path / "fresh")) as store:  # no daemon ever: the default
        old = now - timedelta(days=500)
        store.record_outcome(Outcome(backup(), "ok", old, old, detail=backup_detail()), REV)
        report = store.events.compact_daily(now)
        assert report is not None and report.deleted == 1


def test_state_documents(tmp_path: Path) -> None:
    with StatusStore.open(status_path(tmp_path)) as store:
        assert store.events.get_state("notify/ops") is None
        store.events.put_state("notify/ops", {"sent": ["x"]}, T0)
        store.events.put_state("notify/phone", {}, T0)
        assert store.events.get_state("notify/ops") == {"sent": ["x"]}
        assert sorted(store.events.state_keys("notify/")) == ["notify/ops", "notify/phone"]
        store.events.delete_state("notify/ops")
        assert store.events.get_state("notify/ops") is None


def _version_1_file(path: Path) -> None:
    """A status file as version 1 wrote it: the action log, no events."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE schema_version (version INTEGER NOT NULL);
        INSERT INTO schema_version VALUES (1);
        CREATE TABLE runs (key TEXT PRIMARY KEY, last_started TEXT, last_succeeded TEXT,
            consecutive_failures INTEGER NOT NULL DEFAULT 0, retry_after TEXT, last_error TEXT,
            terminal INTEGER NOT NULL DEFAULT 0, failed_revision TEXT);
        CREATE TABLE actions (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL,
            revision TEXT NOT NULL, kind TEXT NOT NULL, subject TEXT NOT NULL,
            status TEXT NOT NULL, error TEXT,
            attempts INTEGER NOT NULL, detail TEXT NOT NULL);
        CREATE TABLE plans (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, revision TEXT NOT NULL,
            actions INTEGER NOT NULL, notices INTEGER NOT NULL, next_due TEXT, plan TEXT NOT NULL);
        CREATE TABLE conditions (kind TEXT NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL,
            reason TEXT NOT NULL, message TEXT NOT NULL, last_success TEXT, next_due TEXT, revision TEXT,
            updated TEXT, PRIMARY KEY (kind, name));
        INSERT INTO runs VALUES ('backup/web-daily/esxi1/web01', '2026-11-26T02:00:00+00:00',
            '2026-11-26T02:05:00+00:00', 0, NULL, NULL, 0, NULL);
        """
    )
    db.execute(
        "INSERT INTO actions (time, revision, kind, subject, status, error, attempts, detail) VALUES"
        " (?, ?, 'backup', 'esxi1/web01', 'ok', NULL, 1, ?),"
        " (?, ?, 'gc', 'nas', 'failed', 'locked', 2, '{}')",
        (
            "2026-11-26T02:05:00+00:00",
            REV,
            json.dumps({"point_id": "p1", "bytes_stored": 5}),
            "2026-11-26T02:06:00+00:00",
            REV,
        ),
    )
    db.commit()
    db.close()


def test_a_version_1_file_is_read_as_it_is_and_migrated_by_a_writer(tmp_path: Path) -> None:
    path = status_path(tmp_path)
    _version_1_file(path)
    with StatusStore.open(path, readonly=True) as reader:  # an older daemon may still be running
        events = reader.events.events()
        assert [(e.kind, e.subject, e.outcome, e.vm) for e in events] == [
            ("gc", "nas", "failed", None),
            ("backup", "esxi1/web01", "ok", "web01"),
        ]
        assert reader.events.get_state("notify/ops") is None
        assert [a.error for a in reader.actions(status="failed")] == ["locked"]
    assert sqlite3.connect(path).execute("SELECT version FROM schema_version").fetchone() == (1,)
    with StatusStore.open(path) as writer:
        assert writer.history()["backup/web-daily/esxi1/web01"].last_succeeded == T0 + timedelta(minutes=5)
        migrated = writer.events.events()
        assert [(e.kind, e.host, e.vm, e.repository, e.attempts) for e in migrated] == [
            ("gc", None, None, "nas", 2),
            ("backup", "esxi1", "web01", None, 1),
        ]
        assert migrated[1].detail == {"point_id": "p1", "bytes_stored": 5}
        writer.record_outcome(Outcome(backup(), "ok", T0 + timedelta(hours=1), T0 + timedelta(hours=1)), REV)
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "actions" not in tables and {"events", "state"} <= tables


def test_a_newer_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = status_path(tmp_path)
    with StatusStore.open(path):
        pass
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    for readonly in (True, False):
        with pytest.raises(StatusStoreError, match="a newer esxi-reconciler wrote it"):
            StatusStore.open(path, readonly=readonly)
