"""An interrupted GC and ``esxi-reconciler repo gc``: a GC killed mid-sweep (SIGKILL, in a child
process) leaves its marker; the next plan runs a GC and says why; ``repo gc --dry-run`` changes
nothing; ``repo gc`` reclaims the space, and never sweeps while a backup holds the repository."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.config import DesiredState
from reconciler.facts.inventory import DatastoreInfo, VmInfo
from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.operations.apply import apply
from reconciler.operations.observe import observe
from reconciler.planning.actions import CollectGarbage
from reconciler.planning.plan import plan
from reconciler.repository import CHUNK_SIZE, Repository
from reconciler.repository.chunks import chunk_name
from reconciler.repository.gc import GC_MARKER, GcMarker, read_gc_marker
from reconciler.repository.verify import verify_repository
from tests.unit.planfixtures import load_desired, repo_doc

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("restore_logging")


class NoVms:
    """A host that answers with an empty inventory (the planner needs hosts; GC does not)."""

    prefix = "esxi-reconciler-"
    license = "free"

    def list_vms(self) -> list[VmInfo]:
        return []

    def datastores(self) -> list[DatastoreInfo]:
        return []

    def find_in_vm_folders(self, datastores: Sequence[str], pattern: str, depth: int = 1) -> list[str]:
        return []

    def read_file(self, ds_path: str, max_size: int = 0) -> bytes:
        raise AssertionError(f"nothing to read: {ds_path}")

    def close(self) -> None:
        pass


def backup(repo: Repository, chunks: int, tag: str) -> RestorePoint:
    writer = repo.chunk_writer(chunks * CHUNK_SIZE)
    for slot in range(chunks):
        writer.write(slot * CHUNK_SIZE, os.urandom(CHUNK_SIZE))
    now = datetime.now(timezone.utc)
    point = RestorePoint(
        id=new_point_id(now),
        policy="web",
        vm=VmRef(tag, f"uuid-{tag}", "esxi1", "1"),
        started=now,
        snapshot_time=now,
        finished=now,
        status="success",
        mode="full",
        config_revision="r",
        files=(repo.write_file(f"{tag}.vmx", f'displayName = "{tag}"\n'.encode()),),
        disks=(DiskRecord(2000, "Hard disk 1", "x", chunks * CHUNK_SIZE, writer.finish()),),
    )
    repo.write_point(point)
    return point


def tree(root: Path) -> dict[str, str]:
    """Every file of the repository with a digest of its content."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def gc_actions(desired: DesiredState) -> list[CollectGarbage]:
    now = datetime.now(timezone.utc)
    seen = observe(desired, now=now, history={}, host_factory=lambda c: NoVms())
    return [a for a in plan(desired, seen).actions if isinstance(a, CollectGarbage)]


_KILLED_GC = """
import sys, time
from reconciler.repository import Repository, collect_garbage

def progress(done, total):
    if done == 3:
        print(f"swept {done} of {total}", flush=True)
        time.sleep(600)  # SIGKILLed here, mid-sweep

collect_garbage(Repository.open(sys.argv[1]), progress=progress)
"""


def test_a_gc_killed_mid_sweep_is_planned_again_and_repo_gc_reclaims_the_space(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = Repository.init(tmp_path / "repo")
    desired = load_desired(tmp_path, repositories=[repo_doc(path=str(repo.path))])
    config = str(tmp_path / "config")
    kept = backup(repo, 2, "web01")
    pruned = backup(repo, 6, "web02")
    repo.delete_point(pruned.id)  # a prune: 7 chunks (6 disk, 1 .vmx) and an index are garbage now
    assert [a.reason for a in gc_actions(desired)] == [
        "1 disk index no restore point references, left by a failed backup or deleted points"
    ]

    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_GC, str(repo.path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "swept 3 of 8\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    marker = read_gc_marker(repo)
    assert marker is not None and marker.pid == child.pid
    assert repo.stats().chunks == 3 + 4  # kept's 2 + its .vmx, and the 4 of 7 garbage chunks not swept

    (gc,) = gc_actions(desired)  # the killed GC's exclusive lock is stale: its pid is gone
    when = marker.started.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    assert gc.repository == "nas" and gc.reason.startswith(f"previous GC interrupted at {when}")

    used, _, _ = repo.referenced(repo.list_points())
    garbage_bytes = sum(
        (repo.path / chunk_name(cid)).stat().st_size for cid in repo.iter_chunk_ids() if cid not in used
    )
    before = tree(repo.path)
    capsys.readouterr()  # observe's debug logs (structlog unconfigured until main runs)
    assert main(["--config", config, "repo", "gc", "nas", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # which 4 of the 7 are left (3 or 4 MiB of random disk data, maybe the small .vmx) depends on order
    assert re.match(
        rf"repository nas \({re.escape(str(repo.path))}\): would remove 4 chunks \([34]\.0 MiB\),"
        r" 1 disk index;",
        out,
    )
    assert "; 3 chunks in use by 1 restore point;" in out
    assert f"would complete the GC interrupted at {when} (dry run: nothing deleted)" in out
    assert tree(repo.path) == before  # nothing deleted, not even the killed GC's stale lock

    assert main(["--config", config, "repo", "gc", "nas", "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)["repositories"]
    assert report["ok"] and not report["dry_run"]
    assert (report["unreferenced_chunks"], report["unreferenced_indexes"], report["points"]) == (4, 1, 1)
    assert report["unreferenced_bytes"] == garbage_bytes
    assert report["interrupted_at"] == marker.started.isoformat()
    assert not (repo.path / GC_MARKER).exists()
    assert repo.stats().chunks == 3 and [p.id for p in repo.list_points()] == [kept.id]
    assert verify_repository(repo).ok
    assert gc_actions(desired) == []  # nothing left to collect: the plan says no changes

    capsys.readouterr()
    assert main(["--config", config, "repo", "gc"]) == 0  # every repository; nothing to do now
    assert capsys.readouterr().out == (
        f"repository nas ({repo.path}): nothing to remove; 3 chunks in use by 1 restore point\n"
    )


def test_repo_gc_never_sweeps_under_a_running_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = Repository.init(tmp_path / "repo")
    load_desired(tmp_path, repositories=[repo_doc(path=str(repo.path))])
    config = str(tmp_path / "config")
    pruned = backup(repo, 1, "web01")
    repo.delete_point(pruned.id)
    before = tree(repo.path)
    with repo.lock(purpose="backup web"):
        assert main(["--config", config, "--log-level", "critical", "repo", "gc", "nas"]) == 1
        err = capsys.readouterr().err
        during = {name: digest for name, digest in tree(repo.path).items() if not name.startswith("locks/")}
    assert during == before  # nothing deleted (only the backup's own lock file is new)
    assert "esxi-reconciler repo gc: repository nas: backup running; GC deferred (repository is locked" in err
    assert "(backup web))" in err and "give --wait SECONDS" in err and err.count("\n") == 1
    assert main(["--config", config, "repo", "gc", "nas"]) == 0
    assert "removed 2 chunks" in capsys.readouterr().out


def test_repo_gc_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_desired(tmp_path, repositories=[repo_doc(path=str(tmp_path / "repo"))])
    config = str(tmp_path / "config")
    assert main(["--config", config, "repo", "gc", "nsa"]) == 64
    assert (
        capsys.readouterr().err == "esxi-reconciler repo gc: no Repository named 'nsa'; did you mean 'nas'?\n"
    )
    assert main(["--config", config, "repo", "gc", "nas", "--wait", "-1"]) == 64
    assert "--wait must not be negative" in capsys.readouterr().err
    assert (
        main(["--config", config, "--log-level", "critical", "repo", "gc", "nas"]) == 1
    )  # never initialised
    err = capsys.readouterr().err
    assert err.startswith("esxi-reconciler repo gc: repository nas (") and "not a repository" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_the_daemons_apply_completes_an_interrupted_gc(tmp_path: Path) -> None:
    """What a ``run`` cycle does after a GC was killed: plan it with the reason, apply it, done."""
    repo = Repository.init(tmp_path / "repo")
    desired = load_desired(tmp_path, repositories=[repo_doc(path=str(repo.path), prune=False)])
    kept = backup(repo, 1, "web01")
    repo.delete_point(backup(repo, 2, "web02").id)
    started = datetime(2026, 11, 26, 2, 14, tzinfo=timezone.utc)
    (repo.path / GC_MARKER).write_bytes(GcMarker(started, "nas1", 4242, "ab" * 16).to_json())

    now = datetime.now(timezone.utc)
    the_plan = plan(desired, observe(desired, now=now, history={}, host_factory=lambda c: NoVms()))
    (gc,) = the_plan.actions
    assert isinstance(gc, CollectGarbage) and gc.reason.startswith(
        "previous GC interrupted at 2026-11-26 02:14 UTC"
    )
    (outcome,) = apply(the_plan, desired, cancel=threading.Event())
    assert outcome.ok and outcome.detail["chunks_freed"] == 3  # web02's 2 disk chunks and its .vmx
    assert outcome.detail["completed_interrupted_gc"] == started.isoformat()
    assert read_gc_marker(repo) is None and [p.id for p in repo.list_points()] == [kept.id]
    assert gc_actions(desired) == []
