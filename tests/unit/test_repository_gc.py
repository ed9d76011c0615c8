"""Garbage collection: exactly the unreferenced objects go, under an exclusive lock; tmp leftovers; the
marker of an interrupted GC; the cheap signs of garbage the planner reads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.repository import (
    CHUNK_SIZE,
    DigestMap,
    GarbageSigns,
    KdfParams,
    LockedError,
    Repository,
    collect_garbage,
    garbage_signs,
)
from reconciler.repository.backend import host_tag
from reconciler.repository.chunks import chunk_name
from reconciler.repository.errors import IntegrityError
from reconciler.repository.gc import GC_MARKER, GcMarker, read_gc_marker
from reconciler.repository.verify import verify_repository

MiB = CHUNK_SIZE


@pytest.fixture(params=["plain", "encrypted"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Repository:
    if request.param == "plain":
        return Repository.init(tmp_path / "repo")
    return Repository.init(tmp_path / "repo", "pw", kdf=KdfParams(64, 1, 1))


def write_disk(repo: Repository, chunks: list[bytes], digest_map: bool = False) -> str:
    writer = repo.chunk_writer(len(chunks) * MiB)
    for i, data in enumerate(chunks):
        writer.write(i * MiB, data)
    dm = (
        DigestMap("sha1", 65536, len(chunks) * MiB, 20, os.urandom(16 * len(chunks) * 20))
        if digest_map
        else None
    )
    return writer.finish(dm)


def write_point(repo: Repository, index_id: str, files: bytes = b"vmx") -> RestorePoint:
    now = datetime.now(timezone.utc)
    point = RestorePoint(
        id=new_point_id(now),
        policy="p",
        vm=VmRef("vm", "uuid", "h", "1"),
        started=now,
        snapshot_time=now,
        finished=now,
        status="success",
        mode="full",
        config_revision="r",
        files=(repo.write_file("vm.vmx", files),),
        disks=(DiskRecord(2000, "Hard disk 1", "x", repo.read_index(index_id).capacity, index_id),),
    )
    repo.write_point(point)
    return point


def chunk(tag: str) -> bytes:
    return (tag * (MiB // len(tag) + 1)).encode()[:MiB]


def test_gc_removes_exactly_the_unreferenced_chunks(repo: Repository) -> None:
    shared, only_a, only_b = chunk("shared"), chunk("only-a"), chunk("only-b")
    a = write_point(repo, write_disk(repo, [shared, only_a, bytes(MiB)], digest_map=True), b"vmx-a")
    b = write_point(repo, write_disk(repo, [shared, only_b]), b"vmx-b")
    orphan_index = write_disk(repo, [chunk("orphan")])  # interrupted backup: no manifest
    before = set(repo.iter_chunk_ids())
    assert len(before) == 6  # shared, only-a, only-b, orphan, vmx-a, vmx-b

    report = collect_garbage(repo)
    assert report.unreferenced_chunks == 1 and report.unreferenced_indexes == 1
    assert set(repo.iter_chunk_ids()) == before - {repo.chunk_id(chunk("orphan"))}
    assert not (repo.path / "indexes" / orphan_index).exists()
    assert verify_repository(repo).ok

    repo.delete_point(a.id)
    report = collect_garbage(repo)
    assert report.unreferenced_chunks == 2  # only-a and vmx-a; shared stays
    assert report.unreferenced_indexes == 1 and report.unreferenced_digest_maps == 1
    remaining = set(repo.iter_chunk_ids())
    assert remaining == {repo.chunk_id(c) for c in (shared, only_b, b"vmx-b")}
    assert verify_repository(repo).ok and repo.list_points() == [b]


def test_dry_run_counts_without_deleting(repo: Repository) -> None:
    write_disk(repo, [chunk("garbage"), chunk("more")])
    before = set(repo.iter_chunk_ids())
    report = collect_garbage(repo, dry_run=True)
    assert report.unreferenced_chunks == 2 and report.unreferenced_bytes > 0
    assert set(repo.iter_chunk_ids()) == before
    assert len(report.deleted) == 3  # 2 chunks + 1 index


def test_tmp_leftovers_go_unless_a_live_process_of_this_host_owns_them(repo: Repository) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        dead_pid = _dead_pid()
        tmp = repo.path / "tmp"
        killed = tmp / f"{host_tag(host)}-{dead_pid}-0badc0de-{'1' * 16}"  # a killed backup's chunk
        running = tmp / f"{host_tag(host)}-{live.pid}-0badc0de-{'2' * 16}"  # another process, still staging
        legacy = tmp / "0123"  # an older version's name: owner unknown
        for path in (killed, running, legacy):
            path.write_bytes(b"half a chunk")
        past = time.time() - 3600
        os.utime(legacy, (past, past))

        report = collect_garbage(repo)
        assert report.tmp_files == 2 and report.tmp_bytes == 2 * len(b"half a chunk")
        assert sorted(p.name for p in tmp.iterdir()) == [running.name]
    finally:
        live.kill()
        live.wait()
    report = collect_garbage(repo)  # its writer is gone now
    assert report.tmp_files == 1 and list((repo.path / "tmp").iterdir()) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_gc_needs_the_exclusive_lock(repo: Repository) -> None:
    write_disk(repo, [chunk("garbage")])
    with repo.lock(purpose="backup p/vm"), pytest.raises(LockedError, match="backup p/vm"):
        collect_garbage(repo)
    assert len(list(repo.iter_chunk_ids())) == 1
    with repo.lock(exclusive=True) as held:
        assert collect_garbage(repo, lock=held).unreferenced_chunks == 1
    with pytest.raises(ValueError, match="exclusive"), repo.lock() as shared:
        collect_garbage(repo, lock=shared)


def test_unreadable_manifest_stops_gc_before_any_delete(repo: Repository) -> None:
    point = write_point(repo, write_disk(repo, [chunk("data")]))
    write_disk(repo, [chunk("garbage")])
    path = repo.path / point.name
    path.write_bytes(path.read_bytes()[:-3])
    count = len(list(repo.iter_chunk_ids()))
    with pytest.raises(IntegrityError, match=point.name):
        collect_garbage(repo)
    assert len(list(repo.iter_chunk_ids())) == count
    assert read_gc_marker(repo) is not None  # not completed: the planner will run it again


def test_half_written_point_leftovers_are_collected(repo: Repository) -> None:
    writer = repo.chunk_writer(2 * MiB)
    writer.write(0, chunk("interrupted"))
    repo.flush()  # chunks durable, but neither index nor manifest written: a crash here
    (repo.path / "tmp" / "aaaa").write_bytes(b"torn")
    past = time.time() - 48 * 3600
    os.utime(repo.path / "tmp" / "aaaa", (past, past))
    assert repo.list_points() == []
    report = collect_garbage(repo)
    assert report.unreferenced_chunks == 1 and report.tmp_files == 1
    assert list(repo.iter_chunk_ids()) == [] and list((repo.path / "tmp").iterdir()) == []
    assert chunk_name(repo.chunk_id(chunk("interrupted")))


def test_the_marker_is_there_while_gc_sweeps_and_goes_when_it_completes(repo: Repository) -> None:
    write_disk(repo, [chunk("garbage"), chunk("more")])
    seen: list[bool] = []
    dry = collect_garbage(repo, dry_run=True, progress=lambda done, total: seen.append(True))
    assert seen == [] and not (repo.path / GC_MARKER).exists() and dry.interrupted_at is None

    report = collect_garbage(repo, progress=lambda done, total: seen.append((repo.path / GC_MARKER).exists()))
    assert seen == [True, True, True]  # 2 chunks and the index, each deleted under the marker
    assert report.interrupted_at is None and read_gc_marker(repo) is None


def test_an_interrupted_gc_is_reported_and_completed(repo: Repository) -> None:
    write_disk(repo, [chunk("garbage")])
    started = datetime(2026, 11, 26, 2, 0, tzinfo=timezone.utc)
    (repo.path / GC_MARKER).write_bytes(GcMarker(started, "nas1", 4242, "ab" * 16).to_json())
    with repo.lock() as lock:
        signs = garbage_signs(repo, repo.list_points(), lock)
    assert signs == GarbageSigns(gc_interrupted=started, unreferenced_indexes=1)

    dry = collect_garbage(repo, dry_run=True)
    assert dry.interrupted_at == started and read_gc_marker(repo) == GcMarker(
        started, "nas1", 4242, "ab" * 16
    )
    report = collect_garbage(repo)
    assert report.interrupted_at == started and report.unreferenced_chunks == 1
    assert read_gc_marker(repo) is None

    (repo.path / GC_MARKER).write_bytes(b"torn")  # a marker cut short still means: not completed
    marker = read_gc_marker(repo)
    assert marker is not None and abs(marker.started.timestamp() - time.time()) < 60


def test_indexes_are_counted_as_garbage_only_when_no_other_process_may_be_writing(repo: Repository) -> None:
    kept = write_point(repo, write_disk(repo, [chunk("kept")]))
    write_disk(repo, [chunk("a backup died after its index")])
    with repo.lock(purpose="observe") as lock:
        assert garbage_signs(repo, [kept], lock).unreferenced_indexes == 1
        with repo.lock(purpose="backup p/vm"):  # a backup now: its index may be on its way to a point
            assert garbage_signs(repo, [kept], lock) == GarbageSigns()
        later = write_point(repo, write_disk(repo, [chunk("finished after the points were read")]))
        assert garbage_signs(repo, [kept], lock).unreferenced_indexes == 1  # later's manifest is found
        assert garbage_signs(repo, [kept, later], lock).unreferenced_indexes == 1


def test_listing_points_skips_a_point_pruned_between_the_listing_and_the_read(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``points`` (under a shared lock) runs while the daemon prunes: a manifest that vanished after the
    directory listing is a point that no longer exists, not an error (seen as MissingObjectError)."""
    kept = write_point(repo, write_disk(repo, [b"a" * MiB]))
    pruned = write_point(repo, write_disk(repo, [b"b" * MiB]))
    listed = repo.point_ids()
    repo.delete_point(pruned.id)
    monkeypatch.setattr(repo, "point_ids", lambda: listed)
    assert [p.id for p in repo.list_points()] == [kept.id]
