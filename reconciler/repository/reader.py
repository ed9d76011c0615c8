"""Random access to one stored disk: ``read(offset, size)`` anywhere, as a file would answer.

What the FUSE mount and file-level restore read a restore point through. Restore and export stream a
whole disk in order (:func:`reconciler.operations.restore.disk_pieces`); a person browsing a point
reads a directory here, a file there, so reads arrive at any offset and in any size:

* a read is split into the 1 MiB chunk slots it covers; a hole slot is zeros and never touches storage;
  a stored slot is read, decrypted, decompressed and checked against its id by the one decode path,
  :meth:`Repository.read_chunk`, so a damaged chunk is an error, never silent garbage;
* decoded chunks are kept in a bounded LRU cache (``cache_chunks`` × 1 MiB): a filesystem reads its
  metadata blocks again and again, and the kernel reads a file in 128 KiB pieces, eight to a chunk;
* two threads asking for the same chunk share one fetch;
* a run of reads at increasing offsets starts read-ahead: the next ``readahead`` chunks are fetched on
  a small thread pool while the caller consumes the current one, so a sequential copy runs at the
  pool's throughput instead of one chunk's latency at a time.

It uses the public :class:`Repository` API only (``read_index``, ``read_chunk``), so it works for every
backend. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from reconciler.repository.chunks import HOLE
from reconciler.repository.errors import RepositoryError
from reconciler.repository.index import DiskIndex
from reconciler.repository.repo import Repository

DEFAULT_CACHE_CHUNKS = 64
"""64 MiB of decoded chunks per open disk."""
DEFAULT_READAHEAD = 8
DEFAULT_WORKERS = 4


class ChunkReadError(RepositoryError):
    """A chunk under a read could not be read or failed its check; says which disk bytes it held."""

    def __init__(self, disk: str, offset: int, length: int, cause: BaseException) -> None:
        self.disk = disk
        self.offset = offset
        self.length = length
        self.cause = cause
        super().__init__(
            f"{disk}: the chunk holding bytes {offset}-{offset + length - 1} cannot be read: {cause}"
        )


class DiskReader:
    """Reads of one disk index of ``repo``; ``name`` says which disk in error messages."""

    def __init__(
        self,
        repo: Repository,
        index: DiskIndex,
        *,
        name: str = "disk",
        cache_chunks: int = DEFAULT_CACHE_CHUNKS,
        readahead: int = DEFAULT_READAHEAD,
        workers: int = DEFAULT_WORKERS,
    ) -> None:
        if cache_chunks < 1:
            raise ValueError("cache_chunks must be at least 1")
        self.repo = repo
        self.index = index
        self.name = name
        self.capacity = index.capacity
        self.chunk_size = index.chunk_size
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_chunks = max(cache_chunks, readahead + 2)
        self._pending: dict[int, Future[bytes]] = {}
        self._lock = threading.Lock()
        self._readahead = readahead
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="disk-read")
        self._next_sequential = -1
        self._ahead_until = -1
        self._closed = False
        self.chunks_fetched = 0
        """Stored chunks read from the repository (cache misses), for tests and the bench."""

    def __repr__(self) -> str:
        return f"DiskReader({self.name!r}, capacity={self.capacity}, cached={len(self._cache)})"

    def close(self) -> None:
        """Stop read-ahead; reads after this fail."""
        with self._lock:
            self._closed = True
            self._cache.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DiskReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_hole(self, slot: int) -> bool:
        return self.index[slot] == HOLE

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; short only at the end of the disk (empty past it)."""
        if offset < 0 or size < 0:
            raise ValueError("offset and size must not be negative")
        end = min(offset + size, self.capacity)
        if offset >= end:
            return b""
        first, last = offset // self.chunk_size, (end - 1) // self.chunk_size
        self._note_access(first, last)
        parts = []
        for slot in range(first, last + 1):
            base = slot * self.chunk_size
            data = self._chunk(slot)
            parts.append(data[max(offset, base) - base : min(end, base + len(data)) - base])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- chunks --------------------------------------------------------------------------------------

    def _chunk(self, slot: int) -> bytes:
        """The plaintext of ``slot`` (its exact length), from the cache or fetched once."""
        length = self.index.chunk_length(slot)
        if self.is_hole(slot):
            return bytes(length)
        with self._lock:
            if self._closed:
                raise RepositoryError(f"{self.name}: reader is closed")
            data = self._cache.get(slot)
            if data is not None:
                self._cache.move_to_end(slot)
                return data
            future = self._pending.get(slot)
            if future is None:
                future = Future()
                self._pending[slot] = future
                owner = True
            else:
                owner = False
        if owner:
            self._fetch(slot, future)
        return future.result()

    def _fetch(self, slot: int, future: Future[bytes]) -> None:
        """Read, decode and cache ``slot``, resolving ``future`` (also on failure: waiters see the error)."""
        length = self.index.chunk_length(slot)
        try:
            data = self.repo.read_chunk(self.index[slot])
            if len(data) != length:
                data = data[:length]
        except Exception as exc:  # noqa: BLE001  any failure resolves the future: every waiter sees it
            error = ChunkReadError(self.name, slot * self.chunk_size, length, exc)
            with self._lock:
                self._pending.pop(slot, None)
            future.set_exception(error)
            return
        with self._lock:
            self.chunks_fetched += 1
            self._pending.pop(slot, None)
            self._cache[slot] = data
            self._cache.move_to_end(slot)
            while len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
        future.set_result(data)

    # -- read-ahead ----------------------------------------------------------------------------------

    def _note_access(self, first: int, last: int) -> None:
        """A read of slots ``first..last`` that continues the previous one (same or next slot) is
        sequential: keep ``readahead`` stored chunks past it in flight."""
        if self._readahead <= 0:
            return
        with self._lock:
            sequential = first in (self._next_sequential - 1, self._next_sequential)
            self._next_sequential = last + 1
            if not sequential:
                self._ahead_until = last
                return
            start = max(last + 1, self._ahead_until + 1)
            stop = min(last + self._readahead, self.index.count - 1)
            wanted = []
            for slot in range(start, stop + 1):
                if self.is_hole(slot) or slot in self._cache or slot in self._pending:
                    continue
                future: Future[bytes] = Future()
                self._pending[slot] = future
                wanted.append((slot, future))
            self._ahead_until = max(self._ahead_until, stop)
            closed = self._closed
        for slot, future in wanted:
            if closed:
                break
            try:
                self._pool.submit(self._fetch, slot, future)
            except RuntimeError:  # shut down meanwhile
                with self._lock:
                    self._pending.pop(slot, None)
                future.cancel()


def open_disk(
    repo: Repository,
    index_id: str,
    *,
    name: str = "disk",
    cache_chunks: int = DEFAULT_CACHE_CHUNKS,
    readahead: int = DEFAULT_READAHEAD,
    workers: int = DEFAULT_WORKERS,
) -> DiskReader:
    """A :class:`DiskReader` of the disk index ``index_id``."""
    return DiskReader(
        repo,
        repo.read_index(index_id),
        name=name,
        cache_chunks=cache_chunks,
        readahead=readahead,
        workers=workers,
    )
