"""``mount --files`` against the lab, on the VMs of test_files_lab.py (GPT + ext4, MBR + FAT, backed up
twice with a file changed by a guest write in between): each point's ``files/`` shows its guest
filesystems, set up only when entered; a file reads back in its old version from the older point and
in its new one from the newer, with its times, mode, owner and symlinks; SIGTERM leaves no mount and no
loop device; a SIGKILLed mount is cleaned up by the next run; a damaged chunk under a guest file is EIO
and one line naming the point and the file."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_files_lab import (
    BIG,
    EXT4_VM,
    FAT_VM,
    NEW_TIME,
    OLD_TIME,
    Env,
    _cli,
    _Configured,
    _leftovers,
    damaged_chunk_under_big,
    env,
)
from tests.integration.test_files_lvm_lab import ROOT_BIG, SPAN_BIG, VM, XFS_REPORT, LvmEnv, lvm_env
from tests.waiting import wait_until

pytestmark = [pytest.mark.lab]
__all__ = ["env", "lvm_env"]  # the module's fixtures: the VMs and their two points


class Mounted:
    """``esxi-reconciler mount --files`` running in the background."""

    def __init__(self, env: _Configured, mountpoint: Path) -> None:
        mountpoint.mkdir(exist_ok=True)
        self.mountpoint = mountpoint
        self.log = mountpoint.with_name(mountpoint.name + ".log")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                _cli(env, "mount", "--files", str(mountpoint)), stdout=subprocess.DEVNULL, stderr=log
            )

        def up() -> bool:
            assert self.proc.poll() is None, self.log.read_text()
            return os.path.ismount(mountpoint)

        wait_until(f"mount --files on {mountpoint}", up, timeout=60)

    def files(self, vm: str, point: str) -> Path:
        return self.mountpoint / "vms" / vm / point / "files"

    def stop(self, how: signal.Signals = signal.SIGTERM) -> tuple[int, str]:
        """Send ``how``; the exit code and stderr."""
        self.proc.send_signal(how)
        self.proc.wait(timeout=120)
        return self.proc.returncode, self.log.read_text()


@pytest.fixture
def mounted(env: Env, tmp_path: Path) -> Iterator[Mounted]:
    mount = Mounted(env, tmp_path / "mnt")
    try:
        yield mount
    finally:
        if mount.proc.poll() is None:
            mount.stop()
        if str(mount.mountpoint) in Path("/proc/mounts").read_text():  # also a dead one (ENOTCONN)
            subprocess.run(["umount", "-l", str(mount.mountpoint)], check=False)


def _mounts_below(state: Path) -> list[str]:
    return [m for m in _leftovers(state) if m.startswith("/")]


def test_files_shows_each_points_guest_files_old_and_new_and_sigterm_releases_all(
    env: Env, mounted: Mounted
) -> None:
    old, new = env.points[EXT4_VM]
    assert "files" in os.listdir(mounted.mountpoint / "vms" / EXT4_VM / old)
    assert _leftovers(env.state) == []  # nothing is set up before a files/ is entered
    assert sorted(os.listdir(mounted.files(EXT4_VM, old))) == ["README.txt", "sda1"]
    assert any(m.endswith("/fs/sda1") for m in _mounts_below(env.state))

    old_conf = mounted.files(EXT4_VM, old) / "sda1" / "etc" / "app.conf"
    new_conf = mounted.files(EXT4_VM, new) / "sda1" / "etc" / "app.conf"
    assert old_conf.read_bytes() == b"version = 1\n"
    assert new_conf.read_bytes() == b"version = 2\n"
    assert (old_conf.stat().st_mtime, stat.S_IMODE(old_conf.stat().st_mode)) == (OLD_TIME, 0o640)
    assert (new_conf.stat().st_mtime, stat.S_IMODE(new_conf.stat().st_mode)) == (NEW_TIME, 0o600)
    big = mounted.files(EXT4_VM, "latest") / "sda1" / "home" / "ann" / "big.bin"
    assert big.read_bytes() == BIG
    assert (big.stat().st_mtime, big.stat().st_uid, big.stat().st_gid) == (OLD_TIME + 60, 1000, 1000)
    link = big.parent / "conf-link"
    assert link.is_symlink() and os.readlink(link) == "../../etc/app.conf"
    assert link.read_bytes() == b"version = 2\n"  # followed by the reader, inside the guest's tree
    with pytest.raises(OSError):
        new_conf.open("r+b")
    readme = (mounted.files(EXT4_VM, old) / "README.txt").read_text()
    assert old in readme and "sda1" in readme and "ext4" in readme and "mounted read-only" in readme

    fat_old, fat_new = env.points[FAT_VM]
    assert (mounted.files(FAT_VM, fat_old) / "sda1" / "etc" / "app.conf").read_bytes() == b"version = 1\n"
    fat_conf = mounted.files(FAT_VM, fat_new) / "sda1" / "etc" / "app.conf"
    assert fat_conf.read_bytes() == b"version = 2 (fat)\n"
    if "vfat" in Path("/proc/filesystems").read_text():  # fusefat (the fallback) gets FAT dates wrong
        assert fat_conf.stat().st_mtime == NEW_TIME

    with old_conf.open("rb") as still_open:  # the unmount closes what the mount holds open itself
        assert still_open.read(7) == b"version"
        code, err = mounted.stop(signal.SIGTERM)
    assert code == 0, err
    assert not os.path.ismount(mounted.mountpoint)
    assert _leftovers(env.state) == []
    assert list((env.state / "files").iterdir()) == []


def test_a_killed_mount_is_cleaned_up_by_the_next_run(env: Env, mounted: Mounted, tmp_path: Path) -> None:
    old, _ = env.points[EXT4_VM]
    fd = os.open(mounted.files(EXT4_VM, old) / "sda1" / "home" / "ann" / "big.bin", os.O_RDONLY)
    try:  # killed while a guest file is open
        assert os.read(fd, 4096) == BIG[:4096]
        mounted.stop(signal.SIGKILL)
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: its server is gone
            os.close(fd)
    assert any(m.endswith("/fs/sda1") for m in _mounts_below(env.state))  # left behind, with a record
    subprocess.run(["umount", "-l", str(mounted.mountpoint)], check=False)  # the dead FUSE mount
    again = Mounted(env, tmp_path / "again")
    try:
        assert _leftovers(env.state) == []  # released before anything else
        assert list((env.state / "files").iterdir()) == []
        conf = again.files(EXT4_VM, old) / "sda1" / "etc" / "app.conf"
        assert conf.read_bytes() == b"version = 1\n"
    finally:
        code, err = again.stop(signal.SIGINT)
    assert code == 0, err
    assert _leftovers(env.state) == []


def test_a_damaged_chunk_under_a_guest_file_is_eio_and_one_line_naming_point_and_file(
    env: Env, tmp_path: Path
) -> None:
    old, _ = env.points[EXT4_VM]
    with damaged_chunk_under_big(env, old):
        mount = Mounted(env, tmp_path / "mnt")
        try:
            big = mount.files(EXT4_VM, old) / "sda1" / "home" / "ann" / "big.bin"
            try:
                data = big.read_bytes()
            except OSError as exc:
                assert exc.errno == errno.EIO
            else:
                pytest.fail(f"read {len(data)} bytes, as stored: {data == BIG}; {mount.log.read_text()}")
            conf = mount.files(EXT4_VM, old) / "sda1" / "etc" / "app.conf"
            assert conf.read_bytes() == b"version = 1\n"  # the rest of the point still reads
        finally:
            code, err = mount.stop()
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if old in ln and "sda1/home/ann/big.bin" in ln]
    assert lines and all("cannot be read" in ln for ln in lines), err
    assert _leftovers(env.state) == []


def test_files_shows_the_logical_volumes_of_an_lvm_guest(lvm_env: LvmEnv, tmp_path: Path) -> None:
    old, new = lvm_env.points
    mount = Mounted(lvm_env, tmp_path / "mnt")
    try:
        files = mount.files(VM, new)
        assert {"README.txt", "sda1", "ubuntu--vg-root", "ubuntu--vg-data", "data--vg-archive"} <= set(
            os.listdir(files)
        )
        readme = (files / "README.txt").read_text()
        assert "LVM physical volume of volume group ubuntu-vg (root, data)" in readme
        assert (files / "ubuntu--vg-root" / "home" / "ann" / "big.bin").read_bytes() == ROOT_BIG
        assert (files / "data--vg-archive" / "archive.bin").read_bytes() == SPAN_BIG  # on two disks
        report = mount.files(VM, old) / "ubuntu--vg-data" / "srv" / "report.bin"
        assert report.read_bytes() == XFS_REPORT
        assert (report.stat().st_mtime, stat.S_IMODE(report.stat().st_mode)) == (OLD_TIME + 120, 0o600)
        for point, version in ((old, 1), (new, 2)):
            conf = mount.files(VM, point) / "ubuntu--vg-data" / "etc" / "app.conf"
            assert conf.read_bytes() == f"version = {version}\n".encode()
    finally:
        code, err = mount.stop()
    assert code == 0, err
    assert _leftovers(lvm_env.state) == []
    assert list((lvm_env.state / "files").iterdir()) == []
