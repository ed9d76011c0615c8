"""The streamOptimized VMDK: one file, deflate-compressed grains, written front to back (VMware "Virtual
Disk Format 5.0", §"Stream-Optimized Compressed Sparse Extents"); what OVF/OVA packages and NFC use.

Layout written here (sectors of 512 bytes):

* sector 0: the sparse header (``KDMV``, version 3, flags: valid newline test, compressed grains, markers;
  ``gdOffset = GD_AT_END``), then the embedded descriptor (``createType="streamOptimized"``, one
  ``SPARSE`` extent naming the file itself), padded up to the first grain boundary;
* per grain that is not all zero (64 KiB = 128 sectors): a grain marker (``lba`` in sectors, ``size``
  of the compressed data) followed by the zlib stream of the *full* grain (readers such as qemu insist
  on full grains), padded to a sector;
* per grain table (512 grains = 32 MiB) with at least one grain: a GT marker sector, then the table
  (sector offsets of the grain markers; 0 = zero grain); empty tables are left out (GD entry 0);
* a GD marker, the grain directory (sector offsets of the tables), a footer marker, a copy of the
  header with the real ``gdOffset`` (readers look for it 1024 bytes before the end), and the
  end-of-stream marker.

:func:`read` walks a file the way a reader does (footer → directory → tables → grains), so an export
is verified through the structure, not only by what was written.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from reconciler.esxi.vmdk import SECTOR, Descriptor

MAGIC = 0x564D444B  # "KDMV" little-endian
VERSION = 3
FLAG_NEWLINE_TEST = 1 << 0
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
GD_AT_END = 0xFFFFFFFFFFFFFFFF
GRAIN_SECTORS = 128
GRAIN_SIZE = GRAIN_SECTORS * SECTOR
GTES_PER_GT = 512
COMPRESSION_DEFLATE = 1
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
DESCRIPTOR_SECTORS = 20

_HEADER = struct.Struct("<IIIQQQQIQQQBccccH433x")
_MARKER = struct.Struct("<QII496x")
_GRAIN_MARKER = struct.Struct("<QI")
assert _HEADER.size == SECTOR and _MARKER.size == SECTOR


class StreamVmdkError(Exception):
    """Not a (valid) streamOptimized VMDK."""


@dataclass(frozen=True)
class Header:
    capacity: int
    """In sectors."""
    grain_sectors: int
    descriptor_offset: int
    descriptor_sectors: int
    gd_offset: int
    overhead: int
    flags: int

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            VERSION,
            self.flags,
            self.capacity,
            self.grain_sectors,
            self.descriptor_offset,
            self.descriptor_sectors,
            GTES_PER_GT,
            0,
            self.gd_offset,
            self.overhead,
            0,
            b"\n",
            b" ",
            b"\r",
            b"\n",
            COMPRESSION_DEFLATE,
        )

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        fields = _HEADER.unpack(data[:SECTOR])
        magic, version, flags, capacity, grain, desc_off, desc_sectors, gtes, _, gd, overhead = fields[:11]
        if magic != MAGIC:
            raise StreamVmdkError("no KDMV magic: not a sparse VMDK")
        if version != VERSION or not flags & FLAG_COMPRESSED or not flags & FLAG_MARKERS:
            raise StreamVmdkError(f"not streamOptimized (version {version}, flags {flags:#x})")
        if gtes != GTES_PER_GT or grain <= 0 or fields[16] != COMPRESSION_DEFLATE:
            raise StreamVmdkError("unsupported grain table size, grain size or compression")
        return cls(capacity, grain, desc_off, desc_sectors, gd, overhead, flags)


def _pad(f: BinaryIO) -> None:
    rest = f.tell() % SECTOR
    if rest:
        f.write(bytes(SECTOR - rest))


def write(
    f: BinaryIO, capacity: int, pieces: Iterable[tuple[int, bytes]], descriptor: Descriptor, *, level: int = 6
) -> None:
    """Write a disk of ``capacity`` bytes whose non-zero data are ``pieces`` (ascending ``(offset,
    bytes)``, anything else zero) as a streamOptimized VMDK to ``f`` (positioned at 0)."""
    if capacity % SECTOR:
        raise ValueError(f"capacity {capacity} is not a multiple of {SECTOR}")
    text = descriptor.dumps().encode("utf-8")
    desc_sectors = max(DESCRIPTOR_SECTORS, -(-len(text) // SECTOR))
    overhead = -(-(1 + desc_sectors) // GRAIN_SECTORS) * GRAIN_SECTORS
    flags = FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS
    head = Header(capacity // SECTOR, GRAIN_SECTORS, 1, desc_sectors, GD_AT_END, overhead, flags)
    f.write(head.pack())
    f.write(text + bytes(desc_sectors * SECTOR - len(text)))
    f.write(bytes(overhead * SECTOR - f.tell()))
    grains = -(-capacity // GRAIN_SIZE)
    tables = [[0] * GTES_PER_GT for _ in range(-(-grains // GTES_PER_GT))]
    for grain, data in _grains(pieces, capacity):
        if data.count(0) == len(data):
            continue
        body = zlib.compress(data.ljust(GRAIN_SIZE, b"\0"), level)
        tables[grain // GTES_PER_GT][grain % GTES_PER_GT] = f.tell() // SECTOR
        f.write(_GRAIN_MARKER.pack(grain * GRAIN_SECTORS, len(body)) + body)
        _pad(f)
    directory = []
    gt_sectors = GTES_PER_GT * 4 // SECTOR
    for table in tables:
        if not any(table):
            directory.append(0)
            continue
        f.write(_MARKER.pack(gt_sectors, 0, MARKER_GT))
        directory.append(f.tell() // SECTOR)
        f.write(struct.pack(f"<{GTES_PER_GT}I", *table))
    gd = struct.pack(f"<{len(directory)}I", *directory)
    gd_sectors = -(-len(gd) // SECTOR)
    f.write(_MARKER.pack(gd_sectors, 0, MARKER_GD))
    gd_offset = f.tell() // SECTOR
    f.write(gd)
    _pad(f)
    f.write(_MARKER.pack(1, 0, MARKER_FOOTER))
    foot = Header(capacity // SECTOR, GRAIN_SECTORS, 1, desc_sectors, gd_offset, overhead, flags)
    f.write(foot.pack())
    f.write(_MARKER.pack(0, 0, MARKER_EOS))


def _grains(pieces: Iterable[tuple[int, bytes]], capacity: int) -> Iterator[tuple[int, bytes]]:
    """Regroup ascending pieces into (grain number, grain bytes) for the grains they touch."""
    current = -1
    buf = bytearray()
    for off, data in pieces:
        pos = 0
        while pos < len(data):
            at = off + pos
            grain = at // GRAIN_SIZE
            if grain != current:
                if current >= 0:
                    yield current, bytes(buf)
                current = grain
                buf = bytearray(min(GRAIN_SIZE, capacity - grain * GRAIN_SIZE))
            start = at - grain * GRAIN_SIZE
            n = min(len(data) - pos, GRAIN_SIZE - start)
            buf[start : start + n] = data[pos : pos + n]
            pos += n
    if current >= 0:
        yield current, bytes(buf)


def read(f: BinaryIO) -> tuple[Descriptor, int, Iterator[tuple[int, bytes]]]:
    """Open a streamOptimized VMDK: its embedded descriptor, its capacity in bytes, and its non-zero
    grains as ascending ``(offset, bytes)`` found through the footer's grain directory."""
    f.seek(0)
    head = Header.unpack(f.read(SECTOR))
    f.seek(-3 * SECTOR, 2)
    marker = _MARKER.unpack(f.read(SECTOR))
    if marker[2] != MARKER_FOOTER:
        raise StreamVmdkError("no footer marker before the end-of-stream marker")
    foot = Header.unpack(f.read(SECTOR))
    if foot.gd_offset == GD_AT_END or foot.capacity != head.capacity:
        raise StreamVmdkError("footer without a grain directory or with another capacity")
    f.seek(head.descriptor_offset * SECTOR)
    raw = f.read(head.descriptor_sectors * SECTOR).split(b"\0", 1)[0]
    descriptor = Descriptor.parse(raw.decode("utf-8"))
    capacity = head.capacity * SECTOR
    grain_size = head.grain_sectors * SECTOR
    grains = -(-capacity // grain_size)
    tables = -(-grains // GTES_PER_GT)
    f.seek(foot.gd_offset * SECTOR)
    directory = struct.unpack(f"<{tables}I", f.read(tables * 4))

    def data() -> Iterator[tuple[int, bytes]]:
        for t, gt_offset in enumerate(directory):
            if not gt_offset:
                continue
            f.seek(gt_offset * SECTOR)
            for i, sector in enumerate(struct.unpack(f"<{GTES_PER_GT}I", f.read(GTES_PER_GT * 4))):
                grain = t * GTES_PER_GT + i
                if not sector or grain >= grains:
                    continue
                f.seek(sector * SECTOR)
                lba, size = _GRAIN_MARKER.unpack(f.read(_GRAIN_MARKER.size))
                if lba != grain * head.grain_sectors:
                    raise StreamVmdkError(f"grain {grain}: marker says sector {lba}")
                body = zlib.decompress(f.read(size))
                if len(body) != grain_size:
                    raise StreamVmdkError(f"grain {grain}: {len(body)} bytes after inflating")
                offset = grain * grain_size
                yield offset, body[: min(grain_size, capacity - offset)]

    return descriptor, capacity, data()
