"""Disk indexes and digest maps (docs/repository-format.md §4.3, §4.4): compact binary, no JSON.

A :class:`DiskIndex` is 32 bytes per chunk in one ``bytearray`` (32 KiB per GiB of disk), so memory
stays small and flat; slot ``i`` covers disk bytes ``[i*chunk_size, min((i+1)*chunk_size, capacity))``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from reconciler.repository.chunks import CHUNK_SIZE, HOLE, ID_SIZE
from reconciler.repository.errors import FormatError

INDEX_MAGIC = b"ERIX"
INDEX_VERSION = 1
_INDEX_HEADER = struct.Struct("<4sHHIQQ32s")

DIGEST_MAP_MAGIC = b"ERDM"
DIGEST_MAP_VERSION = 1
_DM_HEADER = struct.Struct("<4sHBBIQQ")


def chunk_count(capacity: int, chunk_size: int) -> int:
    return -(-capacity // chunk_size)


@dataclass(eq=True)
class DiskIndex:
    """The chunk ids of one disk, in disk order; :data:`HOLE` marks an all-zero chunk."""

    capacity: int
    chunk_size: int = CHUNK_SIZE
    ids: bytearray = field(default_factory=bytearray)
    digest_map: bytes | None = None
    """Id of the disk's digest map (free-host incremental), if any."""

    def __post_init__(self) -> None:
        if self.capacity < 0 or self.chunk_size <= 0:
            raise ValueError("capacity must be >= 0 and chunk_size > 0")
        expected = self.count * ID_SIZE
        if not self.ids:
            self.ids = bytearray(expected)  # all holes
        elif len(self.ids) != expected:
            raise ValueError(f"index has {len(self.ids)} id bytes, expected {expected}")

    def __repr__(self) -> str:
        return f"DiskIndex(capacity={self.capacity}, chunk_size={self.chunk_size}, chunks={self.count})"

    @property
    def count(self) -> int:
        return chunk_count(self.capacity, self.chunk_size)

    def chunk_length(self, slot: int) -> int:
        """Bytes covered by ``slot`` (the last one may be short)."""
        if not 0 <= slot < self.count:
            raise IndexError(slot)
        return min(self.chunk_size, self.capacity - slot * self.chunk_size)

    def __getitem__(self, slot: int) -> bytes:
        if not 0 <= slot < self.count:
            raise IndexError(slot)
        return bytes(self.ids[slot * ID_SIZE : (slot + 1) * ID_SIZE])

    def __setitem__(self, slot: int, chunk_id: bytes) -> None:
        if not 0 <= slot < self.count:
            raise IndexError(slot)
        if len(chunk_id) != ID_SIZE:
            raise ValueError("chunk ids are 32 bytes")
        self.ids[slot * ID_SIZE : (slot + 1) * ID_SIZE] = chunk_id

    def __iter__(self) -> Iterator[bytes]:
        view = bytes(self.ids)
        for start in range(0, len(view), ID_SIZE):
            yield view[start : start + ID_SIZE]

    def referenced(self) -> set[bytes]:
        """Distinct stored chunk ids (holes excluded)."""
        found = set(self)
        found.discard(HOLE)
        return found

    def holes(self) -> int:
        return sum(1 for cid in self if cid == HOLE)

    def encode(self) -> bytes:
        header = _INDEX_HEADER.pack(
            INDEX_MAGIC, INDEX_VERSION, 0, self.chunk_size, self.capacity, self.count, self.digest_map or HOLE
        )
        return header + self.ids

    @classmethod
    def decode(cls, name: str, payload: bytes) -> DiskIndex:
        if len(payload) < _INDEX_HEADER.size:
            raise FormatError(f"{name}: truncated index header")
        magic, version, _, chunk_size, capacity, count, digest_map = _INDEX_HEADER.unpack_from(payload)
        if magic != INDEX_MAGIC:
            raise FormatError(f"{name}: not a disk index")
        if version != INDEX_VERSION:
            raise FormatError(f"{name}: unsupported index version {version}")
        if chunk_size <= 0 or count != chunk_count(capacity, chunk_size):
            raise FormatError(f"{name}: inconsistent index header")
        body = payload[_INDEX_HEADER.size :]
        if len(body) != count * ID_SIZE:
            raise FormatError(f"{name}: truncated index ({len(body)} of {count * ID_SIZE} id bytes)")
        return cls(capacity, chunk_size, bytearray(body), None if digest_map == HOLE else digest_map)


@dataclass(frozen=True)
class DigestMap:
    """Per-block digests of one disk as computed on the host; the algorithm is the engine's business."""

    algorithm: str
    block_size: int
    capacity: int
    digest_size: int
    digests: bytes

    def __post_init__(self) -> None:
        if not self.algorithm.isascii() or not 0 < len(self.algorithm) < 256:
            raise ValueError("algorithm must be 1-255 ASCII characters")
        if not 0 < self.digest_size < 256 or self.block_size <= 0:
            raise ValueError("invalid digest size or block size")
        if len(self.digests) != self.count * self.digest_size:
            expected = self.count * self.digest_size
            raise ValueError(f"expected {expected} digest bytes, got {len(self.digests)}")

    def __repr__(self) -> str:
        return f"DigestMap({self.algorithm}, block_size={self.block_size}, blocks={self.count})"

    @property
    def count(self) -> int:
        return chunk_count(self.capacity, self.block_size)

    def digest(self, block: int) -> bytes:
        if not 0 <= block < self.count:
            raise IndexError(block)
        return self.digests[block * self.digest_size : (block + 1) * self.digest_size]

    def encode(self) -> bytes:
        name = self.algorithm.encode("ascii")
        header = _DM_HEADER.pack(
            DIGEST_MAP_MAGIC,
            DIGEST_MAP_VERSION,
            len(name),
            self.digest_size,
            self.block_size,
            self.capacity,
            self.count,
        )
        return header + name + self.digests

    @classmethod
    def decode(cls, name: str, payload: bytes) -> DigestMap:
        if len(payload) < _DM_HEADER.size:
            raise FormatError(f"{name}: truncated digest map header")
        magic, version, name_len, digest_size, block_size, capacity, count = _DM_HEADER.unpack_from(payload)
        if magic != DIGEST_MAP_MAGIC:
            raise FormatError(f"{name}: not a digest map")
        if version != DIGEST_MAP_VERSION:
            raise FormatError(f"{name}: unsupported digest map version {version}")
        start = _DM_HEADER.size
        algorithm = payload[start : start + name_len]
        digests = payload[start + name_len :]
        if block_size <= 0 or count != chunk_count(capacity, block_size):
            raise FormatError(f"{name}: inconsistent digest map header")
        if len(algorithm) != name_len or len(digests) != count * digest_size:
            raise FormatError(f"{name}: truncated digest map")
        try:
            return cls(algorithm.decode("ascii"), block_size, capacity, digest_size, digests)
        except (UnicodeDecodeError, ValueError) as exc:
            raise FormatError(f"{name}: invalid digest map ({exc})") from None
