"""Chunk assembly: ordered pieces of one disk become whole 1 MiB chunks, patched from the previous point.

Incrementals *patch* the previous point: the :class:`ChunkWriter` starts from the previous index
(unchanged chunks keep their ids) and a chunk touched by a small change is rebuilt from the previous
chunk's content, read back from the repository, plus the new bytes. Only changed bytes cross the network.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterable

from reconciler.operations.backup.context import BackupError, Cancelled
from reconciler.repository import HOLE, ChunkWrite, ChunkWriter, DiskIndex, Repository

IN_FLIGHT_PER_DISK = 8
"""Assembled chunks (1 MiB each) waiting for or in the encode pool, per disk."""


class ChunkAssembler:
    """Turns ordered ``(offset, data)`` pieces of one disk into whole chunks for a :class:`ChunkWriter`.

    Bytes of a touched chunk that no piece covers come from ``base`` (the previous point's chunk read
    back from the repository) or are zeros when there is no base. Chunks are encoded and stored in
    ``pool``; at most ``in_flight`` wait at once, so memory is bounded.
    """

    def __init__(
        self,
        repo: Repository,
        writer: ChunkWriter,
        base: DiskIndex | None,
        pool: concurrent.futures.Executor,
        *,
        cancel: threading.Event | None = None,
        in_flight: int = IN_FLIGHT_PER_DISK,
    ) -> None:
        self.repo = repo
        self.writer = writer
        self.base = base
        self.pool = pool
        self.cancel = cancel
        self.chunk_size = writer.index.chunk_size
        self.capacity = writer.index.capacity
        self._slots = threading.BoundedSemaphore(in_flight)
        self._futures: set[concurrent.futures.Future[ChunkWrite]] = set()
        self._futures_lock = threading.Lock()
        self._error: BaseException | None = None
        self._slot = -1
        self._buf: bytearray | None = None
        self._covered: list[tuple[int, int]] = []
        self.base_reads = 0
        self.chunks = 0

    def _check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("backup cancelled")
        if self._error is not None:
            raise self._error

    def add(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Add a piece; pieces must come in non-decreasing chunk order."""
        self._check()
        view = memoryview(data)
        if offset < 0 or offset + len(view) > self.capacity:
            raise BackupError(f"data at {offset}+{len(view)} lies outside the disk ({self.capacity} bytes)")
        pos = 0
        while pos < len(view):
            off = offset + pos
            slot, start = divmod(off, self.chunk_size)
            length = self.writer.index.chunk_length(slot)
            n = min(len(view) - pos, length - start)
            if slot != self._slot:
                if slot < self._slot:
                    raise BackupError(f"data at {off} arrived after chunk {self._slot} was completed")
                self._complete()
                self._slot = slot
                self._covered = []
                if start == 0 and n == length:  # a whole chunk: no copy, no base
                    self._buf = None
                    self._submit(slot, view[pos : pos + n])
                    self._covered = [(0, length)]
                    pos += n
                    continue
                self._buf = bytearray(length)
            if self._buf is None:
                raise BackupError(f"chunk {slot} received twice (overlapping pieces)")
            self._buf[start : start + n] = view[pos : pos + n]
            self._covered.append((start, start + n))
            pos += n

    def _complete(self) -> None:
        if self._slot < 0 or self._buf is None:
            self._buf = None
            return
        slot, buf = self._slot, self._buf
        self._buf = None
        length = len(buf)
        missing = gaps(self._covered, length)
        if missing and self.base is not None and self.base[slot] != HOLE:
            previous = self.repo.read_chunk(self.base[slot])
            self.base_reads += 1
            for a, b in missing:
                buf[a:b] = previous[a:b]
        self._submit(slot, buf)

    def _submit(self, slot: int, data: bytes | bytearray | memoryview) -> None:
        while not self._slots.acquire(timeout=0.5):
            self._check()
        self._check()
        try:
            fut = self.pool.submit(self.writer.write, slot * self.chunk_size, data)
        except BaseException:
            self._slots.release()
            raise
        self.chunks += 1
        with self._futures_lock:
            self._futures.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: concurrent.futures.Future[ChunkWrite]) -> None:
        with self._futures_lock:
            self._futures.discard(fut)
        self._slots.release()
        if not fut.cancelled() and fut.exception() is not None and self._error is None:
            self._error = fut.exception()

    def finish(self) -> None:
        """Store the last chunk and wait until every chunk is stored (raises the first failure)."""
        self._complete()
        self._slot = -1
        self.drain()
        self._check()

    def drain(self) -> None:
        """Wait for the chunks handed to the pool (also after a failure, before the caller cleans up)."""
        with self._futures_lock:
            pending = list(self._futures)
        concurrent.futures.wait(pending)


def gaps(covered: Iterable[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """The parts of ``[0, length)`` not covered by the ``(start, end)`` ranges."""
    out = []
    pos = 0
    for a, b in sorted(covered):
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < length:
        out.append((pos, length))
    return out


def coalesce(areas: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort ``(offset, length)`` areas and merge overlapping or touching ones."""
    out: list[tuple[int, int]] = []
    for off, length in sorted(a for a in areas if a[1] > 0):
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_len = out[-1]
            out[-1] = (last_off, max(last_len, off + length - last_off))
        else:
            out.append((off, length))
    return out
