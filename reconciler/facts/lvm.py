"""LVM inside a restore point: which physical volume a partition is, what its volume group's metadata
says, and where each logical volume's bytes lie on the point's disks. Decided from bytes and text alone.

File-level restore never activates a guest's volume group on the host (device-mapper, and names that
clash: every Ubuntu guest has ``ubuntu-vg``). It reads the physical volume's label here
(:func:`read_pv_label`), has lvm2's ``pvck --dump metadata`` copy the volume group's text metadata out of
a plain file (no block device carries the label, so the host's udev never autoactivates it), parses
that text here (:func:`parse_volume_group`) and maps each **linear** logical volume onto the disks
(:func:`place_volume`): one piece is a loop device at an offset, several pieces (``lvextend``, a volume
spanning two disks) a composed image (:func:`pieces_in_range` says which bytes of which disk serve
which bytes of the volume). Striped, mirrored, RAID, thin, cache and snapshot volumes are listed with
the reason they are not browsed.

Pure: the caller hands a ``read(offset, size) -> bytes`` function and the metadata text.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Reader = Callable[[int, int], bytes]
SECTOR = 512

_LABEL_ID = b"LABELONE"
_LABEL_TYPE = b"LVM2 001"
_LABEL_HEADER = struct.Struct("<8sQII8s")  # id, sector, crc, offset of the pv_header, type
_DISK_LOCN = struct.Struct("<QQ")


class LvmMetadataError(ValueError):
    """The volume group's metadata text cannot be understood."""


# -- the physical volume's label -----------------------------------------------------------------


@dataclass(frozen=True)
class PvLabel:
    """The label lvm2 writes in one of the first four sectors of a physical volume."""

    uuid: str
    """As lvm2 prints it: ``OqBH1W-CkXO-oqMS-fRja-Iy2c-MaTZ-jipopa``."""
    device_size: int
    data_offset: int
    """Bytes from the start of the volume to the first extent (``pe_start``)."""
    metadata_areas: tuple[tuple[int, int], ...]
    """(offset, size) of each metadata area, in bytes from the start of the volume."""

    @property
    def head_size(self) -> int:
        """The bytes ``pvck`` needs to read the label and the first metadata area."""
        first = self.metadata_areas[0] if self.metadata_areas else (0, 0)
        return max(4 * SECTOR, first[0] + first[1])


def format_uuid(raw: str) -> str:
    """lvm2's 32 characters with its dashes: 6-4-4-4-4-4-6."""
    cuts = (6, 4, 4, 4, 4, 4, 6)
    parts, at = [], 0
    for cut in cuts:
        parts.append(raw[at : at + cut])
        at += cut
    return "-".join(parts)


def read_pv_label(read: Reader, start: int) -> PvLabel | None:
    """The physical volume label of the partition (or whole disk) at ``start``; ``None`` when none."""
    head = read(start, 4 * SECTOR)
    for sector in range(4):
        raw = head[sector * SECTOR : (sector + 1) * SECTOR]
        if len(raw) < SECTOR or raw[:8] != _LABEL_ID or raw[24:32] != _LABEL_TYPE:
            continue
        _, _, _, header_at, _ = _LABEL_HEADER.unpack_from(raw)
        if not _LABEL_HEADER.size <= header_at <= SECTOR - 40 - 2 * _DISK_LOCN.size:
            return None
        uuid_raw = raw[header_at : header_at + 32]
        (device_size,) = struct.unpack_from("<Q", raw, header_at + 32)
        lists: list[list[tuple[int, int]]] = [[], []]  # data areas, then metadata areas
        at, which = header_at + 40, 0
        while which < 2 and at + _DISK_LOCN.size <= SECTOR:
            offset, size = _DISK_LOCN.unpack_from(raw, at)
            at += _DISK_LOCN.size
            if offset == 0:
                which += 1  # a zero entry ends each list
                continue
            lists[which].append((offset, size))
        if not lists[0]:
            return None
        try:
            uuid = uuid_raw.decode("ascii")
        except UnicodeDecodeError:
            return None
        return PvLabel(format_uuid(uuid), device_size, lists[0][0][0], tuple(lists[1]))
    return None


# -- the metadata text ---------------------------------------------------------------------------

Value = str | int | float | list["Value"] | dict[str, "Value"]

_TOKEN = re.compile(
    r"""\s+|\#[^\n]*
    |(?P<string>"(?:[^"\\]|\\.)*")
    |(?P<number>-?\d+(?:\.\d+)?(?![\w.+-]))
    |(?P<name>[A-Za-z0-9_.+\-/]+)
    |(?P<punct>[{}\[\]=,])""",
    re.VERBOSE,
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out = []
    at = 0
    while at < len(text):
        match = _TOKEN.match(text, at)
        if match is None:
            raise LvmMetadataError(f"unexpected {text[at : at + 20]!r} at character {at}")
        at = match.end()
        if match.lastgroup is not None:
            out.append((match.lastgroup, match.group(match.lastgroup)))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.position = 0

    def take(self) -> tuple[str, str]:
        if self.position >= len(self.tokens):
            raise LvmMetadataError("the metadata ends in the middle of a section")
        self.position += 1
        return self.tokens[self.position - 1]

    def value(self) -> Value:
        kind, word = self.take()
        if kind == "string":
            return re.sub(r"\\(.)", r"\1", word[1:-1])
        if kind == "number":
            return float(word) if "." in word else int(word)
        if word != "[":
            raise LvmMetadataError(f"expected a value, found {word!r}")
        items: list[Value] = []
        if self.tokens[self.position : self.position + 1] == [("punct", "]")]:
            self.take()
            return items
        while True:
            items.append(self.value())
            _, word = self.take()
            if word == "]":
                return items
            if word != ",":
                raise LvmMetadataError(f"expected ',' or ']' in a list, found {word!r}")

    def section(self, closing: bool) -> dict[str, Value]:
        out: dict[str, Value] = {}
        while self.position < len(self.tokens):
            kind, word = self.take()
            if word == "}" and closing:
                return out
            if kind not in ("name", "number"):
                raise LvmMetadataError(f"expected a name, found {word!r}")
            _, after = self.take()
            if after == "{":
                out[word] = self.section(True)
            elif after == "=":
                out[word] = self.value()
            else:
                raise LvmMetadataError(f"expected '=' or '{{' after {word!r}, found {after!r}")
        if closing:
            raise LvmMetadataError("the metadata ends in the middle of a section")
        return out


def parse_config(text: str) -> dict[str, Value]:
    """lvm2's configuration syntax (metadata and ``lvm.conf``): ``name { key = value ... }``, values
    strings, numbers or ``[ lists ]``, ``#`` comments."""
    return _Parser(text).section(False)


# -- the volume group ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PhysicalVolume:
    key: str
    """``pv0``: how the metadata's segments name it."""
    uuid: str
    device: str
    """Where the guest last saw it (``/dev/sdb1``): a hint for people, not used to find it."""
    pe_start: int
    """Bytes from the start of the volume to its first extent."""
    pe_count: int


@dataclass(frozen=True)
class Segment:
    start_extent: int
    extent_count: int
    type: str
    """As the metadata says: ``striped`` (linear when one stripe), ``raid1``, ``thin``, ``snapshot`` …"""
    stripes: tuple[tuple[str, int], ...] = ()
    """(physical volume key, first extent) of each stripe."""

    @property
    def linear(self) -> bool:
        return self.type == "striped" and len(self.stripes) == 1


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    visible: bool
    segments: tuple[Segment, ...]
    status: tuple[str, ...] = ()


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    uuid: str
    seqno: int
    extent_size: int
    """Bytes."""
    physical_volumes: tuple[PhysicalVolume, ...]
    logical_volumes: tuple[LogicalVolume, ...]
    snapshot_stores: Mapping[str, str]
    """Copy-on-write store → the volume it is an old-style snapshot of."""


def _section(parent: Mapping[str, Value], key: str) -> dict[str, Value]:
    found = parent.get(key, {})
    if not isinstance(found, dict):
        raise LvmMetadataError(f"{key!r} is not a section")
    return found


def _int(section: Mapping[str, Value], key: str, where: str) -> int:
    found = section.get(key)
    if not isinstance(found, int):
        raise LvmMetadataError(f"{where}: {key} is missing or not a number")
    return found


def _str(section: Mapping[str, Value], key: str, default: str = "") -> str:
    found = section.get(key, default)
    return found if isinstance(found, str) else default


def parse_volume_group(text: str) -> VolumeGroup:
    """The volume group described by one metadata text (``pvck --dump metadata``, a ``vgcfgbackup``)."""
    top = parse_config(text)
    groups = [(name, body) for name, body in top.items() if isinstance(body, dict)]
    if len(groups) != 1:
        raise LvmMetadataError(f"expected one volume group in the metadata, found {len(groups)}")
    name, vg = groups[0]
    extent_size = _int(vg, "extent_size", name) * SECTOR
    if extent_size <= 0:
        raise LvmMetadataError(f"{name}: extent_size must be positive")
    pvs = []
    for key, body in _section(vg, "physical_volumes").items():
        if not isinstance(body, dict):
            continue
        pvs.append(
            PhysicalVolume(
                key,
                _str(body, "id"),
                _str(body, "device"),
                _int(body, "pe_start", f"{name}/{key}") * SECTOR,
                _int(body, "pe_count", f"{name}/{key}"),
            )
        )
    lvs = []
    stores: dict[str, str] = {}
    for lv_name, body in _section(vg, "logical_volumes").items():
        if not isinstance(body, dict):
            continue
        status = body.get("status", [])
        status_names = tuple(s for s in status if isinstance(s, str)) if isinstance(status, list) else ()
        segments = []
        for seg_key, seg in body.items():
            if not (seg_key.startswith("segment") and isinstance(seg, dict)):
                continue
            where = f"{name}/{lv_name}/{seg_key}"
            raw_stripes = seg.get("stripes", [])
            stripes: list[tuple[str, int]] = []
            if isinstance(raw_stripes, list):
                for pv_key, first in zip(raw_stripes[::2], raw_stripes[1::2], strict=False):
                    if not isinstance(pv_key, str) or not isinstance(first, int):
                        raise LvmMetadataError(f"{where}: stripes must be (volume, extent) pairs")
                    stripes.append((pv_key, first))
            kind = _str(seg, "type")
            if kind == "snapshot":
                stores[_str(seg, "cow_store")] = _str(seg, "origin")
            segments.append(
                Segment(
                    _int(seg, "start_extent", where), _int(seg, "extent_count", where), kind, tuple(stripes)
                )
            )
        segments.sort(key=lambda s: s.start_extent)
        lvs.append(LogicalVolume(lv_name, "VISIBLE" in status_names, tuple(segments), status_names))
    return VolumeGroup(
        name,
        _str(vg, "id"),
        _int(vg, "seqno", name),
        extent_size,
        tuple(pvs),
        tuple(lvs),
        stores,
    )


# -- where a logical volume's bytes are ----------------------------------------------------------


def volume_file_name(vg: str, lv: str) -> str:
    """One path component for a volume, as ``/dev/mapper`` names it: ``ubuntu--vg-root`` (hyphens in
    either name doubled, the two joined by one), unambiguous and familiar from ``df``."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


@dataclass(frozen=True)
class Piece:
    """A run of a volume's bytes: ``length`` bytes at ``offset`` of the disk ``disk``."""

    disk: str
    offset: int
    length: int


@dataclass(frozen=True)
class PvLocation:
    """Where a physical volume is in the point: the disk's name and the partition's start."""

    disk: str
    start: int
    size: int


@dataclass(frozen=True)
class PlacedVolume:
    vg: str
    lv: str
    size: int
    pieces: tuple[Piece, ...]
    """In the volume's order; empty when ``problem`` says why it cannot be read."""
    problem: str | None = None

    @property
    def name(self) -> str:
        return volume_file_name(self.vg, self.lv)


_KINDS = {
    "raid1": "a mirrored (RAID1) volume",
    "mirror": "a mirrored volume",
    "raid0": "a striped (RAID0) volume",
    "raid0_meta": "a striped (RAID0) volume",
    "raid4": "a RAID4 volume",
    "raid5": "a RAID5 volume",
    "raid6": "a RAID6 volume",
    "raid10": "a RAID10 volume",
    "thin": "a thin volume",
    "thin-pool": "a thin pool",
    "cache": "a cached volume",
    "cache-pool": "a cache pool",
    "writecache": "a cached (writecache) volume",
    "vdo": "a VDO volume",
    "vdo-pool": "a VDO pool",
    "integrity": "a volume with dm-integrity",
    "error": "an error target",
    "zero": "a zero target",
    "snapshot": "a snapshot",
}


def place_volume(vg: VolumeGroup, lv: LogicalVolume, found: Mapping[str, PvLocation]) -> PlacedVolume:
    """Where the bytes of ``lv`` lie on the point's disks, given where each physical volume (by uuid) was
    found; or why it cannot be read there."""
    size = sum(s.extent_count for s in lv.segments) * vg.extent_size

    def refused(problem: str) -> PlacedVolume:
        return PlacedVolume(vg.name, lv.name, size, (), problem)

    if lv.name in vg.snapshot_stores:
        origin = vg.snapshot_stores[lv.name]
        return refused(f"old-style snapshot of {origin} (a copy-on-write store): not browsed; {origin} is")
    if not lv.segments:
        return refused("no segments in the metadata")
    pvs = {pv.key: pv for pv in vg.physical_volumes}
    pieces: list[Piece] = []
    expected = 0
    for segment in lv.segments:
        if not segment.linear:
            if segment.type == "striped":
                kind = f"a volume striped over {len(segment.stripes)} physical volumes"
            else:
                kind = _KINDS.get(segment.type, f"a volume of type {segment.type}")
            return refused(f"{kind}: only linear volumes are browsed")
        if segment.start_extent != expected:
            return refused(f"its segments leave a gap at extent {expected}")
        expected += segment.extent_count
        pv_key, first = segment.stripes[0]
        pv = pvs.get(pv_key)
        if pv is None:
            return refused(f"its metadata names an unknown physical volume {pv_key!r}")
        location = found.get(pv.uuid)
        if location is None:
            hint = f" (the guest's {pv.device})" if pv.device else ""
            return refused(f"physical volume {pv.uuid}{hint} is not in this restore point")
        offset = location.start + pv.pe_start + first * vg.extent_size
        length = segment.extent_count * vg.extent_size
        if offset + length > location.start + location.size:
            return refused(f"its extents run past the end of physical volume {pv.uuid}")
        if pieces and pieces[-1].disk == location.disk and pieces[-1].offset + pieces[-1].length == offset:
            pieces[-1] = Piece(location.disk, pieces[-1].offset, pieces[-1].length + length)
        else:
            pieces.append(Piece(location.disk, offset, length))
    return PlacedVolume(vg.name, lv.name, size, tuple(pieces))


def pieces_in_range(pieces: tuple[Piece, ...], offset: int, size: int) -> list[Piece]:
    """The disk reads that serve ``size`` bytes of a volume from ``offset`` (clipped at its end)."""
    out = []
    at = 0
    end = offset + size
    for piece in pieces:
        piece_end = at + piece.length
        if piece_end > offset and at < end:
            skip = max(offset - at, 0)
            take = min(piece_end, end) - (at + skip)
            out.append(Piece(piece.disk, piece.offset + skip, take))
        if piece_end >= end:
            break
        at = piece_end
    return out


def volume_reader(pieces: tuple[Piece, ...], read_disk: Callable[[str, int, int], bytes]) -> Reader:
    """``read(offset, size)`` over a volume, given ``read_disk(disk, offset, size)``."""

    def read(offset: int, size: int) -> bytes:
        return b"".join(read_disk(p.disk, p.offset, p.length) for p in pieces_in_range(pieces, offset, size))

    return read
