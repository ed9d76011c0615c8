"""Guest disks with real filesystems for the lab, built from files on this machine, no guest OS.

:func:`build_disk` writes a raw disk image holding a partition table (``sfdisk``: GPT or MBR) and one
filesystem made from a directory tree: ext4 (``mkfs.ext4 -d``, times, modes, owners and symlinks kept),
FAT (``mkfs.vfat`` + ``mcopy -s -m``, times kept) or NTFS (``mkntfs`` + ``ntfscp``, files at the root
only). A lab VM is created with the image as its disk (``ControlClient.create_vm`` with ``"image"``).

:func:`change_file` is a guest editing one file: it rewrites the file inside a copy of the image
(``debugfs -w`` for ext4, ``mcopy -o`` for FAT — never through a kernel mount) and returns the byte
ranges that differ, which ``ControlClient.guest_write_from`` then writes into the running VM's disk (so
CBT sees a guest write of exactly those blocks).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
PART_START = MiB
"""The partition starts at 1 MiB, as fdisk and the installers place it."""
_COMPARE = 64 * 1024

KINDS = ("ext4", "vfat", "ntfs")


@dataclass(frozen=True)
class GuestDisk:
    path: Path
    scheme: str
    kind: str
    start: int
    size: int
    """Of the partition, in bytes."""


def available(kind: str) -> bool:
    """Whether this machine has the tools to build (and change files of) a ``kind`` filesystem."""
    tools = {
        "ext4": ("sfdisk", "mkfs.ext4", "debugfs"),
        "vfat": ("sfdisk", "mkfs.vfat", "mcopy"),
        "ntfs": ("sfdisk", "mkntfs", "ntfscp"),
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
    mbr_type = {"ext4": "83", "vfat": "c", "ntfs": "7"}[kind]
    gpt_type = {
        "ext4": "L",
        "vfat": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
        "ntfs": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
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
        else:
            raise ValueError(f"unknown filesystem kind {kind!r}")
        _put(path, PART_START, part)
    return GuestDisk(path, scheme, kind, PART_START, part_size)


def _put(disk: Path, offset: int, part: Path) -> None:
    with disk.open("r+b") as out, part.open("rb") as src:
        out.seek(offset)
        shutil.copyfileobj(src, out, MiB)


def change_file(
    disk: GuestDisk, new_image: Path, guest_path: str, data: bytes, *, mtime: int, mode: int = 0o644
) -> list[tuple[int, int]]:
    """Write ``data`` as ``guest_path`` (``/etc/app.conf``) into a copy of ``disk`` at ``new_image``, its
    modification time ``mtime`` (and ``mode`` on ext4); returns the byte ranges (offset, length) of the
    disk that changed."""
    shutil.copyfile(disk.path, new_image)
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "part.img"
        with disk.path.open("rb") as src, part.open("wb") as out:
            src.seek(disk.start)
            remaining = disk.size
            while remaining:
                piece = src.read(min(MiB, remaining))
                out.write(piece)
                remaining -= len(piece)
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
        else:
            raise ValueError(f"changing a file of {disk.kind} is not supported")
        _put(new_image, disk.start, part)
    return changed_ranges(disk.path, new_image)


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
