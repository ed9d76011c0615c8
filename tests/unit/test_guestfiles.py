"""The ``files/`` directories of ``mount --files`` called through the FUSE operations (no kernel, no
root): a session's "mounted" filesystem is a plain directory here, the rest is the real code — the
lazy start, the passthrough with the guest's modes, times and links, no way out of the tree through
``..`` or a symlink, the README, the bounded pool (least recently used idle point released first, a
point with open files never), a point that cannot be opened (EIO, one line, not retried at once), and
everything closed at the end."""

from __future__ import annotations

import dataclasses
import errno
import os
from datetime import timedelta
from pathlib import Path

import pytest

from reconciler.facts.partitions import Partition
from reconciler.facts.points import RestorePoint, new_point_id
from reconciler.operations.files import FilesError, FilesSession, GuestFilesystem
from reconciler.operations.guestfiles import (
    README,
    GuestFiles,
    SessionPool,
    checked_parts,
    open_parent,
)
from reconciler.operations.mount import ReadOnlyPoints, build_tree
from reconciler.operations.restore import safe_file_name
from reconciler.repository import Repository
from tests.unit.test_export import NAME, make_point

VMDIR = f"/vms/{safe_file_name(NAME)}"
OLD = 1_700_000_000


def _guest_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    conf = root / "etc" / "app.conf"
    conf.write_bytes(b"version = 1\n")
    conf.chmod(0o640)
    os.utime(conf, (OLD, OLD))
    (root / "home").mkdir()
    (root / "home" / "conf-link").symlink_to("../etc/app.conf")
    (root / "home" / "escape").symlink_to("/etc")
    (root / "home" / "up").symlink_to("../..")
    return root


class Starter:
    """Sessions over plain directories, as ``start_point_files`` would hand them over; counts starts."""

    def __init__(self, tmp: Path, *, failing: set[str] | None = None) -> None:
        self.tmp = tmp
        self.failing = failing or set()
        self.started: list[str] = []
        self.sessions: list[FilesSession] = []

    def __call__(self, point: RestorePoint) -> FilesSession:
        self.started.append(point.id)
        if point.id in self.failing:
            raise FilesError("the disks could not be served: no such chunk")
        tree = _guest_tree(self.tmp / f"guest-{len(self.started)}")
        workdir = self.tmp / f"session-{len(self.started)}"
        workdir.mkdir()
        disk = point.disks[0]
        session = FilesSession(
            point,
            workdir,
            filesystems=[
                GuestFilesystem("sda1", disk, Partition(1, 1 << 20, 1 << 22, "0x83", "Linux"), "ext4"),
                GuestFilesystem("sda2", disk, Partition(2, 5 << 20, 1 << 20, "0x82", "Linux swap"), "swap"),
            ],
            mounted={"sda1": tree},
            record_path=self.tmp / f"session-{len(self.started)}.json",
        )
        self.sessions.append(session)
        return session


@pytest.fixture
def points(tmp_path: Path) -> tuple[Repository, list[RestorePoint]]:
    repo = Repository.init(tmp_path / "repo")
    first = make_point(repo)
    more = [
        dataclasses.replace(first, id=new_point_id(first.snapshot_time + timedelta(minutes=n)))
        for n in range(1, 5)
    ]
    return repo, [first, *more]


def _mount(
    tmp_path: Path, repo: Repository, points: list[RestorePoint], starter: Starter, limit: int = 4
) -> tuple[ReadOnlyPoints, list[str]]:
    errors: list[str] = []
    guest = GuestFiles(SessionPool(starter, limit=limit, on_error=errors.append), on_error=errors.append)
    tree = build_tree(points, guest_files=True)
    return ReadOnlyPoints(repo, tree, on_error=errors.append, guest=guest), errors


def _fds_under(directory: Path) -> list[str]:
    """This process's open fds on files below ``directory``."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(directory) + "/"):
            found.append(target)
    return found


def _errno(call: object, *args: object) -> int:
    with pytest.raises(OSError) as raised:
        call(*args)  # type: ignore[operator]
    assert isinstance(raised.value.errno, int)
    return raised.value.errno


def test_checked_parts_and_open_parent_never_leave_the_tree(tmp_path: Path) -> None:
    root = _guest_tree(tmp_path / "guest")
    for bad in (["..", "etc"], ["etc", "."], ["a/b"], [""], ["x\0y"]):
        assert _errno(checked_parts, bad) == errno.ENOENT
    fd = open_parent(root, ["etc", "app.conf"])
    try:
        assert os.stat("app.conf", dir_fd=fd).st_size == len(b"version = 1\n")
    finally:
        os.close(fd)
    assert _errno(open_parent, root, ["home", "escape", "passwd"]) == errno.ENOTDIR
    assert _errno(open_parent, root, ["home", "up", "guest", "etc"]) == errno.ENOTDIR
    assert _errno(open_parent, root, ["home", "..", "..", "x"]) == errno.ENOENT


def test_files_directory_is_lazy_and_passes_the_guest_through(
    tmp_path: Path, points: tuple[Repository, list[RestorePoint]]
) -> None:
    repo, all_points = points
    point = all_points[0]
    starter = Starter(tmp_path)
    ops, errors = _mount(tmp_path, repo, [point], starter)
    base = f"{VMDIR}/{point.id}/files"
    assert "files" in ops.readdir(f"{VMDIR}/{point.id}", 0)
    assert ops.getattr(base)["st_mode"] & 0o170000 == 0o040000
    assert starter.started == []  # listing a point or stat-ing its files/ starts nothing
    assert sorted(ops.readdir(base, 0)) == sorted([".", "..", README, "sda1"])
    assert starter.started == [point.id]

    conf = ops.getattr(f"{base}/sda1/etc/app.conf")
    assert (conf["st_mode"] & 0o7777, conf["st_mtime"], conf["st_size"]) == (0o640, OLD * 10**9, 12)
    assert conf["st_uid"] == os.getuid()
    assert sorted(ops.readdir(f"{base}/sda1/home", 0)[2:]) == ["conf-link", "escape", "up"]
    link = ops.getattr(f"{base}/sda1/home/escape")
    assert link["st_mode"] & 0o170000 == 0o120000
    assert ops.readlink(f"{base}/sda1/home/escape") == "/etc"
    assert ops.readlink(f"{base}/sda1/home/conf-link") == "../etc/app.conf"
    # a link is never followed by the mount, and '..' does not climb out of the guest
    assert _errno(ops.getattr, f"{base}/sda1/home/escape/passwd") == errno.ENOTDIR
    assert _errno(ops.open, f"{base}/sda1/home/escape", os.O_RDONLY) == errno.ELOOP
    assert _errno(ops.getattr, f"{base}/sda1/../../../etc/passwd") == errno.ENOENT
    assert _errno(ops.getattr, f"{base}/sda2") == errno.ENOENT  # swap: in the README, not a directory
    assert _errno(ops.getattr, f"{base}/nope") == errno.ENOENT

    fh = ops.open(f"{base}/sda1/etc/app.conf", os.O_RDONLY)
    assert ops.read("", 7, 0, fh) == b"version"
    assert ops.read("", 100, 8, fh) == b"= 1\n"
    ops.release("", fh)
    assert _errno(ops.open, f"{base}/sda1/etc/app.conf", os.O_RDWR) == errno.EROFS

    readme_size = ops.getattr(f"{base}/{README}")["st_size"]
    fh = ops.open(f"{base}/{README}", os.O_RDONLY)
    readme = ops.read("", 1 << 16, 0, fh).decode()
    ops.release("", fh)
    assert len(readme.encode()) == readme_size
    assert point.id in readme
    assert "sda1" in readme and "mounted read-only" in readme
    assert "sda2" in readme and "not browsable: swap space" in readme
    assert starter.started == [point.id] and errors == []

    ops.close()
    assert all(s.closed for s in starter.sessions)
    assert not (tmp_path / "session-1").exists()


def test_at_most_limit_points_open_the_idle_least_recent_released_first(
    tmp_path: Path, points: tuple[Repository, list[RestorePoint]]
) -> None:
    repo, all_points = points
    starter = Starter(tmp_path)
    ops, errors = _mount(tmp_path, repo, all_points, starter, limit=2)
    pool = ops.guest.pool  # type: ignore[union-attr]
    a, b, c, d = (f"{VMDIR}/{p.id}/files" for p in all_points[:4])
    held = ops.open(f"{a}/sda1/etc/app.conf", os.O_RDONLY)  # a stays in use
    ops.readdir(b, 0)
    ops.readdir(c, 0)  # b is idle and least recently used: released for c
    assert pool.open_points() == [all_points[0].id, all_points[2].id]
    assert [s.closed for s in starter.sessions] == [False, True, False]
    assert ops.read("", 7, 0, held) == b"version"

    held_c = ops.open(f"{c}/sda1/etc/app.conf", os.O_RDONLY)
    assert _errno(ops.readdir, d, 0) == errno.EBUSY  # both open points in use: no room
    (line,) = errors
    assert all_points[3].id in line and "in use" in line and "\n" not in line
    ops.release("", held)
    ops.readdir(d, 0)  # a is idle now: released for d
    assert pool.open_points() == [all_points[2].id, all_points[3].id]
    assert [s.closed for s in starter.sessions] == [True, True, False, False]

    assert len(_fds_under(tmp_path)) == 1  # held_c's
    ops.close()
    assert all(s.closed for s in starter.sessions)
    assert _fds_under(tmp_path) == []  # our fd on the guest's mount closed, so it can be unmounted
    assert held_c  # the kernel's release after the end finds nothing left to do


def test_a_point_that_cannot_be_mounted_is_eio_and_one_line(
    tmp_path: Path, points: tuple[Repository, list[RestorePoint]]
) -> None:
    repo, all_points = points
    bad = all_points[1]
    starter = Starter(tmp_path, failing={bad.id})
    ops, errors = _mount(tmp_path, repo, all_points, starter)
    base = f"{VMDIR}/{bad.id}/files"
    assert _errno(ops.readdir, base, 0) == errno.EIO
    (line,) = errors
    assert bad.id in line and NAME in line and "the disks could not be served" in line and "\n" not in line
    assert _errno(ops.getattr, f"{base}/sda1") == errno.EIO
    assert starter.started == [bad.id]  # not tried again at once, and said once
    assert len(errors) == 1
    assert "sda1" in ops.readdir(f"{VMDIR}/{all_points[0].id}/files", 0)  # the others still open
    ops.close()
    assert _errno(ops.readdir, f"{VMDIR}/{all_points[2].id}/files", 0) == errno.EIO  # the mount is ending
    assert starter.started == [bad.id, all_points[0].id]
