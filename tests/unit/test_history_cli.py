"""``esxi-reconciler history`` as a user runs it: the table (with each disk of a VM's backups), the
filters, ``--json`` against its shipped schema, and the exit codes (3 without status data, 64 for a
filter it cannot read)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.planning.actions import Outcome, RunBackup
from reconciler.status.history import Event
from reconciler.status.store import StatusStore, status_path
from tests.unit.test_cli_outcomes import check, one_line, run

REV = "git:" + "c" * 40


def fill(state: Path) -> datetime:
    """Three days of events: an old failed backup of db01, a backup of web01 with its disk, a failed
    notification and a config load. Returns now."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    with StatusStore.open(status_path(state)) as store:
        old = now - timedelta(days=3)
        db = RunBackup(reason="due", policy="daily", host_name="esxi1", vm="db01", vmid="2", repository="nas")
        store.record_outcome(
            Outcome(db, "failed", old, old + timedelta(minutes=3), error="snapshot timed out"), REV
        )
        web = RunBackup(
            reason="due", policy="hourly", host_name="esxi1", vm="web01", vmid="1", repository="nas"
        )
        at = now - timedelta(hours=2)
        detail = {
            "point_id": "p1",
            "mode": "cbt",
            "bytes_read": 2 << 30,
            "bytes_sent": 2 << 30,
            "bytes_stored": 300 << 20,
            "seconds": 41.0,
            "fallback_reason": None,
            "disks": [
                {
                    "label": "Hard disk 1",
                    "mode": "cbt",
                    "reasons": ["CBT: the previous point's changeId"],
                    "bytes_read": 2 << 30,
                    "bytes_stored": 300 << 20,
                }
            ],
        }
        store.record_outcome(Outcome(web, "ok", at, at + timedelta(seconds=41), detail=detail), REV)
        store.events.record(
            Event(
                now - timedelta(hours=1),
                "notify",
                "ops-mail",
                "failed",
                "Backup failed: VM esxi1/db01: not sent",
                detail={"error": "535 authentication failed", "message_kind": "alert"},
            )
        )
        store.events.record(Event(now, "config", "config", "info", "loaded: 2 hosts", revision=REV))
    return now


def test_without_status_data_exit_3_naming_the_state_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "--state-dir", str(tmp_path / "none"), "history", "--json")
    assert code == 3
    assert "no status data" in one_line(err) and str(tmp_path / "none") in err
    check("error", json.loads(out))


def test_the_table_newest_first_with_the_disks_of_a_vm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path)
    code, out, _ = run(capsys, "--state-dir", str(tmp_path), "history")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "KIND", "SUBJECT", "OUTCOME", "TOOK", "WHAT"]
    assert [line.split()[2] for line in lines[1:5]] == ["config", "notify", "backup", "backup"]
    assert "snapshot timed out" in lines[4] and "3m" in lines[4]
    assert lines[-1] == "4 events"
    code, out, _ = run(capsys, "--state-dir", str(tmp_path), "history", "--vm", "web01")
    assert code == 0
    backup_line, disk_line = out.splitlines()[1:3]
    assert "esxi1/web01" in backup_line and "41s" in backup_line and "cbt: 2.0 GiB read" in backup_line
    assert (
        disk_line
        == "    Hard disk 1: cbt, 2.0 GiB read, 300.0 MiB stored (CBT: the previous point's changeId)"
    )


def test_filters_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill(tmp_path)
    base = ("--state-dir", str(tmp_path), "history", "--json")

    def subjects(*argv: str) -> list[str]:
        code, out, _ = run(capsys, *base, *argv)
        assert code == 0
        doc = json.loads(out)
        check("history", doc)
        assert doc["count"] == len(doc["events"])
        return [e["subject"] for e in doc["events"]]

    assert subjects() == ["config", "ops-mail", "esxi1/web01", "esxi1/db01"]
    assert subjects("--failed") == ["ops-mail", "esxi1/db01"]
    assert subjects("--since", "1d") == ["config", "ops-mail", "esxi1/web01"]
    assert subjects("--policy", "daily") == ["esxi1/db01"]
    assert subjects("--kind", "notify", "--kind", "config") == ["config", "ops-mail"]
    assert subjects("--vm", "esxi1/db01", "--since", "1d") == []
    assert subjects("--limit", "1") == ["config"]
    code, out, _ = run(capsys, *base, "--vm", "web01")
    (event,) = json.loads(out)["events"]
    assert event["detail"]["disks"][0]["reasons"] == ["CBT: the previous point's changeId"]
    assert (event["revision"], event["policy"], event["seconds"]) == (REV, "hourly", 41.0)
    code, out, _ = run(capsys, *base, "--kind", "notify")
    (sent,) = json.loads(out)["events"]
    assert sent["outcome"] == "failed" and sent["detail"]["error"] == "535 authentication failed"
    code, out, _ = run(capsys, "--state-dir", str(tmp_path), "history", "--vm", "nosuch")
    assert (code, out.strip()) == (0, "no events recorded that match")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--since", "last tuesday"], "neither an age (7d, 24h) nor a date/time"),
        (["--kind", "backups"], "invalid choice: 'backups'"),
        (["--limit", "-1"], "must be 0 (no limit) or more"),
    ],
)
def test_a_filter_it_cannot_read_is_a_usage_error(
    argv: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path)
    with pytest.raises(SystemExit) as caught:
        run(capsys, "--state-dir", str(tmp_path), "history", *argv)
    assert caught.value.code == 64
    assert said in capsys.readouterr().err


def test_a_reader_that_goes_away_ends_it_quietly(tmp_path: Path) -> None:
    """``history --json | head``: exit 141 (as for SIGPIPE), nothing on stderr, no traceback."""
    with StatusStore.open(status_path(tmp_path)) as store:
        now = datetime.now(timezone.utc)
        for i in range(3000):  # far more than a pipe holds
            store.events.record(Event(now, "condition", f"vm esxi1/vm{i}", "info", "Ready UpToDate " * 4))
    cli = Path(sys.executable).parent / "esxi-reconciler"
    history = f"{cli} --state-dir {tmp_path} history --json --limit 0"
    script = f"{history} | head -c 100 >/dev/null; echo ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert (done.stdout, done.stderr) == ("141\n", "")
