"""Prune guards re-checked at execution time, and GC that never sweeps under a running backup (real
repositories in a temp directory)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.operations.prune import collect, prune
from reconciler.repository import CHUNK_SIZE, KdfParams, Repository

T0 = datetime(2026, 11, 1, 2, 0, tzinfo=timezone.utc)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", "pw", kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))


def point(
    repo: Repository,
    days: int,
    *,
    vm: str = "web01",
    policy: str = "nightly",
    status: str = "success",
    protected: bool = False,
    tag: str = "",
) -> RestorePoint:
    """A point of one 1-chunk disk whose content is unique to it (so its chunk is freed with it)."""
    when = T0 + timedelta(days=days)
    writer = repo.chunk_writer(CHUNK_SIZE)
    writer.write(0, (f"{vm}/{policy}/{days}/{tag}".encode() * CHUNK_SIZE)[:CHUNK_SIZE])
    index = writer.finish()
    p = RestorePoint(
        id=new_point_id(when),
        policy=policy,
        vm=VmRef(vm, f"uuid-{vm}", "esxi1", "1"),
        started=when,
        snapshot_time=when,
        finished=when,
        status=status,  # type: ignore[arg-type]
        mode="full",
        config_revision="r",
        protected=protected,
        disks=(DiskRecord(2000, "Hard disk 1", "x", CHUNK_SIZE, index),),
    )
    repo.write_point(p)
    return p


def ids(repo: Repository) -> set[str]:
    return set(repo.point_ids())


def test_prune_deletes_what_it_is_asked_and_keeps_the_rest(repo: Repository) -> None:
    a, b, c = point(repo, 0), point(repo, 1), point(repo, 2)
    results = prune(repo, [a.id, b.id], max_deletions=10)
    assert [(r.point_id, r.decision) for r in results] == [(a.id, "deleted"), (b.id, "deleted")]
    assert ids(repo) == {c.id}


def test_prune_never_deletes_the_newest_successful_point_of_a_group(repo: Repository) -> None:
    old = point(repo, 0)
    newest_ok = point(repo, 1)
    failed_later = point(repo, 2, status="failed")
    other_vm = point(repo, 0, vm="db01")  # the only point of its group
    results = prune(repo, [old.id, newest_ok.id, failed_later.id, other_vm.id], max_deletions=10)
    decisions = {r.point_id: (r.decision, r.reason) for r in results}
    assert decisions[old.id][0] == "deleted"
    assert decisions[failed_later.id][0] == "deleted"
    assert decisions[newest_ok.id][0] == "refused" and "newest successful" in str(decisions[newest_ok.id][1])
    assert decisions[other_vm.id][0] == "refused"
    assert ids(repo) == {newest_ok.id, other_vm.id}


def test_prune_refuses_protected_points(repo: Repository) -> None:
    kept = point(repo, 0, protected=True)
    point(repo, 1)
    (result,) = prune(repo, [kept.id], max_deletions=10)
    assert result.decision == "refused" and result.reason == "restore point is protected"
    assert kept.id in ids(repo)


def test_prune_skips_points_that_are_already_gone(repo: Repository) -> None:
    gone = point(repo, 0)
    point(repo, 1)
    repo.delete_point(gone.id)  # e.g. pruned by hand since the plan was made
    (result,) = prune(repo, [gone.id], max_deletions=10)
    assert result.decision == "gone"


def test_prune_stops_at_max_deletions_per_run(repo: Repository) -> None:
    points = [point(repo, d) for d in range(5)]
    results = prune(repo, [p.id for p in points[:4]], max_deletions=2)
    assert [r.decision for r in results] == ["deleted", "deleted", "refused", "refused"]
    assert "max_deletions_per_run (2)" in str(results[2].reason)
    assert ids(repo) == {p.id for p in points[2:]}


def test_gc_after_prune_frees_the_pruned_points_chunks(repo: Repository) -> None:
    old, new = point(repo, 0), point(repo, 1)
    before = set(repo.iter_chunk_ids())
    prune(repo, [old.id], max_deletions=10)
    result = collect(repo, wait_seconds=0)
    assert result.report is not None and result.deferred is None
    assert result.report.unreferenced_chunks == 1
    assert len(set(repo.iter_chunk_ids())) == len(before) - 1
    assert repo.read_chunk(repo.read_index(new.disks[0].index)[0])  # the kept point still reads


def test_gc_is_deferred_while_a_backup_holds_the_shared_lock(repo: Repository) -> None:
    point(repo, 0)
    slept: list[float] = []

    def clock() -> float:
        return sum(slept)  # time passes only while GC waits

    with repo.lock(purpose="backup nightly"):
        # a running backup has stored a chunk that no manifest references yet
        writer = repo.chunk_writer(CHUNK_SIZE)
        writer.write(0, b"in-flight".ljust(CHUNK_SIZE, b"\1"))
        in_flight = writer.finish()
        chunks = set(repo.iter_chunk_ids())
        result = collect(repo, wait_seconds=3, poll_seconds=1, sleep=slept.append, clock=clock)
    assert result.report is None
    assert result.deferred is not None and result.deferred.startswith("backup running; GC deferred")
    assert slept == [1.0, 1.0, 1.0]  # waited within its bound, then gave up
    assert set(repo.iter_chunk_ids()) == chunks  # nothing swept
    assert repo.read_index(in_flight).count == 1


def test_gc_runs_once_the_backup_is_done(repo: Repository) -> None:
    point(repo, 0)
    lock = repo.lock(purpose="backup nightly")
    lock.acquire()
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        lock.release()  # the backup finishes while GC waits

    result = collect(repo, wait_seconds=60, poll_seconds=2, sleep=sleep)
    assert result.report is not None and polls == [2]
