"""What is on a disk: its partition table (MBR with logical partitions, GPT) and the kind of filesystem
at the start of each partition, decided from bytes alone.

Pure: the caller hands a ``read(offset, size) -> bytes`` function (a restore point's disk through
:class:`reconciler.repository.reader.DiskReader`, a file in tests), so the same code reads a disk in the
repository, an image made by ``sfdisk`` in the unit tests, or anything else, and never touches a device.

File-level restore uses it to find what to mount (``esxi-reconciler files``); the kernel is only handed
partitions whose filesystem was recognised, always read-only.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Callable
from dataclasses import dataclass

Reader = Callable[[int, int], bytes]
"""``read(offset, size)``: up to ``size`` bytes of the disk at ``offset``."""

SECTOR = 512

_GPT_SIGNATURE = b"EFI PART"
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
_MBR_ENTRY = struct.Struct("<B3sB3sII")
_MAX_GPT_ENTRIES = 1024
_MAX_LOGICAL = 128

GPT_TYPES = {
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
    "933AC7E1-2EB4-4F13-B844-0E14E2AEF915": "Linux home",
    "BC13C2FF-59E6-4262-A352-B275FD6F7172": "Linux extended boot",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
    "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery environment",
    "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3": "Windows LDM metadata",
    "AF9B60A0-1431-4F62-BC68-3311714A69AD": "Windows LDM data",
}
MBR_TYPES = {
    0x01: "FAT12",
    0x04: "FAT16 <32M",
    0x05: "Extended",
    0x06: "FAT16",
    0x07: "HPFS/NTFS/exFAT",
    0x0B: "W95 FAT32",
    0x0C: "W95 FAT32 (LBA)",
    0x0E: "W95 FAT16 (LBA)",
    0x0F: "W95 Extended (LBA)",
    0x11: "Hidden FAT12",
    0x12: "Compaq diagnostics",
    0x14: "Hidden FAT16 <32M",
    0x16: "Hidden FAT16",
    0x17: "Hidden HPFS/NTFS",
    0x1B: "Hidden W95 FAT32",
    0x1C: "Hidden W95 FAT32 (LBA)",
    0x1E: "Hidden W95 FAT16 (LBA)",
    0x27: "Hidden NTFS WinRE",
    0x42: "Windows dynamic disk",
    0x82: "Linux swap",
    0x83: "Linux",
    0x85: "Linux extended",
    0x8E: "Linux LVM",
    0xA5: "FreeBSD",
    0xEE: "GPT",
    0xEF: "EFI (FAT-12/16/32)",
    0xFD: "Linux raid autodetect",
}
_EXTENDED = {0x05, 0x0F, 0x85}
_PROTECTIVE = 0xEE


class PartitionTableError(ValueError):
    """The partition table is damaged in a way that leaves nothing trustworthy to read."""


@dataclass(frozen=True)
class Partition:
    """One partition, numbered as Linux numbers them (``sda1``; MBR logical partitions from 5).
    Number 0 is a whole disk without a partition table that holds a filesystem."""

    number: int
    start: int
    """Bytes from the start of the disk."""
    size: int
    """Bytes."""
    type: str
    """GPT: the type GUID; MBR: ``0x83``; whole disk: ``""``."""
    type_name: str
    name: str = ""
    """GPT partition name (``PARTLABEL``)."""
    uuid: str = ""
    """GPT unique partition GUID (``PARTUUID``)."""


@dataclass(frozen=True)
class PartitionTable:
    scheme: str
    """``gpt``, ``mbr`` or ``none`` (a filesystem on the whole disk, or nothing recognised)."""
    partitions: tuple[Partition, ...]
    sector_size: int = SECTOR
    problems: tuple[str, ...] = ()
    """What was damaged but got around (a GPT header that fails its CRC, read from the backup)."""


def _guid(raw: bytes) -> str:
    """A GUID as text: the first three fields are little-endian on disk."""
    a, b, c = struct.unpack_from("<IHH", raw)
    rest = raw[8:].hex().upper()
    return f"{a:08X}-{b:04X}-{c:04X}-{rest[:4]}-{rest[4:]}"


def _read_exact(read: Reader, offset: int, size: int) -> bytes:
    data = read(offset, size)
    return data if len(data) == size else data + bytes(size - len(data))


# -- GPT -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GptHeader:
    my_lba: int
    alternate_lba: int
    first_usable: int
    last_usable: int
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc: int


def _gpt_header(sector: bytes) -> _GptHeader | str:
    """The header in ``sector``, or why it is not a valid one."""
    if sector[:8] != _GPT_SIGNATURE:
        return "no GPT signature"
    fields = _GPT_HEADER.unpack_from(sector)
    _, _, header_size, header_crc, _, my_lba, alt_lba, first, last, _, entries_lba, count, esize, ecrc = (
        fields
    )
    if not 92 <= header_size <= len(sector):
        return f"GPT header size {header_size} is invalid"
    check = bytearray(sector[:header_size])
    check[16:20] = bytes(4)
    if binascii.crc32(check) != header_crc:
        return "GPT header CRC mismatch"
    if esize < 128 or esize % 8 or not 0 < count <= _MAX_GPT_ENTRIES:
        return f"GPT entry array of {count} × {esize} bytes is invalid"
    return _GptHeader(my_lba, alt_lba, first, last, entries_lba, count, esize, ecrc)


def _gpt_partitions(read: Reader, header: _GptHeader, sector_size: int, capacity: int) -> list[Partition]:
    array = _read_exact(read, header.entries_lba * sector_size, header.entry_count * header.entry_size)
    if binascii.crc32(array) != header.entries_crc:
        raise PartitionTableError("GPT partition entries fail their CRC")
    found = []
    for number in range(header.entry_count):
        entry = array[number * header.entry_size : number * header.entry_size + _GPT_ENTRY.size]
        type_raw, unique, first, last, _attrs, name_raw = _GPT_ENTRY.unpack(entry)
        if type_raw == bytes(16):
            continue
        if last < first:
            continue
        start, size = first * sector_size, (last - first + 1) * sector_size
        if start >= capacity:
            continue
        type_guid = _guid(type_raw)
        name = name_raw.decode("utf-16-le", "replace").split("\x00", 1)[0]
        found.append(
            Partition(
                number + 1,
                start,
                min(size, capacity - start),
                type_guid,
                GPT_TYPES.get(type_guid, "unknown"),
                name,
                _guid(unique),
            )
        )
    return found


def _read_gpt(read: Reader, capacity: int) -> PartitionTable | None:
    """The GPT of the disk (512-byte or 4 KiB sectors), from the backup header when the primary is
    damaged; ``None`` when neither header is there."""
    for sector_size in (SECTOR, 4096):
        if capacity < 3 * sector_size:
            continue
        primary = _gpt_header(_read_exact(read, sector_size, sector_size))
        if isinstance(primary, _GptHeader):
            return PartitionTable(
                "gpt", tuple(_gpt_partitions(read, primary, sector_size, capacity)), sector_size
            )
        last_lba = capacity // sector_size - 1
        backup = _gpt_header(_read_exact(read, last_lba * sector_size, sector_size))
        if isinstance(backup, _GptHeader):
            parts = _gpt_partitions(read, backup, sector_size, capacity)
            problem = f"primary GPT header: {primary}; read the backup header at the end of the disk"
            return PartitionTable("gpt", tuple(parts), sector_size, (problem,))
        if primary != "no GPT signature":
            raise PartitionTableError(f"{primary}, and the backup header is unusable too ({backup})")
    return None


# -- MBR -----------------------------------------------------------------------------------------


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int]]:
    """(type, first LBA, sectors) of the four entries of an MBR or EBR, empty ones left out."""
    out = []
    for i in range(4):
        _status, _chs, ptype, _chs_end, first, count = _MBR_ENTRY.unpack_from(sector, 446 + 16 * i)
        if ptype and count:
            out.append((ptype, first, count))
    return out


def _mbr_partition(number: int, ptype: int, first: int, count: int, capacity: int) -> Partition | None:
    start, size = first * SECTOR, count * SECTOR
    if start >= capacity or first == 0:
        return None
    return Partition(
        number, start, min(size, capacity - start), f"0x{ptype:02x}", MBR_TYPES.get(ptype, "unknown")
    )


def _read_mbr(read: Reader, mbr: bytes, capacity: int) -> PartitionTable:
    partitions: list[Partition] = []
    problems: list[str] = []
    extended: tuple[int, int] | None = None
    for number, (ptype, first, count) in enumerate(_mbr_entries(mbr), start=1):
        if ptype in _EXTENDED:
            extended = (first, count)
            continue
        found = _mbr_partition(number, ptype, first, count, capacity)
        if found is not None:
            partitions.append(found)
    if extended is not None:
        base = extended[0]
        ebr_lba = base
        number = 5
        seen: set[int] = set()
        while ebr_lba and ebr_lba not in seen and len(seen) < _MAX_LOGICAL:
            seen.add(ebr_lba)
            ebr = _read_exact(read, ebr_lba * SECTOR, SECTOR)
            if ebr[510:512] != b"\x55\xaa":
                problems.append(
                    f"extended partition: no boot record at sector {ebr_lba}; logical partitions end"
                )
                break
            entries = _mbr_entries(ebr)
            next_lba = 0
            for ptype, first, count in entries:
                if ptype in _EXTENDED:
                    next_lba = base + first
                else:
                    found = _mbr_partition(number, ptype, ebr_lba + first, count, capacity)
                    if found is not None:
                        partitions.append(found)
                        number += 1
            ebr_lba = next_lba
    return PartitionTable("mbr", tuple(sorted(partitions, key=lambda p: p.number)), SECTOR, tuple(problems))


# -- the whole disk ------------------------------------------------------------------------------


def read_partition_table(read: Reader, capacity: int) -> PartitionTable:
    """The disk's partitions. A disk whose first sector is a filesystem's (no partition table) gives one
    partition numbered 0 covering the disk; an empty or unknown disk gives scheme ``none`` and none."""
    first = _read_exact(read, 0, SECTOR)
    whole = detect_filesystem(read, 0, capacity)
    if whole is not None:
        return PartitionTable("none", (Partition(0, 0, capacity, "", "whole disk"),))
    if first[510:512] != b"\x55\xaa":
        gpt = _read_gpt(read, capacity)  # a GPT without protective MBR still counts
        return gpt if gpt is not None else PartitionTable("none", ())
    entries = _mbr_entries(first)
    if any(ptype == _PROTECTIVE for ptype, _, _ in entries):
        gpt = _read_gpt(read, capacity)
        if gpt is not None:
            return gpt
        raise PartitionTableError("protective MBR but no GPT header (neither primary nor backup)")
    return _read_mbr(read, first, capacity)


def detect_filesystem(read: Reader, offset: int, size: int) -> str | None:
    """The kind of what starts at ``offset`` (``ext4``, ``ext3``, ``ext2``, ``xfs``, ``btrfs``, ``ntfs``,
    ``exfat``, ``vfat``, ``LVM2_member``, ``swap``), by its magic numbers, as blkid names them; ``None``
    when nothing known is there."""
    head = _read_exact(read, offset, 4096) if size >= 4096 else _read_exact(read, offset, max(size, 0))
    if len(head) < 512:
        return None
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[3:11] == b"EXFAT   ":
        return "exfat"
    if head[:4] == b"XFSB":
        return "xfs"
    for sector in range(4):
        label = head[sector * SECTOR : sector * SECTOR + 32]
        if label[:8] == b"LABELONE" and label[24:32] == b"LVM2 001":
            return "LVM2_member"
    if head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap"
    if len(head) >= 0x400 + 0x68:
        superblock = head[0x400:]
        if superblock[0x38:0x3A] == b"\x53\xef":
            compat, incompat = struct.unpack_from("<II", superblock, 0x5C)
            if incompat & 0x40 or incompat & 0x80 or incompat & 0x200:  # extents, 64bit, flex_bg
                return "ext4"
            return "ext3" if compat & 0x4 else "ext2"
    if size >= 0x10040 + 8 and _read_exact(read, offset + 0x10040, 8) == b"_BHRfS_M":
        return "btrfs"
    if head[510:512] == b"\x55\xaa" and head[0] in (0xEB, 0xE9):
        bytes_per_sector = struct.unpack_from("<H", head, 11)[0]
        labelled = head[0x36:0x39] == b"FAT" or head[0x52:0x57] == b"FAT32"
        if bytes_per_sector in (512, 1024, 2048, 4096) and head[13] and labelled:
            return "vfat"
    return None
