"""Writing large files past the page cache (``O_DIRECT``), where that is a gain: exported disk images
and the repository's chunk files.

Why: through the page cache every byte written is copied once more by the kernel, and on a NAS a large
restore or a full backup evicts everything else cached. Measured on the benchmark disk (bench/RESULTS.md),
an export's 2.6 GB cost 5–7.7 s of system CPU through the page cache and 1.2 s with ``O_DIRECT``.

``O_DIRECT`` wants the buffer's address, the file offset and the length aligned to the device's logical
block size: each thread copies its data into its own page-aligned buffer (:class:`AlignedBuffers`) and
writes the aligned part directly; what is left over (a short tail) goes through the page cache. Only on
local disk filesystems (:data:`DIRECT_FILESYSTEMS`): on NFS, SMB or FUSE it is a synchronous round trip
per write or emulated, and tmpfs is memory already. Imports nothing of ours.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path

DIRECT_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs"})
"""Local disk filesystems, where ``O_DIRECT`` means DMA from our buffer to the disk. Elsewhere (NFS,
SMB, FUSE, ZFS before 2.3, tmpfs) it is emulated, ignored or a synchronous round trip per write."""

DIRECT_ALIGN = 4096
"""Offsets, lengths and buffer addresses of direct writes are multiples of this: the largest logical
block size of the disks a NAS has (4Kn); 512-byte disks accept it too."""


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding ``path`` (``ext4``, ``nfs4``, ``fuse.sshfs`` …), from the
    mount table: the mount point that is the longest prefix of the resolved path."""
    target = str(path.resolve())
    found: tuple[int, str] | None = None
    try:
        with Path("/proc/self/mounts").open(encoding="utf-8", errors="surrogateescape") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].encode().decode("unicode_escape")  # \040 for a space
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and (found is None or len(point) >= found[0]):
                    found = (len(point), fields[2])
    except OSError:
        return None
    return found[1] if found else None


def direct_io_fits(path: Path) -> bool:
    """Whether files below ``path`` (a directory, or a file's path) are worth writing with ``O_DIRECT``."""
    return filesystem_type(path) in DIRECT_FILESYSTEMS


class AlignedBuffers:
    """One page-aligned buffer per thread, grown on demand; a buffer lives as long as its thread and
    this object (thread-local: a daemon's worker threads come and go, their buffers with them)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def fill(self, parts: Sequence[bytes | bytearray | memoryview]) -> memoryview:
        """``parts`` copied one after the other into this thread's buffer: a view of their bytes."""
        size = sum(memoryview(part).nbytes for part in parts)
        buf: mmap.mmap | None = getattr(self._local, "buffer", None)
        if buf is None or len(buf) < size:
            buf = mmap.mmap(-1, max(size, 1 << 20))  # anonymous: page-aligned
            self._local.buffer = buf
        view = memoryview(buf)
        pos = 0
        for part in parts:
            piece = memoryview(part).cast("B")
            view[pos : pos + piece.nbytes] = piece
            pos += piece.nbytes
        return view[:size]


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(f"pwrite wrote nothing at offset {offset}")
        offset += n
        view = view[n:]


def aligned_head(offset: int, size: int) -> int:
    """How many of ``size`` bytes at ``offset`` a direct write can take: whole blocks, from an aligned
    offset; 0 when the offset is not aligned."""
    return 0 if offset % DIRECT_ALIGN else size - size % DIRECT_ALIGN


def pwrite_direct(fd: int, view: memoryview, offset: int) -> int:
    """Write the aligned head of ``view`` (in an :class:`AlignedBuffers` buffer) at ``offset`` on ``fd``,
    which has ``O_DIRECT``; the bytes written, -1 when the filesystem refused (``EINVAL``): the caller
    writes the rest through the page cache."""
    head = aligned_head(offset, len(view))
    if head == 0:
        return 0
    try:
        return os.pwrite(fd, view[:head], offset)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return -1


def set_direct(fd: int, on: bool) -> bool:
    """Switch ``O_DIRECT`` on one descriptor; False when the filesystem refuses it."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    wanted = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, wanted)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    return True
