"""The FUSE operations of ``mount`` called directly (no kernel): the tree of a repository's points,
read-only files of full disk size that read what was stored, a damaged chunk as EIO with one line naming
the point and the disk, and the mount point checks; disk names as a Linux guest sees them."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import mfusepy
import pytest

from reconciler.operations.files import disk_name
from reconciler.operations.mount import ReadOnlyPoints, build_tree, check_mountpoint
from reconciler.operations.restore import RestoreError, safe_file_name
from reconciler.repository import Repository
from reconciler.repository.chunks import chunk_name
from tests.unit.test_export import NAME, make_point

MiB = 1 << 20
VMDIR = f"/vms/{safe_file_name(NAME)}"


@pytest.fixture
def mounted(tmp_path: Path) -> tuple[Repository, ReadOnlyPoints, list[str]]:
    repo = Repository.init(tmp_path / "repo")
    make_point(repo)
    errors: list[str] = []
    return repo, ReadOnlyPoints(repo, build_tree(repo.list_points()), on_error=errors.append), errors


def test_tree_files_and_reads(mounted: tuple[Repository, ReadOnlyPoints, list[str]]) -> None:
    repo, ops, _ = mounted
    (point,) = repo.list_points()
    assert ops.readdir("/vms", 0)[2:] == [VMDIR.split("/")[-1]]
    assert sorted(ops.readdir(VMDIR, 0)[2:]) == sorted([point.id, "latest"])
    assert ops.readlink(f"{VMDIR}/latest") == point.id
    names = sorted(ops.readdir(f"{VMDIR}/{point.id}", 0)[2:])
    assert names == ["vm.img", "vm.nvram", "vm.vmx", "vm_1.img"]
    attrs = ops.getattr(f"{VMDIR}/{point.id}/vm.img")
    assert attrs["st_size"] == 4 * MiB + 512 and attrs["st_mode"] & 0o777 == 0o444
    fh = ops.open(f"{VMDIR}/{point.id}/vm.img", os.O_RDONLY)
    try:
        assert ops.read("/", 4096, 2 * MiB, fh) == b"\x01" * 4096
        assert ops.read("/", 1024, 4 * MiB, fh) == b"\x07" * 512
        assert ops.read("/", 10, MiB, fh) == bytes(10)  # a hole
    finally:
        ops.release("/", fh)
    fh = ops.open(f"{VMDIR}/{point.id}/vm.nvram", os.O_RDONLY)
    assert ops.read("/", 10, 0, fh) == b"nvramnvram"
    ops.release("/", fh)
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(mfusepy.FuseOSError) as refused:
            ops.open(f"{VMDIR}/{point.id}/vm.img", flags)
        assert refused.value.errno == errno.EROFS
    with pytest.raises(mfusepy.FuseOSError) as missing:
        ops.getattr("/vms/nope")
    assert missing.value.errno == errno.ENOENT
    ops.destroy("/")


def test_a_damaged_chunk_is_eio_and_one_line_naming_point_and_disk(
    mounted: tuple[Repository, ReadOnlyPoints, list[str]], tmp_path: Path
) -> None:
    repo, ops, errors = mounted
    (point,) = repo.list_points()
    disk = next(d for d in point.disks if d.label == "Hard disk 1")
    chunk = tmp_path / "repo" / chunk_name(repo.read_index(disk.index)[0])
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.chmod(0o600)
    chunk.write_bytes(bytes(data))
    fh = ops.open(f"{VMDIR}/{point.id}/vm.img", os.O_RDONLY)
    with pytest.raises(mfusepy.FuseOSError) as failed:
        ops.read("/", 4096, 0, fh)
    assert failed.value.errno == errno.EIO
    (line,) = errors
    assert point.id in line and "Hard disk 1" in line and "bytes 0-1048575" in line and "\n" not in line
    assert ops.read("/", 16, 2 * MiB, fh) == b"\x01" * 16  # the rest of the disk still reads
    ops.release("/", fh)


def test_mount_point_checks(tmp_path: Path) -> None:
    with pytest.raises(RestoreError, match="does not exist"):
        check_mountpoint(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RestoreError, match="not a directory"):
        check_mountpoint(tmp_path / "file")
    with pytest.raises(RestoreError, match="not empty"):
        check_mountpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    check_mountpoint(tmp_path / "empty")


def test_disk_names_follow_linux() -> None:
    assert [disk_name(i) for i in (0, 1, 25, 26, 27)] == ["sda", "sdb", "sdz", "sdaa", "sdab"]
