"""What is on a disk, from its bytes (``facts/partitions.py``), on images made by the real tools (sfdisk,
mkfs): GPT with names, MBR with logical partitions, a damaged GPT read from its backup header, a whole
disk filesystem; and the mount's directory names, unambiguous when two hosts back up a VM of one name."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from esxisim import guestdisk
from reconciler.facts.partitions import PartitionTableError, detect_filesystem, read_partition_table
from reconciler.facts.points import VmRef
from reconciler.operations.mount import build_tree, vm_directories
from tests.unit.test_repository_format import make_point

MiB = 1 << 20
needs_sfdisk = pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk (fdisk package) missing")


def _reader(path: Path) -> Callable[[int, int], bytes]:
    data = path.read_bytes()
    return lambda offset, size: data[offset : offset + size]


def _sfdisk(path: Path, size: int, script: str) -> None:
    with path.open("wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "--quiet", str(path)], input=script, text=True, check=True, capture_output=True)


@needs_sfdisk
def test_gpt_partitions_with_names_types_and_filesystems(tmp_path: Path) -> None:
    if not guestdisk.available("ext4"):
        pytest.skip("mkfs.ext4 missing")
    (tmp_path / "tree").mkdir()
    disk = guestdisk.build_disk(tmp_path / "d.img", 16 * MiB, "gpt", "ext4", tmp_path / "tree", label="root")
    read = _reader(disk.path)
    table = read_partition_table(read, 16 * MiB)
    assert table.scheme == "gpt" and table.problems == ()
    (part,) = table.partitions
    assert (part.number, part.start, part.size) == (1, MiB, disk.size)
    assert (part.type_name, part.name) == ("Linux filesystem", "root")
    assert detect_filesystem(read, part.start, part.size) == "ext4"


@needs_sfdisk
def test_mbr_with_logical_partitions_numbered_from_five(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    _sfdisk(
        path,
        64 * MiB,
        "label: dos\nstart=2048, size=8M, type=83\nstart=18432, type=5\nsize=8M, type=7\nsize=8M, type=82\n",
    )
    table = read_partition_table(_reader(path), 64 * MiB)
    assert table.scheme == "mbr"
    assert [(p.number, p.type_name) for p in table.partitions] == [
        (1, "Linux"),
        (5, "HPFS/NTFS/exFAT"),
        (6, "Linux swap"),
    ]
    assert table.partitions[1].start > table.partitions[0].start + table.partitions[0].size


@needs_sfdisk
def test_mbr_type_7_is_told_exfat_or_ntfs_by_its_boot_sector(tmp_path: Path) -> None:
    """Type 0x07 stands for HPFS, NTFS and exFAT alike: the boot sector's OEM name decides."""
    if shutil.which("mkfs.exfat") is None or shutil.which("mkntfs") is None:
        pytest.skip("mkfs.exfat (exfatprogs) or mkntfs (ntfs-3g) missing")
    path = tmp_path / "d.img"
    _sfdisk(path, 40 * MiB, "label: dos\nstart=2048, size=16M, type=7\nsize=16M, type=7\n")
    exfat, ntfs = tmp_path / "exfat.img", tmp_path / "ntfs.img"
    for part, mkfs in ((exfat, ["mkfs.exfat", "-L", "data"]), (ntfs, ["mkntfs", "-Q", "-F", "-q"])):
        with part.open("wb") as f:
            f.truncate(16 * MiB)
        subprocess.run([*mkfs, str(part)], check=True, capture_output=True)
    with path.open("r+b") as f:
        f.seek(MiB)
        f.write(exfat.read_bytes())
        f.write(ntfs.read_bytes())
    read = _reader(path)
    table = read_partition_table(read, 40 * MiB)
    assert [(p.number, p.type, p.start) for p in table.partitions] == [
        (1, "0x07", MiB),
        (2, "0x07", 17 * MiB),
    ]
    assert [detect_filesystem(read, p.start, p.size) for p in table.partitions] == ["exfat", "ntfs"]
    assert detect_filesystem(_reader(exfat), 0, 16 * MiB) == "exfat"  # a whole disk of exFAT too
    assert read_partition_table(_reader(exfat), 16 * MiB).partitions[0].number == 0


@needs_sfdisk
def test_damaged_primary_gpt_header_is_read_from_the_backup(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    _sfdisk(path, 16 * MiB, 'label: gpt\nstart=2048, size=4M, type=L, name="a"\n')
    data = bytearray(path.read_bytes())
    data[512 + 40] ^= 0xFF  # the first usable LBA of the primary header: its CRC fails
    path.write_bytes(bytes(data))
    table = read_partition_table(_reader(path), 16 * MiB)
    assert [p.name for p in table.partitions] == ["a"]
    assert "backup header" in table.problems[0]
    data[512:1024] = bytes(512)
    data[-512:] = bytes(512)
    data[512:520] = b"EFI PART"
    path.write_bytes(bytes(data))
    with pytest.raises(PartitionTableError, match="backup header is unusable"):
        read_partition_table(_reader(path), 16 * MiB)


def test_a_whole_disk_filesystem_and_an_empty_disk(tmp_path: Path) -> None:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 missing")
    path = tmp_path / "d.img"
    with path.open("wb") as f:
        f.truncate(8 * MiB)
    assert read_partition_table(_reader(path), 8 * MiB).scheme == "none"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True, capture_output=True)
    table = read_partition_table(_reader(path), 8 * MiB)
    assert table.scheme == "none" and [(p.number, p.size) for p in table.partitions] == [(0, 8 * MiB)]


def test_mount_directories_are_unambiguous_across_hosts() -> None:
    base = make_point(vm="web01")
    other_host = dataclasses.replace(
        make_point(vm="web01", when=datetime(2026, 11, 27, tzinfo=timezone.utc)),
        vm=VmRef("web01", "uuid-2", "esxi2", "7"),
    )
    same_host_new_uuid = dataclasses.replace(
        make_point(vm="web01", when=datetime(2026, 11, 28, tzinfo=timezone.utc)),
        vm=VmRef("web01", "uuid-3", "esxi2", "9"),
    )
    db = make_point(vm="db01", when=base.snapshot_time + timedelta(hours=1))
    names = vm_directories([base, other_host, same_host_new_uuid, db])
    assert names[("db01", "esxi1", "uuid-db01")] == "db01"
    assert names[("web01", "esxi1", "uuid-web01")] == "web01@esxi1"
    assert names[("web01", "esxi2", "uuid-2")] == "web01@esxi2@uuid-2"
    assert names[("web01", "esxi2", "uuid-3")] == "web01@esxi2@uuid-3"
    tree = build_tree([base, other_host, db])
    assert tree.vms == {"web01@esxi1": [base.id], "web01@esxi2": [other_host.id], "db01": [db.id]}
    root = tree.root.children
    assert root is not None
    vm_dir = root["vms"].children
    assert vm_dir is not None
    web = vm_dir["web01@esxi1"].children
    assert web is not None and web["latest"].target == base.id
    files = web[base.id].children
    assert files is not None and sorted(files) == ["web01.img", "web01.vmx"]
    assert files["web01.img"].size == 1 << 30
