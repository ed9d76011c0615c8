"""A repository on a volume that fills up (a real 8 MiB tmpfs): the write fails with one line naming the
repository, its path, the space and the fix; nothing it staged stays in ``tmp/`` (also when the writer
is killed: the next run removes it); no partial restore point is listed; once space is freed the next
run succeeds without any cleaning by hand, and earlier points still verify."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.repository import CHUNK_SIZE, LocalBackend, Repository, StorageError
from reconciler.repository.verify import verify_repository
from tests.smallvolume import fill, free_bytes, small_volume

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    with small_volume(tmp_path / "vol", "8m") as path:
        yield path


def backup(repo: Repository, disk: bytes) -> RestorePoint:
    """What the backup engine does for one VM: chunks, index, then the manifest last."""
    writer = repo.chunk_writer(len(disk))
    for offset in range(0, len(disk), CHUNK_SIZE):
        writer.write(offset, disk[offset : offset + CHUNK_SIZE])
    index = writer.finish()
    return write_point(repo, index, len(disk))


def write_point(repo: Repository, index: str, capacity: int) -> RestorePoint:
    now = datetime.now(timezone.utc)
    point = RestorePoint(
        id=new_point_id(now),
        policy="p",
        vm=VmRef("web01", "uuid", "esxi1", "1"),
        started=now,
        snapshot_time=now,
        finished=now,
        status="success",
        mode="full",
        config_revision="r",
        files=(repo.write_file("web01.vmx", b'displayName = "web01"\n'),),
        disks=(DiskRecord(2000, "Hard disk 1", "[ds1] web01/web01.vmdk", capacity, index),),
    )
    repo.write_point(point)
    return point


def staged(repo: Repository) -> list[str]:
    return [p.name for p in (repo.path / "tmp").iterdir()]


def assert_one_line_about_space(message: str, repo_path: Path) -> None:
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"repository nas ({repo_path}): the volume is full: no space left writing ")
    assert " free of 8.0 MiB)" in message  # how much is free, on how big a volume
    assert (
        "free space on that volume, or free unreferenced data with 'esxi-reconciler repo gc nas'" in message
    )


_FILLER_RUN = """
import os, sys, time
from reconciler.repository import CHUNK_SIZE, Repository, StorageError

repo = Repository.open(sys.argv[1], label="nas")
lock = repo.lock(purpose="backup p")
lock.acquire()
writer = repo.chunk_writer(64 * CHUNK_SIZE)
try:
    for slot in range(64):
        writer.write(slot * CHUNK_SIZE, os.urandom(CHUNK_SIZE))
except StorageError as exc:
    print(exc, flush=True)
time.sleep(600)  # killed here: its staged chunks stay in tmp/
"""


def test_a_killed_run_that_filled_the_volume_is_cleaned_up_by_the_next(volume: Path) -> None:
    repo = Repository.init(volume / "repo")
    earlier = backup(repo, os.urandom(2 * CHUNK_SIZE))

    proc = subprocess.Popen(
        [sys.executable, "-c", _FILLER_RUN, str(repo.path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        message = proc.stdout.readline().rstrip("\n")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert_one_line_about_space(message, repo.path)
    assert "writing a chunk of 1.0 MiB" in message
    left = staged(repo)
    assert left and free_bytes(volume) < CHUNK_SIZE  # the volume is full of the killed run's chunks

    repo = Repository.open(volume / "repo", label="nas")  # the next run
    removed = repo.remove_stale_staged()
    assert sorted(info.name for info in removed) == sorted(f"tmp/{name}" for name in left)
    assert staged(repo) == []
    later = backup(repo, os.urandom(2 * CHUNK_SIZE))
    assert staged(repo) == []
    assert [p.id for p in repo.list_points()] == [earlier.id, later.id]
    assert verify_repository(repo).ok


def test_a_run_that_fills_the_volume_leaves_nothing_and_the_next_one_succeeds(volume: Path) -> None:
    repo = Repository.open(Repository.init(volume / "repo").path, label="nas")
    earlier = backup(repo, os.urandom(2 * CHUNK_SIZE))
    filler = fill(volume, leave=2 * CHUNK_SIZE + CHUNK_SIZE // 2)  # room for 2 of the next run's 4 chunks

    with pytest.raises(StorageError) as failed, repo.discard_pending_on_exit():
        backup(repo, os.urandom(4 * CHUNK_SIZE))
    assert_one_line_about_space(str(failed.value), repo.path)
    assert staged(repo) == []
    assert [p.id for p in repo.list_points()] == [earlier.id]

    filler.unlink()  # the admin frees space
    repo = Repository.open(volume / "repo", label="nas")
    with repo.discard_pending_on_exit():
        later = backup(repo, os.urandom(4 * CHUNK_SIZE))
    assert staged(repo) == []
    assert [p.id for p in repo.list_points()] == [earlier.id, later.id]
    assert verify_repository(repo).ok


def test_no_room_for_the_manifest_lists_no_partial_point(volume: Path) -> None:
    repo = Repository.open(Repository.init(volume / "repo").path, label="nas")
    earlier = backup(repo, os.urandom(CHUNK_SIZE))
    writer = repo.chunk_writer(2 * CHUNK_SIZE)
    writer.write(0, os.urandom(CHUNK_SIZE))
    writer.write(CHUNK_SIZE, os.urandom(CHUNK_SIZE))
    index = writer.finish()  # chunks and index are durable; the manifest comes last
    filler = fill(volume, leave=0)
    with pytest.raises(StorageError) as failed:
        write_point(repo, index, 2 * CHUNK_SIZE)
    assert_one_line_about_space(str(failed.value), repo.path)
    assert [p.id for p in repo.list_points()] == [earlier.id]
    assert staged(repo) == []
    filler.unlink()
    assert verify_repository(repo).ok


def test_a_read_only_volume_says_so_and_how_to_fix_it(volume: Path) -> None:
    repo = Repository.open(Repository.init(volume / "repo").path, label="nas")
    subprocess.run(["mount", "-o", "remount,ro", str(volume)], check=True)
    try:
        with pytest.raises(StorageError) as refused, repo.discard_pending_on_exit():
            backup(repo, os.urandom(CHUNK_SIZE))
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(volume)], check=True)
    assert str(refused.value) == (
        f"repository nas ({repo.path}): the volume is read-only (writing a chunk); remount it read-write"
        " (under systemd, list the path in ReadWritePaths=), then run again"
    )
    assert refused.value.errno == errno.EROFS


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EDQUOT, "disk quota exceeded writing a disk index of 4.0 KiB; raise the quota of user "),
        (errno.EACCES, "permission denied writing a disk index as user "),
        (errno.EPERM, "permission denied writing a disk index as user "),
    ],
)
def test_quota_and_permission_refusals_name_the_user_and_the_fix(
    tmp_path: Path, code: int, expected: str
) -> None:
    backend = Repository.open(Repository.init(tmp_path / "repo").path, label="nas").backend
    assert isinstance(backend, LocalBackend)
    refused = backend.refused(OSError(code, os.strerror(code)), "writing a disk index", 4096)
    assert refused is not None and refused.errno == code
    assert str(refused).startswith(f"repository nas ({backend.root}): {expected}")
    assert "(uid " in str(refused) and str(refused).endswith(
        "then run again" + (" — nothing needs cleaning up by hand" if code == errno.EDQUOT else "")
    )
    assert (
        backend.refused(OSError(errno.EIO, "I/O error"), "writing a disk index") is None
    )  # not the volume's state
