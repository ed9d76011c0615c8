"""``esxi-reconciler status``: the table, JSON, and the exit code monitoring relies on."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler import cli
from reconciler.daemon.lock import InstanceLock
from reconciler.planning.actions import Outcome, Plan, RunBackup
from reconciler.status.conditions import Condition
from reconciler.status.store import StatusStore, status_path

pytestmark = pytest.mark.usefixtures("restore_logging")

T0 = datetime(2026, 11, 26, 2, 0, tzinfo=timezone.utc)
REV = "git:0123456789abcdef0123456789abcdef01234567+dirty"


def fill(state: Path, *, stalled: bool) -> None:
    action = RunBackup(
        reason="due", policy="daily", host_name="esxi1", vm="db 01", vmid="2", repository="nas"
    )
    with StatusStore.open(status_path(state)) as store:
        store.record_plan(Plan(created=T0, revision=REV, observed_fingerprint="f", actions=(action,)))
        store.set_condition(
            Condition("config", "config", "Ready", "Loaded", "2 hosts", revision=REV, updated=T0)
        )
        store.set_condition(
            Condition(
                "vm",
                "esxi1/web01",
                "Ready",
                "UpToDate",
                "backed up under daily",
                last_success=T0,
                next_due=T0 + timedelta(days=1),
                revision=REV,
                updated=T0,
            )
        )
        if stalled:
            store.record_outcome(
                Outcome(action, "failed", T0, T0 + timedelta(minutes=1), error="snapshot timed out"), REV
            )
            store.set_condition(
                Condition(
                    "vm", "esxi1/db 01", "Stalled", "BackupFailed", "daily: snapshot timed out", revision=REV
                )
            )


def test_table_with_last_plan_and_recent_failures_exits_1_when_stalled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path, stalled=True)
    capsys.readouterr()

    assert cli.main(["--state-dir", str(tmp_path), "status"]) == 1

    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "daemon: not running"
    assert lines[1].split() == [
        "KIND", "NAME", "STATUS", "REASON", "MESSAGE", "LAST-SUCCESS", "NEXT-DUE", "REVISION"
    ]  # fmt: skip
    web = next(line for line in lines if "esxi1/web01" in line)
    assert "2026-11-26 02:00Z" in web
    assert "2026-11-27 02:00Z" in web
    assert "git:0123456789ab+dirty" in web
    assert any("esxi1/db 01" in line and "Stalled" in line and "BackupFailed" in line for line in lines)
    assert "last plan: 2026-11-26 02:00Z at git:0123456789ab+dirty: 1 action, 0 notices" in out
    assert "backup esxi1/db 01: snapshot timed out" in out
    assert "\n3 objects, 1 stalled\n" in out
    assert out.rstrip().endswith("UNHEALTHY:\n  stalled: 1 object Stalled: vm esxi1/db 01: BackupFailed")


def test_json_and_exit_0_when_nothing_is_stalled_while_the_daemon_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path, stalled=False)
    capsys.readouterr()
    with InstanceLock(tmp_path):  # a running daemon holds the lock; status only reads
        assert cli.main(["--state-dir", str(tmp_path), "status", "--json"]) == 0

    doc = json.loads(capsys.readouterr().out)
    assert doc["daemon"]["running"] is True
    assert doc["stalled"] == 0
    assert [(c["kind"], c["name"], c["status"]) for c in doc["conditions"]] == [
        ("config", "config", "Ready"),
        ("vm", "esxi1/web01", "Ready"),
    ]
    assert doc["conditions"][1]["revision"] == REV
    assert doc["last_plan"]["actions"] == 1
    assert doc["recent_failures"] == []


def test_no_status_yet_is_an_error_naming_the_state_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--state-dir", str(tmp_path / "nothing"), "status"]) == 3  # nothing to look at
    err = capsys.readouterr().err
    assert "no status recorded yet" in err
    assert str(tmp_path / "nothing") in err
