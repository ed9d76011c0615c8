"""``esxi-reconciler points`` shows how each disk was read and why: a line under a point read in full (or
incremental with a faster mode passed over), every disk's mode and reasons in ``--json``; a point
written before disks recorded them shows its fallback reason."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler import cli
from reconciler.facts.points import BackupMode, DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.planning.backup_mode import CBT_SINCE_PREVIOUS, DIGEST_SINCE_PREVIOUS, FIRST_BACKUP
from reconciler.repository import CHUNK_SIZE, Repository

T0 = datetime(2026, 3, 1, 2, 0, tzinfo=timezone.utc)
RESET = "CBT was reset since the previous point (change-id-rejected)"


def add_point(
    repo: Repository,
    when: datetime,
    mode: BackupMode,
    disks: list[tuple[BackupMode | None, tuple[str, ...]]],
    fallback_reason: str | None = None,
) -> RestorePoint:
    index = repo.chunk_writer(CHUNK_SIZE).finish()
    point = RestorePoint(
        id=new_point_id(when),
        policy="nightly",
        vm=VmRef("web01", "564d-01", "esxi1", "7"),
        started=when,
        snapshot_time=when,
        finished=when + timedelta(minutes=5),
        status="success",
        mode=mode,
        config_revision="git:abc",
        fallback_reason=fallback_reason,
        disks=tuple(
            DiskRecord(
                2000 + i,
                f"Hard disk {i + 1}",
                f"[ds] web01/web01_{i}.vmdk",
                CHUNK_SIZE,
                index,
                None,
                mode=disk_mode,
                reasons=reasons,
            )
            for i, (disk_mode, reasons) in enumerate(disks)
        ),
    )
    repo.write_point(point)
    return point


@pytest.fixture
def config(tmp_path: Path) -> Path:
    repo = Repository.init(tmp_path / "repo")
    add_point(repo, T0, "full", [(None, ())], fallback_reason="Hard disk 1: no previous restore point")
    add_point(repo, T0 + timedelta(days=1), "full", [("full", (FIRST_BACKUP,)), ("full", (FIRST_BACKUP,))])
    add_point(repo, T0 + timedelta(days=2), "cbt", [("cbt", (CBT_SINCE_PREVIOUS,))] * 2)
    add_point(
        repo,
        T0 + timedelta(days=3),
        "full",
        [
            ("full", (RESET, "no digest compare: SSH is disabled for the host")),
            ("cbt", (CBT_SINCE_PREVIOUS,)),
        ],
    )
    add_point(
        repo,
        T0 + timedelta(days=4),
        "digest",
        [("digest", ("CBT is not active for the disk", DIGEST_SINCE_PREVIOUS))],
    )
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "repo.yaml").write_text(
        f"""apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: r}}
spec:
  backend: {{type: local, path: {tmp_path / "repo"}}}
  encryption: {{enabled: false}}
"""
    )
    return cfg


def test_points_shows_why_under_each_point_read_in_full(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--config", str(config), "--log-level", "error", "points"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [i for i, line in enumerate(lines) if not line.startswith(" ")]
    assert len(rows) == 6  # the header and five points
    assert lines[rows[1] + 1] == "    full: Hard disk 1: no previous restore point"  # written before reasons
    assert lines[rows[2] + 1 : rows[3]] == [  # disks with the same reasons share a line
        "    Hard disk 1, Hard disk 2: full: no earlier restore point of this VM"
    ]
    assert lines[rows[3] + 1 : rows[4]] == []  # a plain incremental: nothing to explain
    assert lines[rows[4] + 1 : rows[5]] == [
        f"    Hard disk 1: full: {RESET}; no digest compare: SSH is disabled for the host"
    ]
    assert lines[rows[5] + 1 :] == [
        f"    Hard disk 1: digest: CBT is not active for the disk; {DIGEST_SINCE_PREVIOUS}"
    ]


def test_points_json_has_every_disks_mode_and_reasons(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--config", str(config), "--log-level", "error", "points", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in rows] == ["full", "full", "cbt", "full", "digest"]
    assert rows[0]["disks"] == [{"key": 2000, "label": "Hard disk 1", "mode": None, "reasons": []}]
    assert rows[0]["fallback_reason"] == "Hard disk 1: no previous restore point"
    assert rows[3]["disks"] == [
        {
            "key": 2000,
            "label": "Hard disk 1",
            "mode": "full",
            "reasons": [RESET, "no digest compare: SSH is disabled for the host"],
        },
        {"key": 2001, "label": "Hard disk 2", "mode": "cbt", "reasons": [CBT_SINCE_PREVIOUS]},
    ]
