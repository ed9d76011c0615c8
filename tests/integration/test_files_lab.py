"""File-level restore against the lab: VMs whose disks hold real filesystems (GPT + ext4, MBR + FAT,
MBR + NTFS), backed up twice with a file changed by a guest write in between; ``mount`` serves the disk
images byte-identical, ``files`` lists the trees and copies files back from either point with their
metadata, a killed ``files`` leaves no mount and no loop device, and a damaged chunk under a file is a
one-line error naming the point and the file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import jsonschema
import pytest

from esxisim import guestdisk
from esxisim.handle import LabHandle
from reconciler.repository import KdfParams, Repository
from reconciler.repository.chunks import chunk_name
from tests.integration.labconfig import PASSPHRASE, policy_yaml, write_lab_config

pytestmark = [pytest.mark.lab]

MiB = 1 << 20
EXT4_VM = "files-ext4"
FAT_VM = "files-fat"
EXFAT_VM = "files-exfat"
OLD_TIME = 1_700_000_000
NEW_TIME = 1_760_000_000
EXFAT_NEW_TIME = NEW_TIME + 1
"""An odd second: exFAT keeps times in 2 s steps plus a 10 ms field, which must carry it."""
EXFAT_NAME = "報告書 2025.txt"
BIG = random.Random(1807).randbytes(3 * MiB)


class _Configured(Protocol):
    config: Path
    state: Path


def _cli(env: _Configured, *args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "import sys; from reconciler.cli import main; sys.exit(main())",
        "--config",
        str(env.config),
        "--state-dir",
        str(env.state),
        "--log-format",
        "json",
        *args,
    ]


@dataclass
class Env:
    lab: LabHandle
    root: Path
    config: Path
    state: Path
    repo: Path
    ext4: guestdisk.GuestDisk
    fat: guestdisk.GuestDisk
    ntfs: guestdisk.GuestDisk | None
    points: dict[str, list[str]]
    """VM → its point ids, oldest first."""
    exfat: guestdisk.GuestDisk | None = None

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(_cli(self, *args), capture_output=True, text=True, timeout=300, check=False)
        if check:
            assert result.returncode == 0, result.stderr
        return result


def _tree(root: Path, *, symlinks: bool) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "home" / "ann").mkdir(parents=True)
    conf = root / "etc" / "app.conf"
    conf.write_bytes(b"version = 1\n")
    conf.chmod(0o640)
    os.utime(conf, (OLD_TIME, OLD_TIME))
    big = root / "home" / "ann" / "big.bin"
    big.write_bytes(BIG)
    os.utime(big, (OLD_TIME + 60, OLD_TIME + 60))
    if symlinks:
        (root / "home" / "ann" / "conf-link").symlink_to("../../etc/app.conf")
        os.chown(big, 1000, 1000)
    return root


def _leftovers(state: Path) -> list[str]:
    """Mounts below the state dir and loop devices whose backing file is below it."""
    left = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines() if str(state) in line]
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if str(state) in backing.read_text():
                left.append(backing.parent.parent.name)
        except OSError:
            pass
    return left


@pytest.fixture(scope="module")
def env(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if os.geteuid() != 0 or not guestdisk.available("ext4") or not guestdisk.available("vfat"):
        pytest.skip("file-level restore needs root, sfdisk, mkfs.ext4, debugfs, mkfs.vfat and mtools")
    root = tmp_path_factory.mktemp("files")
    ext4 = guestdisk.build_disk(root / "ext4.img", 24 * MiB, "gpt", "ext4", _tree(root / "t1", symlinks=True))
    fat = guestdisk.build_disk(root / "fat.img", 24 * MiB, "mbr", "vfat", _tree(root / "t2", symlinks=False))
    ntfs = None
    if guestdisk.available("ntfs") and shutil.which("ntfs-3g"):
        ntfs = guestdisk.build_disk(root / "ntfs.img", 16 * MiB, "mbr", "ntfs", root / "t2" / "etc")
    exfat = None
    vms = [EXT4_VM, FAT_VM]
    if guestdisk.available("exfat"):
        exfat_tree = _tree(root / "t3", symlinks=False)
        (exfat_tree / "home" / "ann" / EXFAT_NAME).write_text("四半期\n")
        os.utime(exfat_tree / "home" / "ann" / EXFAT_NAME, (OLD_TIME + 3, OLD_TIME + 3))
        exfat = guestdisk.build_disk(root / "exfat.img", 24 * MiB, "mbr", "exfat", exfat_tree)
        vms.append(EXFAT_VM)
    client = lab.client(lab.free)
    client.create_vm(
        {
            "name": EXT4_VM,
            "disks": [{"size": ext4.path.stat().st_size, "image": str(ext4.path)}],
            "power": "poweredOn",
        }
    )
    fat_disks = [{"size": fat.path.stat().st_size, "image": str(fat.path)}]
    if ntfs is not None:
        fat_disks.append({"size": ntfs.path.stat().st_size, "image": str(ntfs.path)})
    client.create_vm({"name": FAT_VM, "disks": fat_disks, "power": "poweredOn"})
    if exfat is not None:
        exfat_disk = {"size": exfat.path.stat().st_size, "image": str(exfat.path)}
        client.create_vm({"name": EXFAT_VM, "disks": [exfat_disk], "power": "poweredOn"})
    try:
        cfg = write_lab_config(lab, root, policy_yaml("files", lab.free, vms))
        Repository.init(root / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
        env = Env(lab, root, cfg, root / "state", root / "repo", ext4, fat, ntfs, {}, exfat)
        env.run("backup", "files")
        new_ext4 = root / "ext4-v2.img"
        ranges = guestdisk.change_file(
            ext4, new_ext4, "/etc/app.conf", b"version = 2\n", mtime=NEW_TIME, mode=0o600
        )
        client.guest_write_from(EXT4_VM, 0, new_ext4, ranges)
        new_fat = root / "fat-v2.img"
        ranges = guestdisk.change_file(fat, new_fat, "/etc/app.conf", b"version = 2 (fat)\n", mtime=NEW_TIME)
        client.guest_write_from(FAT_VM, 0, new_fat, ranges)
        if exfat is not None:
            new_exfat = root / "exfat-v2.img"
            ranges = guestdisk.change_file(
                exfat, new_exfat, "/etc/app.conf", b"version = 2 (exfat)\n", mtime=EXFAT_NEW_TIME
            )
            client.guest_write_from(EXFAT_VM, 0, new_exfat, ranges)
        env.run("backup", "files")
        repo = Repository.open(root / "repo", PASSPHRASE)
        for vm in vms:
            env.points[vm] = sorted(p.id for p in repo.list_points(vm=vm))
            assert len(env.points[vm]) == 2
        yield env
    finally:
        for vm in client.state()["vms"]:
            if vm["name"] in (EXT4_VM, FAT_VM, EXFAT_VM):
                client.vimcmd(["vmsvc/power.off", str(vm["vmid"])])
                client.vimcmd(["vmsvc/destroy", str(vm["vmid"])])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(MiB):
            digest.update(piece)
    return digest.hexdigest()


def test_mount_serves_each_disk_byte_identical_and_unmounts_on_sigterm(env: Env, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    refused = env.run("mount", str(tmp_path / "full"), check=False)
    assert refused.returncode == 64 and "not empty" in refused.stderr
    proc = subprocess.Popen(
        _cli(env, "mount", str(mountpoint)), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mountpoint):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        old, new = env.points[EXT4_VM]
        vm_dir = mountpoint / "vms" / EXT4_VM
        assert sorted(p.name for p in vm_dir.iterdir()) == sorted([old, new, "latest"])
        assert os.readlink(vm_dir / "latest") == new
        (image,) = [p for p in (vm_dir / old).iterdir() if p.suffix == ".img"]
        assert image.stat().st_size == env.ext4.path.stat().st_size
        assert _sha256(image) == _sha256(env.ext4.path)
        assert _sha256(vm_dir / "latest" / image.name) == _sha256(env.root / "ext4-v2.img")
        assert {p.suffix for p in (vm_dir / new).iterdir()} == {".vmx", ".nvram", ".img"}
        with pytest.raises(OSError):
            (vm_dir / new / image.name).open("r+b")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not os.path.ismount(mountpoint)


def test_files_ls_lists_the_filesystems_and_their_trees(env: Env) -> None:
    top = env.run("files", EXT4_VM, "ls").stdout
    assert "sda1" in top and "ext4" in top and "mounted read-only" in top
    tree = env.run("files", EXT4_VM, "ls", "sda1", "-R").stdout
    assert "sda1/etc/app.conf" in tree and "sda1/home/ann/big.bin" in tree
    assert "sda1/home/ann/conf-link -> ../../etc/app.conf" in tree
    fat = env.run("files", FAT_VM, "ls", "sda1/etc").stdout
    assert "sda1/etc/app.conf" in fat
    if env.ntfs is not None:
        assert "ntfs" in env.run("files", FAT_VM, "ls").stdout
        assert "sdb1/app.conf" in env.run("files", FAT_VM, "ls", "sdb1").stdout
    assert _leftovers(env.state) == []
    schema = json.loads(
        resources.files("reconciler.commands").joinpath("json_schemas/files.schema.json").read_text()
    )
    listed = json.loads(env.run("--json", "files", EXT4_VM, "ls", "sda1/home/ann").stdout)
    jsonschema.Draft202012Validator(schema).validate(listed)
    assert {e["path"]: e["kind"] for e in listed["entries"]} == {
        "sda1/home/ann/big.bin": "file",
        "sda1/home/ann/conf-link": "symlink",
    }
    top_json = json.loads(env.run("--json", "files", FAT_VM, "ls").stdout)
    jsonschema.Draft202012Validator(schema).validate(top_json)
    assert top_json["filesystems"][0]["kind"] == "vfat"
    missing = env.run("files", EXT4_VM, "ls", "sda1/nope", check=False)
    assert missing.returncode == 64 and "has no 'sda1/nope'" in missing.stderr


def test_cp_brings_back_each_version_from_its_point_with_times_and_modes(env: Env, tmp_path: Path) -> None:
    old, new = env.points[EXT4_VM]
    env.run("files", EXT4_VM, "--point", old, "cp", "sda1/etc", "--to", str(tmp_path / "old"))
    env.run("files", EXT4_VM, "--point", new, "cp", "sda1/etc/app.conf", "--to", str(tmp_path / "new"))
    env.run("files", EXT4_VM, "cp", "sda1/home", "--to", str(tmp_path / "home"))
    conf = (tmp_path / "old" / "etc" / "app.conf").stat()
    assert (tmp_path / "old" / "etc" / "app.conf").read_bytes() == b"version = 1\n"
    assert (conf.st_mtime, conf.st_mode & 0o7777) == (OLD_TIME, 0o640)
    conf = (tmp_path / "new" / "app.conf").stat()
    assert (tmp_path / "new" / "app.conf").read_bytes() == b"version = 2\n"
    assert (conf.st_mtime, conf.st_mode & 0o7777) == (NEW_TIME, 0o600)
    big = tmp_path / "home" / "home" / "ann" / "big.bin"
    assert big.read_bytes() == BIG
    assert (big.stat().st_mtime, big.stat().st_uid, big.stat().st_gid) == (OLD_TIME + 60, 1000, 1000)
    assert os.readlink(tmp_path / "home" / "home" / "ann" / "conf-link") == "../../etc/app.conf"
    again = env.run("files", EXT4_VM, "cp", "sda1/home", "--to", str(tmp_path / "home"), check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert env.run("files", EXT4_VM, "--point", old, "cat", "sda1/etc/app.conf").stdout == "version = 1\n"

    fold, fnew = env.points[FAT_VM]
    env.run("files", FAT_VM, "--point", fold, "cp", "sda1/etc/app.conf", "--to", str(tmp_path / "fold"))
    env.run("files", FAT_VM, "--point", fnew, "cp", "sda1/etc/app.conf", "--to", str(tmp_path / "fnew"))
    env.run("files", FAT_VM, "cp", "sda1/home/ann/big.bin", "--to", str(tmp_path / "fbig"))
    assert (tmp_path / "fold" / "app.conf").read_bytes() == b"version = 1\n"
    assert (tmp_path / "fnew" / "app.conf").read_bytes() == b"version = 2 (fat)\n"
    assert (tmp_path / "fbig" / "big.bin").read_bytes() == BIG
    if "vfat" in Path("/proc/filesystems").read_text():  # fusefat (the fallback) gets FAT dates wrong
        assert (tmp_path / "fold" / "app.conf").stat().st_mtime == OLD_TIME
        assert (tmp_path / "fnew" / "app.conf").stat().st_mtime == NEW_TIME
    if env.ntfs is not None:
        env.run("files", FAT_VM, "cp", "sdb1/app.conf", "--to", str(tmp_path / "ntfs"))
        assert (tmp_path / "ntfs" / "app.conf").read_bytes() == b"version = 1\n"
        assert stat.S_IMODE((tmp_path / "ntfs" / "app.conf").stat().st_mode) == 0o644  # not ntfs-3g's 0777
    assert _leftovers(env.state) == []


def test_exfat_lists_and_copies_each_version_with_its_modification_time(env: Env, tmp_path: Path) -> None:
    """An MBR type 0x07 partition holding exFAT (told from NTFS by its boot sector), mounted through
    the kernel's exfat or exfat-fuse: the times as the guest wrote them, whatever the UTC offset the
    driver stored with them (exFAT keeps local time plus an offset)."""
    if env.exfat is None:
        pytest.skip("an exFAT lab disk needs root, mkfs.exfat (exfatprogs) and mount.exfat-fuse")
    old, new = env.points[EXFAT_VM]
    top = env.run("files", EXFAT_VM, "ls").stdout
    assert "sda1" in top and "exfat" in top and "HPFS/NTFS/exFAT" in top and "mounted read-only" in top
    (fs,) = json.loads(env.run("--json", "files", EXFAT_VM, "ls").stdout)["filesystems"]
    assert (fs["name"], fs["kind"], fs["type"], fs["state"]) == (
        "sda1",
        "exfat",
        "HPFS/NTFS/exFAT",
        "mounted read-only",
    )
    listed = json.loads(env.run("--json", "files", EXFAT_VM, "--point", old, "ls", "sda1", "-R").stdout)
    mtimes = {e["path"]: e["mtime_ns"] // 10**9 for e in listed["entries"] if e["kind"] == "file"}
    assert mtimes == {
        "sda1/etc/app.conf": OLD_TIME,
        "sda1/home/ann/big.bin": OLD_TIME + 60,
        f"sda1/home/ann/{EXFAT_NAME}": OLD_TIME + 3,
    }
    env.run("files", EXFAT_VM, "--point", old, "cp", "sda1/etc", "--to", str(tmp_path / "old"))
    env.run("files", EXFAT_VM, "--point", new, "cp", "sda1/etc/app.conf", "--to", str(tmp_path / "new"))
    env.run("files", EXFAT_VM, "cp", "sda1/home", "--to", str(tmp_path / "home"))
    conf = tmp_path / "old" / "etc" / "app.conf"
    assert (conf.read_bytes(), conf.stat().st_mtime) == (b"version = 1\n", OLD_TIME)
    conf = tmp_path / "new" / "app.conf"
    assert (conf.read_bytes(), conf.stat().st_mtime) == (b"version = 2 (exfat)\n", EXFAT_NEW_TIME)
    ann = tmp_path / "home" / "home" / "ann"
    assert (ann / "big.bin").read_bytes() == BIG and (ann / "big.bin").stat().st_mtime == OLD_TIME + 60
    assert (ann / EXFAT_NAME).read_text() == "四半期\n"
    assert (ann / EXFAT_NAME).stat().st_mtime == OLD_TIME + 3
    # exFAT has no Unix modes: files come back 0644 and directories 0755, not the driver's 0777
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "old" / "etc").stat().st_mode) == 0o755
    said = env.run("files", EXFAT_VM, "--point", new, "cat", f"sda1/home/ann/{EXFAT_NAME}").stdout
    assert said == "四半期\n"
    assert _leftovers(env.state) == []


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_killed_files_leaves_no_mount_and_no_loop_device(env: Env, how: signal.Signals) -> None:
    # mid-copy for sure: `cat` of a file of several MiB into a pipe nobody reads blocks once the pipe
    # is full, with the filesystem mounted (a `cp` of the small tree could end between two polls)
    proc = subprocess.Popen(
        _cli(env, "files", EXT4_VM, "cat", "sda1/home/ann/big.bin"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not any("/fs/sda1" in m for m in _leftovers(env.state)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(how)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    if how == signal.SIGKILL:  # the next run releases what the killed one left
        env.run("files", EXT4_VM, "ls")
    assert _leftovers(env.state) == []
    assert list((env.state / "files").iterdir()) == []


@contextlib.contextmanager
def damaged_chunk_under_big(env: Env, point_id: str) -> Iterator[None]:
    """The stored chunk of ``point_id`` holding part of ``/home/ann/big.bin`` damaged (some bytes
    flipped) for the length of the ``with``, then put back."""
    image = env.ext4.path.read_bytes()
    where = image.find(BIG[2 * MiB : 2 * MiB + 4096])
    assert where > 0
    repo = Repository.open(env.repo, PASSPHRASE)
    (disk,) = repo.read_point(point_id).disks
    chunk = env.repo / chunk_name(repo.read_index(disk.index)[where // MiB])
    saved = chunk.read_bytes()
    chunk.chmod(0o600)
    chunk.write_bytes(saved[:100] + bytes(b ^ 0xFF for b in saved[100:200]) + saved[200:])
    try:
        yield
    finally:
        chunk.write_bytes(saved)


def test_a_damaged_chunk_under_a_file_names_the_point_and_the_file(env: Env, tmp_path: Path) -> None:
    old, _ = env.points[EXT4_VM]
    with damaged_chunk_under_big(env, old):
        result = env.run(
            "files",
            EXT4_VM,
            "--point",
            old,
            "cp",
            "sda1/home/ann/big.bin",
            "--to",
            str(tmp_path),
            check=False,
        )
    assert result.returncode == 1
    (line,) = [ln for ln in result.stderr.splitlines() if old in ln and "sda1/home/ann/big.bin" in ln]
    assert "cannot be read" in line
    assert _leftovers(env.state) == []
