"""Guest disks with real filesystems for the lab, built from files on this machine, no guest OS.

:func:`build_disk` writes a raw disk image holding a partition table (``sfdisk``: GPT or MBR) and one
filesystem made from a directory tree: ext4 (``mkfs.ext4 -d``, times, modes, owners and symlinks kept),
FAT (``mkfs.vfat`` + ``mcopy -s -m``, times kept), exFAT (``mkfs.exfat``, then copied in through a
read-write ``mount.exfat-fuse`` of a loop device on a private temporary directory, times kept; root
only) or NTFS (``mkntfs`` + ``ntfscp``, files at the root only). A lab VM is created with the image
as its disk (``ControlClient.create_vm`` with ``"image"``).

:func:`build_lvm_disks` writes disks as an installer with LVM leaves them (Ubuntu, RHEL): GPT, a small
ext4 ``/boot`` on the first, then a physical volume on each and one volume group over them, its logical
volumes holding ext4 (``mkfs.ext4 -d``) or XFS (``mkfs.xfs -p`` with a prototype file, times set with
``xfs_db``). lvm2 runs on read-write loop devices of this machine with its own ``LVM_SYSTEM_DIR`` (the
host's LVM state is not touched) and without device-mapper (``lvcreate --driverloaded n -an``: nothing
is activated); the filesystems are written into the disk images at the extents ``lvs`` reports. A
volume created small and extended after another one has two segments, as after a guest's ``lvextend``.

:func:`change_file` is a guest editing one file: it rewrites the file inside a copy of the image
(``debugfs -w`` for ext4, ``mcopy -o`` for FAT, ``xfs_db -x`` for XFS (same size only) — never through
a kernel mount; in an LVM volume too; exFAT, which has no such tool, through the same private
exfat-fuse mount as it was built with) and returns the byte
ranges that differ, which ``ControlClient.guest_write_from`` then writes into the running VM's disk (so
CBT sees a guest write of exactly those blocks).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MiB = 1 << 20
PART_START = MiB
"""The partition starts at 1 MiB, as fdisk and the installers place it."""
_COMPARE = 64 * 1024

KINDS = ("ext4", "vfat", "ntfs", "xfs", "exfat")
_GPT_LVM = "E6D6D379-F507-44C2-A23C-238F2A3DF928"
LVM_TOOLS = ("losetup", "pvcreate", "vgcreate", "lvcreate", "lvextend", "lvs", "pvs")


@dataclass(frozen=True)
class GuestDisk:
    path: Path
    scheme: str
    kind: str
    start: int
    size: int
    """Of the partition (or logical volume), in bytes."""
    pieces: tuple[tuple[Path, int, int], ...] = ()
    """A logical volume's bytes in order: (disk image, offset, length); empty for a partition."""

    def runs(self) -> tuple[tuple[Path, int, int], ...]:
        """Where the filesystem's bytes are, in order."""
        return self.pieces or ((self.path, self.start, self.size),)


def available(kind: str) -> bool:
    """Whether this machine has the tools to build (and change files of) a ``kind`` filesystem; exFAT
    also needs root (its files are written through a FUSE mount of a loop device)."""
    if kind == "exfat" and os.geteuid() != 0:
        return False
    tools = {
        "ext4": ("sfdisk", "mkfs.ext4", "debugfs"),
        "vfat": ("sfdisk", "mkfs.vfat", "mcopy"),
        "ntfs": ("sfdisk", "mkntfs", "ntfscp"),
        "xfs": ("sfdisk", "mkfs.xfs", "xfs_db"),
        "exfat": ("sfdisk", "mkfs.exfat", "fsck.exfat", "losetup", "mount.exfat-fuse", "umount"),
    }[kind]
    return all(shutil.which(t) for t in tools)


def _run(*argv: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")


def build_disk(
    path: Path, size: int, scheme: str, kind: str, tree: Path, *, label: str = "data"
) -> GuestDisk:
    """A disk image of ``size`` bytes at ``path``: a ``scheme`` (``gpt``/``mbr``) table with one
    partition from 1 MiB to the end holding a ``kind`` filesystem with the content of ``tree``."""
    part_size = size - PART_START - (MiB if scheme == "gpt" else 0)  # GPT keeps a backup table at the end
    with path.open("wb") as f:
        f.truncate(size)
    mbr_type = {"ext4": "83", "vfat": "c", "ntfs": "7", "exfat": "7"}[kind]
    gpt_type = {
        "ext4": "L",
        "vfat": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
        "ntfs": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
        "exfat": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
    }[kind]
    part_type = gpt_type if scheme == "gpt" else mbr_type
    script = (
        f"label: {'gpt' if scheme == 'gpt' else 'dos'}\n"
        f"start={PART_START // 512}, size={part_size // 512}, type={part_type}"
        + (f', name="{label}"' if scheme == "gpt" else "")
        + "\n"
    )
    subprocess.run(["sfdisk", "--quiet", str(path)], input=script, text=True, check=True, capture_output=True)
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "part.img"
        _make_filesystem(part, part_size, kind, tree, label)
        _put(path, PART_START, part)
    return GuestDisk(path, scheme, kind, PART_START, part_size)


def _make_filesystem(part: Path, part_size: int, kind: str, tree: Path, label: str) -> None:
    """A ``kind`` filesystem of ``part_size`` bytes in the file ``part``, holding ``tree``."""
    with part.open("wb") as f:
        f.truncate(part_size)
    if kind == "ext4":
        env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1764000000"}
        _run(
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            label,
            "-d",
            str(tree),
            "-E",
            "root_owner=0:0",
            str(part),
            env=env,
        )
    elif kind == "vfat":
        _run("mkfs.vfat", "-n", label.upper()[:11], str(part))
        entries = [str(p) for p in sorted(tree.iterdir())]
        if entries:
            _run("mcopy", "-s", "-m", "-i", str(part), *entries, "::/")
    elif kind == "ntfs":
        _run("mkntfs", "-Q", "-F", "-q", "-L", label, str(part))
        for entry in sorted(tree.iterdir()):
            if entry.is_file():
                _run("ntfscp", "-f", str(part), str(entry), entry.name)
    elif kind == "xfs":
        _make_xfs(part, tree, label)
    elif kind == "exfat":
        _run("mkfs.exfat", "-L", label[:11], str(part))
        with _exfat_mounted(part) as mounted:
            _copy_tree(tree, mounted)
        _run("fsck.exfat", "-n", str(part))
    else:
        raise ValueError(f"unknown filesystem kind {kind!r}")


def _put(disk: Path, offset: int, part: Path) -> None:
    with disk.open("r+b") as out, part.open("rb") as src:
        out.seek(offset)
        shutil.copyfileobj(src, out, MiB)


def change_file(
    disk: GuestDisk, new_image: Path, guest_path: str, data: bytes, *, mtime: int, mode: int = 0o644
) -> list[tuple[int, int]]:
    """Write ``data`` as ``guest_path`` (``/etc/app.conf``) into a copy of ``disk`` at ``new_image``, its
    modification time ``mtime`` (and ``mode`` on ext4 and XFS); returns the byte ranges (offset, length)
    of the disk that changed. XFS: ``data`` must be as long as the file is."""
    runs = disk.runs()
    if any(path != disk.path for path, _, _ in runs):
        raise ValueError("changing a file of a volume that spans several disks is not supported")
    shutil.copyfile(disk.path, new_image)
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "part.img"
        with disk.path.open("rb") as src, part.open("wb") as out:
            for _, offset, length in runs:
                src.seek(offset)
                _copy_bytes(src, out, length)
        source = Path(tmp) / "new"
        source.write_bytes(data)
        os.utime(source, (mtime, mtime))
        if disk.kind == "ext4":
            directory, name = guest_path.rsplit("/", 1)
            commands = Path(tmp) / "cmds"
            commands.write_text(
                f"cd {directory or '/'}\nrm {name}\nwrite {source} {name}\n"
                f"sif {name} mode 0{0o100000 | mode:o}\n"
                f"sif {name} mtime @{mtime}\nsif {name} atime @{mtime}\nsif {name} ctime @{mtime}\n"
            )
            _run("debugfs", "-w", "-f", str(commands), str(part))
        elif disk.kind == "vfat":
            _run("mcopy", "-o", "-m", "-i", str(part), str(source), f"::{guest_path}")
        elif disk.kind == "xfs":
            _rewrite_xfs_file(part, guest_path, data, mtime=mtime, mode=mode)
        elif disk.kind == "exfat":
            with _exfat_mounted(part) as mounted:
                target = mounted / guest_path.lstrip("/")
                target.write_bytes(data)
                os.utime(target, (mtime, mtime))
            _run("fsck.exfat", "-n", str(part))
        else:
            raise ValueError(f"changing a file of {disk.kind} is not supported")
        with part.open("rb") as src, new_image.open("r+b") as out:
            for _, offset, length in runs:
                out.seek(offset)
                _copy_bytes(src, out, length)
    return changed_ranges(disk.path, new_image)


def _copy_bytes(src: BinaryIO, out: BinaryIO, length: int) -> None:
    """``length`` bytes from ``src``'s position to ``out``'s, a MiB at a time."""
    while length:
        piece = src.read(min(MiB, length))
        if not piece:
            raise ValueError(f"{src.name}: {length} bytes missing")
        out.write(piece)
        length -= len(piece)


# -- exFAT through exfat-fuse --------------------------------------------------------------------

EXFAT_GUEST_TZ = "JST-9"
"""The guest's clock: exFAT stores local time with its offset from UTC, and a Windows guest keeps
local time, so the lab writes as a guest in UTC+9 would (a POSIX TZ, no tzdata needed); a reader must
apply the stored offset to get the times right on a machine in UTC."""


@contextlib.contextmanager
def _exfat_mounted(part: Path) -> Iterator[Path]:
    """The exFAT filesystem in the file ``part`` mounted read-write by exfat-fuse on a private temporary
    directory (a read-write loop device: as root exfat-fuse wants a block device); unmounted and the
    loop device detached on the way out. ``umount`` of this ``fuseblk`` mount returns once exfat-fuse
    has flushed and closed the device, so ``part`` then holds everything written."""
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(part)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            mountpoint = Path(tmp) / "mnt"
            mountpoint.mkdir(mode=0o700)
            _run(
                "mount.exfat-fuse",
                "-o",
                "rw",
                loop,
                str(mountpoint),
                env={**os.environ, "TZ": EXFAT_GUEST_TZ},
            )
            try:
                yield mountpoint
            finally:
                _run("umount", str(mountpoint))
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)


def _copy_tree(tree: Path, mounted: Path) -> None:
    """``tree`` into the mounted exFAT root with the contents and modification times (exFAT keeps
    no owners, modes or links); directories' times set last, deepest first, since writing into a
    directory touches its time."""
    for entry in tree.rglob("*"):
        if entry.is_symlink():
            raise ValueError(f"{entry}: exFAT cannot hold symlinks")
    shutil.copytree(tree, mounted, dirs_exist_ok=True, copy_function=shutil.copy2)
    directories = sorted((p for p in tree.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for directory in directories:
        st = directory.stat()
        os.utime(mounted / directory.relative_to(tree), ns=(st.st_atime_ns, st.st_mtime_ns))


# -- XFS without a kernel mount -------------------------------------------------------------------

_XFS_ENV = {"QA_CHECK_FS": "1", "TEST_DIR": "1", "TEST_DEV": "1"}
"""mkfs.xfs refuses filesystems under 300 MB outside xfstests; these say we are one (lab disks stay small)."""


def _xfs_time(seconds: int) -> str:
    """A time for ``xfs_db write core.mtime.sec``: without ``bigtime`` that field writes the whole
    timestamp (seconds in the high 32 bits, nanoseconds in the low ones)."""
    return str(seconds << 32)


def _make_xfs(part: Path, tree: Path, label: str) -> None:
    """XFS from ``tree`` without mounting it: ``mkfs.xfs -p`` with a prototype file (names, modes,
    owners, contents, symlinks), then each entry's times set with ``xfs_db -x``."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]
    times: list[tuple[str, int]] = []

    def walk(directory: Path, inside: str) -> None:
        for entry in sorted(directory.iterdir()):
            st = entry.lstat()
            if " " in entry.name:
                raise ValueError(f"{entry}: XFS prototype files cannot hold names with spaces")
            perms = f"{st.st_mode & 0o777:03o}"
            setid = ("u" if st.st_mode & 0o4000 else "-") + ("g" if st.st_mode & 0o2000 else "-")
            owner = f"{st.st_uid} {st.st_gid}"
            if entry.is_symlink():
                lines.append(f"{entry.name} l{setid}{perms} {owner} {entry.readlink()}")
                continue
            if entry.is_dir():
                lines.append(f"{entry.name} d{setid}{perms} {owner}")
                walk(entry, f"{inside}/{entry.name}")
                lines.append("$")
            else:
                lines.append(f"{entry.name} -{setid}{perms} {owner} {entry}")
            times.append((f"{inside}/{entry.name}", int(st.st_mtime)))

    walk(tree, "")
    lines.append("$")
    with tempfile.TemporaryDirectory() as tmp:
        proto = Path(tmp) / "proto"
        proto.write_text("\n".join(lines) + "\n")
        _run(
            "mkfs.xfs",
            "-q",
            "-f",
            "-L",
            label[:12],
            "-m",
            "bigtime=0",
            "-p",
            str(proto),
            str(part),
            env={**os.environ, **_XFS_ENV},
        )
    commands: list[str] = []
    for path, when in times:
        commands += ["-c", f"path {path}", "-c", f"write core.mtime.sec {_xfs_time(when)}"]
        commands += ["-c", f"write core.atime.sec {_xfs_time(when)}"]
    if commands:
        _run("xfs_db", "-x", *commands, str(part))


def _xfs_db(part: Path, *commands: str) -> str:
    argv = ["xfs_db", "-r"]
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run([*argv, str(part)], capture_output=True, text=True, check=True)
    return result.stdout


def _rewrite_xfs_file(part: Path, guest_path: str, data: bytes, *, mtime: int, mode: int) -> None:
    """Overwrite the data of an XFS file in place (same size: its one extent is rewritten), then its
    mode and times, as a guest's write of those blocks would leave them."""
    said = _xfs_db(part, f"path {guest_path}", "print core.size", "bmap", "sb 0", "print blocksize agblocks")
    size = int(re.search(r"core\.size = (\d+)", said).group(1))  # type: ignore[union-attr]
    if size != len(data):
        raise ValueError(f"XFS: {guest_path} holds {size} bytes; only a change of the same size is supported")
    block = int(re.search(r"blocksize = (\d+)", said).group(1))  # type: ignore[union-attr]
    ag_blocks = int(re.search(r"agblocks = (\d+)", said).group(1))  # type: ignore[union-attr]
    extent = re.search(r"data offset 0 startblock \d+ \((\d+)/(\d+)\) count (\d+)", said)
    if extent is None or int(extent.group(3)) * block < size:
        raise ValueError(f"XFS: {guest_path} is not in one extent: {said!r}")
    offset = (int(extent.group(1)) * ag_blocks + int(extent.group(2))) * block
    with part.open("r+b") as f:
        f.seek(offset)
        f.write(data)
    _run(
        "xfs_db",
        "-x",
        "-c",
        f"path {guest_path}",
        "-c",
        f"write core.mode 0{0o100000 | mode:o}",
        "-c",
        f"write core.mtime.sec {_xfs_time(mtime)}",
        "-c",
        f"write core.atime.sec {_xfs_time(mtime)}",
        "-c",
        f"write core.ctime.sec {_xfs_time(mtime)}",
        str(part),
    )


# -- LVM -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Volume:
    """A logical volume to build: ``size`` bytes holding a ``kind`` filesystem with ``tree``; with
    ``grow_to`` it is created with ``size``, and extended to ``grow_to`` after the volumes that follow
    it were created (so it has two segments, as after a guest's ``lvextend``)."""

    name: str
    kind: str
    tree: Path
    size: int
    grow_to: int | None = None


def lvm_available() -> bool:
    """Whether this machine can build LVM disks: root (loop devices), lvm2 and the filesystems' tools."""
    return os.geteuid() == 0 and all(shutil.which(t) for t in LVM_TOOLS) and available("xfs")


_LAB_LVM_CONF = """\
devices { use_devicesfile = 0 obtain_device_list_from_udev = 0 hints = "none" scan_lvs = 0 }
global { use_lvmlockd = 0 event_activation = 0 locking_dir = "%(root)s/lock" }
backup { backup = 0 archive = 0 backup_dir = "%(root)s/backup" archive_dir = "%(root)s/archive" }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
"""


def build_lvm_disks(
    paths: list[Path],
    size: int,
    vg: str,
    volumes: list[Volume],
    *,
    boot: Path | None = None,
    extent: int = 4 * MiB,
) -> dict[str, GuestDisk]:
    """Disks of ``size`` bytes at ``paths``, each GPT with one LVM physical volume (after a 16 MiB ext4
    ``/boot`` holding ``boot`` on the first, when given), one volume group ``vg`` over them with
    ``extent``-sized extents and ``volumes`` in it; name → where each filesystem is (``"boot"`` too)."""
    boot_size = 16 * MiB if boot is not None else 0
    pvs: list[tuple[Path, int, int]] = []
    for index, path in enumerate(paths):
        with path.open("wb") as f:
            f.truncate(size)
        start = PART_START + (boot_size if index == 0 else 0)
        pv_size = size - start - MiB
        script = "label: gpt\n"
        if index == 0 and boot is not None:
            script += f'start={PART_START // 512}, size={boot_size // 512}, type=L, name="boot"\n'
        script += f'start={start // 512}, size={pv_size // 512}, type={_GPT_LVM}, name="lvm"\n'
        subprocess.run(
            ["sfdisk", "--quiet", str(path)], input=script, text=True, check=True, capture_output=True
        )
        pvs.append((path, start, pv_size))
    made: dict[str, GuestDisk] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if boot is not None:
            part = Path(tmp) / "boot.img"
            _make_filesystem(part, boot_size, "ext4", boot, "boot")
            _put(paths[0], PART_START, part)
            made["boot"] = GuestDisk(paths[0], "gpt", "ext4", PART_START, boot_size)
        layout = _create_volume_group(Path(tmp), pvs, vg, volumes, extent)
        for volume in volumes:
            pieces = layout[volume.name]
            total = sum(length for _, _, length in pieces)
            part = Path(tmp) / f"{volume.name}.img"
            _make_filesystem(part, total, volume.kind, volume.tree, volume.name)
            with part.open("rb") as src:
                for path, offset, length in pieces:
                    with path.open("r+b") as out:
                        out.seek(offset)
                        remaining = length
                        while remaining:
                            piece = src.read(min(MiB, remaining))
                            out.write(piece)
                            remaining -= len(piece)
            made[volume.name] = GuestDisk(
                pieces[0][0], "gpt", volume.kind, pieces[0][1], total, tuple(pieces)
            )
    return made


def _create_volume_group(
    tmp: Path, pvs: list[tuple[Path, int, int]], vg: str, volumes: list[Volume], extent: int
) -> dict[str, list[tuple[Path, int, int]]]:
    """lvm2 on read-write loop devices of the partitions, nothing activated; each volume's pieces
    (disk image, offset, length) as ``lvs --segments`` reports them."""
    system = tmp / "lvm"
    system.mkdir()
    (system / "lvm.conf").write_text(_LAB_LVM_CONF % {"root": system})
    env = {**os.environ, "LVM_SYSTEM_DIR": str(system), "LVM_SUPPRESS_FD_WARNINGS": "1"}
    loops: list[str] = []
    try:
        for path, start, pv_size in pvs:
            result = subprocess.run(
                [
                    "losetup",
                    "--find",
                    "--show",
                    "--offset",
                    str(start),
                    "--sizelimit",
                    str(pv_size),
                    str(path),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            loops.append(result.stdout.strip())
        devices = ["--devices", ",".join(loops)]
        quiet = ["--driverloaded", "n", "-an", "-Zn", "-y"]
        _run("pvcreate", *devices, *loops, env=env)
        _run("vgcreate", *devices, "-s", f"{extent // 1024}k", vg, *loops, env=env)
        for volume in volumes:
            _run(
                "lvcreate", *devices, *quiet, "-L", f"{volume.size // 1024}k", "-n", volume.name, vg, env=env
            )
        for volume in volumes:
            if volume.grow_to is not None:
                _run(
                    "lvextend",
                    *devices,
                    "--driverloaded",
                    "n",
                    "-L",
                    f"{volume.grow_to // 1024}k",
                    f"{vg}/{volume.name}",
                    env=env,
                )
        report = subprocess.run(
            [
                "lvs",
                *devices,
                "--readonly",
                "--reportformat",
                "json",
                "--segments",
                "--units",
                "b",
                "-o",
                "lv_name,seg_start,seg_size,seg_pe_ranges,vg_extent_size",
                vg,
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        pe_starts = subprocess.run(
            [
                "pvs",
                *devices,
                "--readonly",
                "--reportformat",
                "json",
                "--units",
                "b",
                "-o",
                "pv_name,pe_start",
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
    finally:
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
    where = {loop: pvs[i] for i, loop in enumerate(loops)}
    pe_start = {
        row["pv_name"]: int(row["pe_start"].rstrip("B"))
        for row in json.loads(pe_starts.stdout)["report"][0]["pv"]
    }
    layout: dict[str, list[tuple[Path, int, int]]] = {}
    for row in sorted(
        json.loads(report.stdout)["report"][0]["seg"], key=lambda r: int(r["seg_start"].rstrip("B"))
    ):
        device, extents = row["seg_pe_ranges"].rsplit(":", 1)
        first = int(extents.split("-")[0])
        path, start, _ = where[device]
        offset = start + pe_start[device] + first * int(row["vg_extent_size"].rstrip("B"))
        layout.setdefault(row["lv_name"], []).append((path, offset, int(row["seg_size"].rstrip("B"))))
    return layout


def changed_ranges(old: Path, new: Path) -> list[tuple[int, int]]:
    """The 64 KiB-aligned ranges where two images of one size differ, adjacent ones merged."""
    ranges: list[tuple[int, int]] = []
    with old.open("rb") as a, new.open("rb") as b:
        offset = 0
        while True:
            x, y = a.read(_COMPARE), b.read(_COMPARE)
            if not x and not y:
                break
            if x != y:
                if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + len(y))
                else:
                    ranges.append((offset, len(y)))
            offset += len(y)
    return ranges
