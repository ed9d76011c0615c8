"""Backing up VMs: one snapshot per VM, read only what changed, store a restore point.

Per VM (:func:`backup_vm`):

1. The host layer's :meth:`~reconciler.esxi.host.EsxiHost.backup_snapshot` refuses a VM with **any**
   snapshot that is not ours (decision: a foreign snapshot means the frozen files are deltas, which
   this engine does not read, and it usually means a human is working on the VM; the VM is reported
   failed with the reason, other VMs go on), checks the datastore free-space floor of the host's
   limits, creates our snapshot, and removes it on every way out.
2. Per selected disk a *mode* is chosen (``--full`` forces a full read):

   * ``cbt``: the disk has a changeId under our snapshot, the previous point of the VM recorded one for
     this disk with the same capacity, and QueryChangedDiskAreas answers: only those areas are read.
   * ``digest``: otherwise, with SSH enabled and a previous digest map of our algorithm
     (:data:`DIGEST_ALGORITHM`, 64 KiB blocks) for the same capacity: the host program compares block
     digests and sends only the differing blocks.
   * ``full``: no usable previous point, or a fallback (CBT reset, changeId rejected, capacity changed,
     another digest algorithm/block size, ...; the reason goes to the log and ``fallback_reason``). On
     a licensed host with CBT active it reads the ``*`` (allocated) areas; else, with SSH, the blocks
     the host lists as allocated (``SEEK_DATA``, one SSH round trip) over parallel HTTPS Range reads,
     with the digest map computed on the client exactly as the host program computes it (so the next
     run can be incremental); when HTTPS is unavailable (API unreachable, ``/folder`` refused, or
     ``transport: ssh``), the digest program with no previous map (holes and zero blocks are not
     sent); else the whole disk through the transport (zero chunks become holes).

3. Incrementals *patch* the previous point: the :class:`ChunkWriter` starts from the previous index
   (unchanged chunks keep their ids) and a chunk touched by a small change is rebuilt from the previous
   chunk's content, read back from the repository, plus the new bytes. Only changed bytes cross the
   network.
4. The manifest is written last (status ``success``); a failed VM writes no manifest and leaves only
   garbage for GC. Its staged (unflushed) chunks are dropped when the policy's run ends, and a run
   first removes the staged files killed runs left in ``tmp/`` (the repository's lock rules say whose
   writer is gone), so a full volume, once space is freed, needs no cleaning by hand. A volume that
   refuses writes (full, quota, read-only, permission) fails the VM with one line naming the
   repository, the cause and the fix (:class:`~reconciler.repository.StorageError`).

Pipeline and memory: the transport reads on its own threads (≤ 2 × streams pieces of 4 MiB in flight)
or the digest stream delivers 64 KiB blocks; the VM's thread assembles 1 MiB chunks; a shared thread
pool hashes, compresses, encrypts and stores them (≤ :data:`IN_FLIGHT_PER_DISK` chunks per disk).

Policies (:func:`backup_policy`) run VMs in parallel within the host's ``concurrent_backups`` and
``concurrent_backups_per_datastore`` limits, under a shared repository lock. A ``cancel`` event (set by
the CLI on SIGTERM/SIGINT) makes every pipeline raise :class:`Cancelled`, so snapshots are removed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import posixpath
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import structlog

from reconciler.config.model import BackupPolicy, DesiredState
from reconciler.config.model import Repository as RepositoryConfig
from reconciler.esxi.errors import EsxiError, FullBackupNeededError
from reconciler.esxi.hostdigest import BLOCK_SIZE, DIGEST_SIZE, ZERO_DIGEST, DigestResult, local_digests
from reconciler.facts.inventory import BackupSnapshot, FrozenDisk, VmInfo, split_ds_path
from reconciler.facts.points import BackupMode, DiskRecord, RestorePoint, StoredFile, VmRef, new_point_id
from reconciler.operations.hooks import HookFailedError, VmHooks
from reconciler.operations.hosts import HostFactory, connect
from reconciler.operations.ports import BackupHost, DiskSource, VmFilesReader
from reconciler.operations.progress import DiskProgress, Progress
from reconciler.operations.vmlock import VmBusyError, vm_lock
from reconciler.repository import (
    HOLE,
    ChunkWrite,
    ChunkWriter,
    DigestMap,
    DiskIndex,
    Repository,
    RepositoryLock,
    StorageError,
)

log = structlog.get_logger(__name__)

DIGEST_ALGORITHM = "blake2b-128"
"""Name recorded in digest maps made by :mod:`reconciler.esxi.hostdigest` (BLAKE2b, 16-byte digests)."""
IN_FLIGHT_PER_DISK = 8
"""Assembled chunks (1 MiB each) waiting for or in the encode pool, per disk."""

OnSnapshot = Callable[[BackupHost, BackupSnapshot], None]
OnData = Callable[[FrozenDisk, int, int], None]


class Cancelled(Exception):
    """The run was asked to stop (SIGTERM/SIGINT); the snapshot is removed on the way out."""


class BackupError(Exception):
    """A VM could not be backed up for a reason worth a clear message (not a bug)."""


@dataclass(frozen=True)
class BackupOptions:
    """How to run; the defaults suit production. ``on_snapshot`` and ``on_data`` are test seams."""

    full: bool = False
    transport: str = "auto"
    streams: int = 4
    digest_streams: int = 2
    """Parallel on-host digest programs (block ranges, one SSH connection each) for a large disk: one
    program is bound by one host core; bench/backup.py measured the free-host incremental 1.7x faster
    with 2 than with 1 (2-core machine), and the full read slightly faster."""
    workers: int = max(2, os.cpu_count() or 2)
    progress: Progress | None = None
    on_snapshot: OnSnapshot | None = None
    """Called with the host and the snapshot once it exists, before any disk is read."""
    on_data: OnData | None = None
    """Called for every piece of disk data received: (disk, offset, length)."""
    lock_dir: Path | None = None
    """Where the per-VM locks live (default: :func:`reconciler.operations.vmlock.default_lock_dir`)."""


@dataclass
class DiskResult:
    key: int
    label: str
    mode: BackupMode
    fallback_reason: str | None
    capacity: int
    bytes_read: int
    """Bytes the host read from its disk (the digest program reads every allocated block)."""
    bytes_sent: int
    """Bytes that crossed the network (data plus protocol; for the digest path both directions)."""
    bytes_stored: int
    """Bytes newly added to the repository (after dedup, compression, encryption)."""
    seconds: float


@dataclass
class VmResult:
    """The outcome of one VM's backup (``point_id`` is None when it failed)."""

    vm: str
    host: str
    policy: str
    ok: bool
    point_id: str | None = None
    mode: BackupMode | None = None
    fallback_reason: str | None = None
    error: str | None = None
    seconds: float = 0.0
    disks: list[DiskResult] = field(default_factory=list)
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    """What made it fail, for callers that classify failures (retry: transient or terminal)."""

    @property
    def bytes_read(self) -> int:
        return sum(d.bytes_read for d in self.disks)

    @property
    def bytes_sent(self) -> int:
        return sum(d.bytes_sent for d in self.disks)

    @property
    def bytes_stored(self) -> int:
        return sum(d.bytes_stored for d in self.disks)


# -- chunk assembly ----------------------------------------------------------------------------------


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
        gaps = _gaps(self._covered, length)
        if gaps and self.base is not None and self.base[slot] != HOLE:
            previous = self.repo.read_chunk(self.base[slot])
            self.base_reads += 1
            for a, b in gaps:
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


def _gaps(covered: Iterable[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """The parts of ``[0, length)`` not covered by the ``(start, end)`` ranges."""
    gaps = []
    pos = 0
    for a, b in sorted(covered):
        if a > pos:
            gaps.append((pos, a))
        pos = max(pos, b)
    if pos < length:
        gaps.append((pos, length))
    return gaps


class _RangeAborted(Cancelled):
    """A parallel digest range stopped because another range failed."""


DIGEST_RANGE_MIN = 256 * 1024 * 1024
"""A disk is split into parallel digest ranges of at least this many bytes."""


def _digest_ranges(capacity: int, chunk_size: int, streams: int) -> list[tuple[int, int]]:
    """``(first_block, block_count)`` ranges for parallel digest streams: chunk-aligned, at least
    :data:`DIGEST_RANGE_MIN` bytes each, at most ``streams``; one range (the whole disk) for small disks."""
    if chunk_size % BLOCK_SIZE:
        raise ValueError(f"chunk size {chunk_size} is not a multiple of the digest block {BLOCK_SIZE}")
    nblocks = -(-capacity // BLOCK_SIZE)
    per_chunk = chunk_size // BLOCK_SIZE
    n = max(1, min(streams, capacity // DIGEST_RANGE_MIN))
    if n == 1:
        return [(0, nblocks)]
    step = -(-nblocks // n // per_chunk) * per_chunk
    return [(a, min(step, nblocks - a)) for a in range(0, nblocks, step)]


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


# -- one disk ----------------------------------------------------------------------------------------


@dataclass
class _Previous:
    point: RestorePoint
    record: DiskRecord


@dataclass
class _Plan:
    mode: BackupMode
    reason: str | None
    previous: _Previous | None
    areas: list[tuple[int, int]] | None = None
    """cbt and full-with-"*": the areas to read; None: the whole disk or the digest program."""
    digest_map: DigestMap | None = None
    use_digest: bool = False
    https_first: bool = False
    """A full read with the digest program's map: try parallel HTTPS Range reads of the allocated
    ranges with the map computed locally first, the digest program over SSH when HTTPS is unavailable."""


class _DiskJob:
    def __init__(
        self,
        host: DiskSource,
        repo: Repository,
        bs: BackupSnapshot,
        disk: FrozenDisk,
        previous: _Previous | None,
        options: BackupOptions,
        pool: concurrent.futures.Executor,
        cancel: threading.Event,
        vm_name: str,
    ) -> None:
        self.host = host
        self.repo = repo
        self.bs = bs
        self.disk = disk
        self.previous = previous
        self.options = options
        self.pool = pool
        self.cancel = cancel
        self.log = log.bind(vm=vm_name, disk=disk.label, key=disk.key)
        self.vm_name = vm_name

    def plan(self) -> _Plan:
        disk, prev = self.disk, self.previous
        ssh = self.host.ssh_enabled
        licensed = self.host.license == "licensed"
        if self.options.full:
            return self._full_plan(None)
        if prev is None:
            return self._full_plan("no previous restore point of this disk")
        rec = prev.record
        if rec.capacity != disk.capacity:
            return self._full_plan(f"capacity changed from {rec.capacity} to {disk.capacity} bytes")
        lost = self._lost_chunks(rec)
        if lost:
            return self._full_plan(
                f"the previous point needs {lost} chunk(s) that verify found damaged or missing; a full"
                " read stores them again"
            )
        reasons = []
        if licensed and disk.change_id and rec.change_id:
            try:
                areas = self.host.changed_areas(self.bs.vm, self.bs.snapshot, disk, rec.change_id)
            except FullBackupNeededError as exc:
                reasons.append(f"cbt: {exc.reason}: {exc}")
            else:
                return _Plan("cbt", None, prev, areas=coalesce(areas))
        elif licensed:
            why = "not active for the disk" if not disk.change_id else "no previous changeId"
            reasons.append(f"cbt: {why}")
        if ssh and rec.digest_map:
            dm = self.repo.read_digest_map(rec.digest_map)
            ours = (DIGEST_ALGORITHM, BLOCK_SIZE, DIGEST_SIZE)
            if (dm.algorithm, dm.block_size, dm.digest_size) != ours:
                reasons.append(
                    f"digest: previous map is {dm.algorithm}/{dm.block_size}-byte blocks, this host program"
                    f" computes {DIGEST_ALGORITHM}/{BLOCK_SIZE}"
                )
            elif dm.capacity != disk.capacity:
                reasons.append("digest: previous map has another capacity")
            else:
                return _Plan("digest", None, prev, digest_map=dm, use_digest=True)
        elif not ssh:
            reasons.append("digest: SSH is disabled for the host")
        else:
            reasons.append("digest: the previous point has no digest map for the disk")
        return self._full_plan("; ".join(reasons))

    def _lost_chunks(self, rec: DiskRecord) -> int:
        """How many chunks the previous point's index needs that verify set aside and no backup has
        stored again since (an incremental would keep referencing them)."""
        quarantined = self.repo.quarantined()
        if not quarantined:
            return 0
        needed = quarantined.intersection(self.repo.read_index(rec.index).referenced())
        return sum(1 for cid in needed if not self.repo.has_chunk(cid))

    def _full_plan(self, reason: str | None) -> _Plan:
        """A full read; ``reason`` is the fallback reason (None when a full read is simply due)."""
        if reason:
            self.log.warning("backup.fallback_full", reason=reason)
        disk = self.disk
        if self.host.license == "licensed" and disk.change_id:
            try:
                areas = self.host.changed_areas(self.bs.vm, self.bs.snapshot, disk, "*")
            except FullBackupNeededError as exc:
                self.log.info("backup.allocated_areas_unavailable", reason=str(exc))
            else:
                return _Plan("full", reason, None, areas=coalesce(areas))
        if self.host.ssh_enabled:
            https = self.options.transport in ("auto", "https")
            return _Plan("full", reason, None, use_digest=True, https_first=https)
        return _Plan("full", reason, None, areas=[(0, disk.capacity)])

    def run(self) -> tuple[DiskRecord, DiskResult]:
        started = time.monotonic()
        plan = self.plan()
        disk = self.disk
        base = None
        if plan.previous is not None:
            base = self.repo.read_index(plan.previous.record.index)
            if plan.use_digest and (
                base.digest_map is None or base.digest_map.hex() != plan.previous.record.digest_map
            ):
                raise BackupError(f"disk {disk.label}: previous index and digest map do not belong together")
        writer = self.repo.chunk_writer(disk.capacity, base=base)
        asm = ChunkAssembler(self.repo, writer, base, self.pool, cancel=self.cancel)
        total = disk.capacity if plan.areas is None else sum(n for _, n in plan.areas)
        progress = (
            self.options.progress.disk(self.vm_name, disk.label, total) if self.options.progress else None
        )
        self.log.info("backup.disk_start", mode=plan.mode, bytes_to_walk=total)
        digest_map = None
        try:
            https = self._https_full(asm, writer, progress) if plan.https_first else None
            if https is not None:
                read, sent, digest_map = https
            elif plan.use_digest:
                read, sent, digest_map = self._digest(plan, asm, writer, progress)
            else:
                assert plan.areas is not None
                read, sent = self._areas(plan.areas, asm, progress)
                asm.finish()
        except BaseException:
            asm.drain()
            raise
        finally:
            if progress is not None:
                progress.done()
        index_id = writer.finish(digest_map)
        seconds = time.monotonic() - started
        record = DiskRecord(
            key=disk.key,
            label=disk.label,
            file=disk.descriptor,
            capacity=disk.capacity,
            index=index_id,
            change_id=disk.change_id,
            digest_map=writer.index.digest_map.hex() if writer.index.digest_map else None,
            bytes_read=read,
            bytes_sent=sent,
            bytes_stored=writer.bytes_stored,
        )
        result = DiskResult(
            disk.key,
            disk.label,
            plan.mode,
            plan.reason,
            disk.capacity,
            read,
            sent,
            writer.bytes_stored,
            seconds,
        )
        self.log.info(
            "backup.disk_done",
            mode=plan.mode,
            bytes_read=read,
            bytes_sent=sent,
            bytes_stored=writer.bytes_stored,
            new_chunks=writer.new_chunks,
            base_reads=asm.base_reads,
            seconds=round(seconds, 3),
        )
        return record, result

    def _areas(
        self, areas: list[tuple[int, int]], asm: ChunkAssembler, progress: DiskProgress | None
    ) -> tuple[int, int]:
        received = 0
        if not areas:
            return 0, 0
        reader = self.host.disk_reader(self.options.transport, streams=self.options.streams)
        try:
            for off, data in reader.read(self.disk.data_file, areas):
                if self.options.on_data is not None:
                    self.options.on_data(self.disk, off, len(data))
                asm.add(off, data)
                received += len(data)
                if progress is not None:
                    progress.advance(len(data))
        finally:
            reader.close()
        return received, received

    def _https_full(
        self, asm: ChunkAssembler, writer: ChunkWriter, progress: DiskProgress | None
    ) -> tuple[int, int, DigestMap] | None:
        """A full read over parallel HTTPS Range streams (free hosts allow ``/folder`` reads) of the
        blocks the host lists as allocated (:meth:`DiskSource.allocation`, one SSH round trip; everything
        when it cannot tell), with the digest map computed here exactly as the host program would
        (:func:`~reconciler.esxi.hostdigest.local_digests`), so the next run can be a digest incremental.
        None (nothing read) when HTTPS is unavailable: the caller runs the digest program instead."""
        disk = self.disk
        try:
            reader = self.host.https_reader(self.options.streams)
        except EsxiError as exc:
            self.log.warning("backup.https_unavailable", reason=str(exc) or type(exc).__name__)
            return None
        try:
            try:
                size = reader.size(disk.data_file)
            except EsxiError as exc:
                self.log.warning("backup.https_unavailable", reason=str(exc) or type(exc).__name__)
                return None
            if size != disk.capacity:
                raise BackupError(
                    f"disk {disk.label}: {disk.data_file} has {size} bytes, the disk {disk.capacity}"
                )
            sent = 0
            try:
                alloc = self.host.allocation(disk)
            except EsxiError as exc:
                self.log.info("backup.allocation_unavailable", reason=str(exc))
                areas = [(0, disk.capacity)]
            else:
                if alloc.size != disk.capacity:
                    raise BackupError(
                        f"disk {disk.label}: {disk.data_file} has {alloc.size} bytes (host listing), the"
                        f" disk {disk.capacity}"
                    )
                areas = [(0, disk.capacity)] if alloc.ranges is None else alloc.ranges
                sent += 64 + 40 * len(alloc.ranges or [])  # the listing, roughly (program sent once)
            digests = bytearray(-(-disk.capacity // BLOCK_SIZE) * DIGEST_SIZE)
            received = 0
            for off, data in reader.read(disk.data_file, areas):
                if self.options.on_data is not None:
                    self.options.on_data(disk, off, len(data))
                i = off // BLOCK_SIZE * DIGEST_SIZE
                entries = local_digests(data)
                digests[i : i + len(entries)] = entries
                asm.add(off, data)
                received += len(data)
                if progress is not None:
                    progress.advance(len(data), off + len(data))
            asm.finish()
        finally:
            reader.close()
        self.log.info("backup.https_full", areas=len(areas), bytes_read=received)
        dm = DigestMap(DIGEST_ALGORITHM, BLOCK_SIZE, disk.capacity, DIGEST_SIZE, bytes(digests))
        return received, received + sent, dm

    def _digest(
        self, plan: _Plan, asm: ChunkAssembler, writer: ChunkWriter, progress: DiskProgress | None
    ) -> tuple[int, int, DigestMap]:
        previous = plan.digest_map.digests if plan.digest_map is not None else None
        ranges = _digest_ranges(self.disk.capacity, writer.index.chunk_size, self.options.digest_streams)
        # one assembler per range (ranges are chunk-aligned, so they never share a chunk); the first
        # range runs on this thread, the others on their own threads and SSH connections
        assemblers = [asm] + [
            ChunkAssembler(self.repo, writer, asm.base, self.pool, cancel=self.cancel) for _ in ranges[1:]
        ]
        abort = threading.Event()

        def compare(i: int) -> DigestResult:
            first, count = ranges[i]
            part = asm if i == 0 else assemblers[i]

            def on_block(offset: int, data: bytes) -> None:
                if abort.is_set():
                    raise _RangeAborted("another digest range failed")
                if self.options.on_data is not None:
                    self.options.on_data(self.disk, offset, len(data))
                part.add(offset, data)
                if progress is not None:
                    progress.advance(len(data), offset + len(data))

            prev = None
            if previous is not None:
                prev = previous[first * DIGEST_SIZE : (first + count) * DIGEST_SIZE]
            if len(ranges) == 1:
                res = self.host.digest_compare(self.disk, prev, on_block)
            else:
                res = self.host.digest_compare(
                    self.disk, prev, on_block, first_block=first, block_count=count
                )
            part.finish()
            return res

        if len(ranges) == 1:
            results = [compare(0)]
        else:
            with concurrent.futures.ThreadPoolExecutor(
                len(ranges) - 1, thread_name_prefix="digest"
            ) as threads:
                futures = [threads.submit(compare, i) for i in range(1, len(ranges))]
                for fut in futures:  # a failing range stops the others at their next block
                    fut.add_done_callback(lambda f: abort.set() if f.exception() is not None else None)
                try:
                    results = [compare(0)] + [f.result() for f in futures]
                except BaseException as exc:
                    abort.set()
                    concurrent.futures.wait(futures)
                    for other in assemblers[1:]:
                        other.drain()
                    if isinstance(exc, _RangeAborted):  # raise the failure that stopped the others
                        errors = [f.exception() for f in futures]
                        real = [e for e in errors if e is not None and not isinstance(e, _RangeAborted)]
                        if real:
                            raise real[0] from None
                    raise
        for result in results:
            if result.disk_size != self.disk.capacity:
                raise BackupError(
                    f"disk {self.disk.label}: {self.disk.data_file} has {result.disk_size} bytes, the disk"
                    f" {self.disk.capacity}"
                )
        digests = b"".join(r.digests for r in results)
        if previous is not None:
            self._zero_blocks_that_became_zero(previous, digests, writer)
        dm = DigestMap(DIGEST_ALGORITHM, BLOCK_SIZE, self.disk.capacity, DIGEST_SIZE, digests)
        read = sum(r.host_bytes_read for r in results)
        return read, sum(r.wire_bytes_in + r.wire_bytes_out for r in results), dm

    def _zero_blocks_that_became_zero(self, previous: bytes, digests: bytes, writer: ChunkWriter) -> None:
        """The host does not send blocks that are zero now; where they held data before, the patched
        chunk still has the old bytes: rewrite those chunks with the blocks zeroed."""
        per_chunk = writer.index.chunk_size // BLOCK_SIZE
        slots: dict[int, list[int]] = {}
        for block in range(len(digests) // DIGEST_SIZE):
            span = slice(block * DIGEST_SIZE, (block + 1) * DIGEST_SIZE)
            if digests[span] == ZERO_DIGEST and previous[span] != ZERO_DIGEST:
                slots.setdefault(block // per_chunk, []).append(block % per_chunk)
        if not slots:
            return
        self.repo.flush()  # chunks written by this run become readable
        for slot, blocks in slots.items():
            current = writer.index[slot]
            if current == HOLE:
                continue
            data = bytearray(self.repo.read_chunk(current)[: writer.index.chunk_length(slot)])
            for b in blocks:
                a, end = b * BLOCK_SIZE, min(len(data), (b + 1) * BLOCK_SIZE)
                data[a:end] = bytes(end - a)
            writer.write(slot * writer.index.chunk_size, data)
        self.log.info("backup.zeroed_blocks", chunks=len(slots), blocks=sum(len(b) for b in slots.values()))


# -- one VM ------------------------------------------------------------------------------------------


def _disk_selected(policy: BackupPolicy, disk: FrozenDisk) -> bool:
    ids = [disk.label, posixpath.basename(split_ds_path(disk.descriptor)[1])]
    if disk.node:
        ids.append(disk.node)
    return policy.disks.matches(*ids)


def previous_point(repo: Repository, policy: str, vm: VmInfo, host: str) -> RestorePoint | None:
    """The newest successful point of ``vm`` (same uuid, else same name) of ``policy``."""
    for point in reversed(repo.list_points(policy=policy)):
        if point.status != "success" or point.vm.host != host:
            continue
        if (vm.uuid and point.vm.uuid == vm.uuid) or (not vm.uuid and point.vm.name == vm.name):
            return point
    return None


def _config_files(host: VmFilesReader, vm: VmInfo) -> list[tuple[str, bytes]]:
    """The .vmx and .nvram as they are before the snapshot (the .vmx then names the base disks)."""
    files = [(posixpath.basename(split_ds_path(vm.vmx_path)[1]), host.read_file(vm.vmx_path))]
    vmx = host.read_vmx(vm)
    nvram = vmx.get("nvram")
    if nvram:
        ds, rel = split_ds_path(vm.vmx_path)
        path = nvram if nvram.startswith("/") else posixpath.join(posixpath.dirname(rel), nvram)
        ds_path = f"[{ds}] {path}" if not path.startswith("/") else None
        if ds_path is not None and host.file_exists(ds_path):
            files.append((posixpath.basename(path), host.read_file(ds_path)))
    return files


def backup_vm(
    host: BackupHost,
    repo: Repository,
    policy: BackupPolicy,
    vm: VmInfo | str,
    *,
    revision: str,
    options: BackupOptions | None = None,
    pool: concurrent.futures.Executor | None = None,
    cancel: threading.Event | None = None,
    repo_lock: RepositoryLock | None = None,
) -> VmResult:
    """Back up one VM (as listed, or by display name) to ``repo`` (the caller holds a shared repository
    lock). Never raises for a VM-level failure: the result says what went wrong; a failed VM leaves no
    restore point. With ``repo_lock``, the point is written only if the lock is still held."""
    vm_name = vm.name if isinstance(vm, VmInfo) else vm
    options = options or BackupOptions()
    cancel = cancel or threading.Event()
    started_mono = time.monotonic()
    result = VmResult(vm=vm_name, host=host.name, policy=policy.name, ok=False)
    vlog = log.bind(vm=vm_name, host=host.name, policy=policy.name)
    own_pool = pool is None
    executor = pool or concurrent.futures.ThreadPoolExecutor(options.workers, thread_name_prefix="encode")
    try:
        point = _backup_vm(
            host, repo, policy, vm, revision, options, executor, cancel, result, vlog, repo_lock
        )
    except Exception as exc:
        # Chunks already staged stay until the policy's run ends: other VMs share the repository handle
        # and may have deduplicated against them (backup_policy then discards what is still staged).
        expected = isinstance(exc, EsxiError | BackupError | Cancelled | StorageError)
        result.error = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        result.exception = exc
        vlog.error("backup.vm_failed", error=result.error, exc_info=not expected)
    else:
        result.ok = result.error is None  # a failing post hook (on_failure: fail) fails the run
        result.point_id = point.id
        result.mode = point.mode
        result.fallback_reason = point.fallback_reason
    finally:
        if own_pool:
            executor.shutdown(wait=True)
        result.seconds = time.monotonic() - started_mono
    return result


def _backup_vm(
    host: BackupHost,
    repo: Repository,
    policy: BackupPolicy,
    ref: VmInfo | str,
    revision: str,
    options: BackupOptions,
    pool: concurrent.futures.Executor,
    cancel: threading.Event,
    result: VmResult,
    vlog: structlog.typing.FilteringBoundLogger,
    repo_lock: RepositoryLock | None,
) -> RestorePoint:
    vm = host.vm(ref) if isinstance(ref, VmInfo) else host.find_vm(ref)
    try:
        with vm_lock(host.identity, vm.vmid, options.lock_dir):
            vm = host.vm(vm)
            foreign = [s.name for s in vm.snapshots if not host.is_ours(s)]
            if foreign:
                raise BackupError(
                    f"VM {vm.name!r} has snapshots that are not ours ({', '.join(map(repr, foreign))}):"
                    " skipped; remove or consolidate them to back it up"
                )
            # we hold the VM's lock, so a snapshot named as ours is an orphan of a killed run
            orphans = [s for s in vm.snapshots if host.is_ours(s)]
            for snap in reversed(orphans):  # children first
                vlog.warning("backup.orphaned_snapshot_removed", snapshot=snap.name, snapshot_id=snap.id)
                host.remove_snapshot(vm, snap.id)
            if orphans:
                vm = host.vm(vm)
            # pre hooks before the snapshot, post hooks after it is gone (also on failure)
            hooks = VmHooks(policy.hooks, policy=policy.name, host=host.name, vm=vm.name)
            try:
                hooks.pre()
                point = _backup_locked(
                    host, repo, policy, vm, revision, options, pool, cancel, result, vlog, repo_lock
                )
            except BaseException as exc:
                hooks.post(ok=False, point_id=None, error=str(exc) or type(exc).__name__)
                if isinstance(exc, HookFailedError):
                    raise BackupError(str(exc)) from None
                raise
            result.error = hooks.post(ok=True, point_id=point.id)  # set: the run failed, the point stays
            return point
    except VmBusyError:
        raise BackupError(f"VM {vm.name!r} is being backed up by another run of this machine") from None


def _backup_locked(
    host: BackupHost,
    repo: Repository,
    policy: BackupPolicy,
    vm: VmInfo,
    revision: str,
    options: BackupOptions,
    pool: concurrent.futures.Executor,
    cancel: threading.Event,
    result: VmResult,
    vlog: structlog.typing.FilteringBoundLogger,
    repo_lock: RepositoryLock | None,
) -> RestorePoint:
    started = datetime.now(timezone.utc)
    point_id = new_point_id(started)
    prev = previous_point(repo, policy.name, vm, host.name)
    vlog.info("backup.vm_start", point=point_id, previous=prev.id if prev else None, full=options.full)
    files = _config_files(host, vm)
    if cancel.is_set():
        raise Cancelled("backup cancelled")
    records: list[DiskRecord] = []
    with host.backup_snapshot(
        vm, quiesce=policy.quiesce, timeout=policy.snapshot_timeout.total_seconds()
    ) as bs:
        snapshot_time = bs.snapshot.created or datetime.now(timezone.utc)
        vlog.info("backup.snapshot", snapshot=bs.snapshot.name, snapshot_id=bs.snapshot.id, point=point_id)
        if options.on_snapshot is not None:
            options.on_snapshot(host, bs)
        stored = [repo.write_file(name, data) for name, data in files]
        for disk in bs.disks:
            if not _disk_selected(policy, disk):
                vlog.info("backup.disk_excluded", disk=disk.label, node=disk.node)
                continue
            prev_rec = None
            if prev is not None:
                prev_rec = next((d for d in prev.disks if d.key == disk.key), None)
            previous = _Previous(prev, prev_rec) if prev is not None and prev_rec is not None else None
            name = posixpath.basename(split_ds_path(disk.descriptor)[1])
            stored.append(repo.write_file(name, disk.descriptor_text.encode("utf-8", "surrogateescape")))
            job = _DiskJob(host, repo, bs, disk, previous, options, pool, cancel, vm.name)
            record, disk_result = job.run()
            records.append(record)
            result.disks.append(disk_result)
            if cancel.is_set():
                raise Cancelled("backup cancelled")
    # the snapshot is gone and the chain verified: only now does the point become visible
    modes = {d.mode for d in result.disks}
    mode: BackupMode = "full" if "full" in modes or not modes else ("cbt" if "cbt" in modes else "digest")
    reasons = [f"{d.label}: {d.fallback_reason}" for d in result.disks if d.fallback_reason]
    point = RestorePoint(
        id=point_id,
        policy=policy.name,
        vm=VmRef(vm.name, vm.uuid or "", host.name, vm.vmid),
        started=started,
        snapshot_time=snapshot_time if snapshot_time.tzinfo else snapshot_time.replace(tzinfo=timezone.utc),
        finished=datetime.now(timezone.utc),
        status="success",
        mode=mode,
        config_revision=revision,
        fallback_reason="; ".join(reasons) or None,
        files=tuple(_dedupe_files(stored)),
        disks=tuple(records),
    )
    if repo_lock is not None:
        repo_lock.check()  # a lost lock (e.g. removed as stale) means: write nothing more
    repo.write_point(point)
    vlog.info(
        "backup.vm_done",
        point=point.id,
        mode=mode,
        bytes_read=result.bytes_read,
        bytes_sent=result.bytes_sent,
        bytes_stored=result.bytes_stored,
    )
    return point


def _dedupe_files(files: Sequence[StoredFile]) -> Iterator[StoredFile]:
    seen = set()
    for f in files:
        if f.name not in seen:
            seen.add(f.name)
            yield f


# -- a policy ----------------------------------------------------------------------------------------


def open_repository(config: RepositoryConfig) -> Repository:
    """Open the configured repository with its passphrase (the encryption key secret)."""
    key = config.encryption.key
    passphrase = key.reveal() if config.encryption.enabled and key is not None else None
    return Repository.open(
        str(config.backend.path),
        passphrase,
        compression_level=config.compression.level if config.compression.algorithm == "zstd" else None,
        expect_encrypted=config.encryption.enabled,
        label=config.name,
    )


class _Limits:
    """Per-datastore semaphores of one host."""

    def __init__(self, per_datastore: int) -> None:
        self.per_datastore = max(1, per_datastore)
        self._sems: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, datastores: Iterable[str], cancel: threading.Event) -> Iterator[None]:
        with self._lock:
            sems = [
                self._sems.setdefault(ds, threading.BoundedSemaphore(self.per_datastore))
                for ds in sorted(set(datastores))
            ]
        taken: list[threading.BoundedSemaphore] = []
        try:
            for sem in sems:  # sorted order: no deadlock between VMs spanning datastores
                while not sem.acquire(timeout=0.5):
                    if cancel.is_set():
                        raise Cancelled("backup cancelled")
                taken.append(sem)
            yield
        finally:
            for sem in reversed(taken):
                sem.release()


def backup_policy(
    desired: DesiredState,
    policy_name: str,
    *,
    vm: str | None = None,
    vms: Collection[str] | None = None,
    options: BackupOptions | None = None,
    cancel: threading.Event | None = None,
    host_factory: HostFactory[BackupHost] = connect,
    on_result: Callable[[VmResult], None] | None = None,
) -> list[VmResult]:
    """Back up the VMs of a policy (or only ``vm``, or only those of ``vms`` the policy selects and the
    host has: the others are simply not in the results), several at once within the host's limits.

    Raises :class:`BackupError` for problems of the whole run (unknown policy or VM, repository);
    per-VM failures are in the results.
    """
    options = options or BackupOptions()
    cancel = cancel or threading.Event()
    try:
        policy = desired.policy(policy_name)
    except KeyError:
        raise BackupError(f"no backup policy named {policy_name!r}") from None
    host_cfg = desired.host(policy.host)
    repo = open_repository(desired.repository(policy.repository))
    with host_factory(host_cfg) as inventory_host:
        inventory = inventory_host.list_vms()
    selected = [v for v in inventory if policy.vms.matches(v.name)]
    if vms is not None:
        wanted = set(vms)
        selected = [v for v in selected if v.name in wanted]
    if vm is not None:
        selected = [v for v in selected if v.name == vm]
        if not selected:
            known = vm in {v.name for v in inventory}
            raise BackupError(
                f"VM {vm!r} is not selected by policy {policy_name!r}"
                if known
                else f"no VM named {vm!r} on host {host_cfg.name}"
            )
    if not selected:
        log.warning("backup.no_vms", policy=policy_name)
        return []
    limits = _Limits(host_cfg.limits.concurrent_backups_per_datastore)
    results: list[VmResult] = []
    log.info("backup.policy_start", policy=policy_name, vms=[v.name for v in selected])

    def one(info: VmInfo) -> VmResult:
        datastores = {info.datastore} | {split_ds_path(d.file)[0] for d in info.disks}
        try:
            with limits.hold(datastores, cancel), host_factory(host_cfg) as host:
                return backup_vm(
                    host, repo, policy, info, revision=desired.revision.id,
                    options=options, pool=encode_pool, cancel=cancel, repo_lock=repo_lock,
                )  # fmt: skip
        except Cancelled as exc:
            return VmResult(info.name, host_cfg.name, policy.name, False, error=str(exc), exception=exc)
        except Exception as exc:  # e.g. login failed
            log.error("backup.vm_failed", vm=info.name, error=str(exc))
            return VmResult(info.name, host_cfg.name, policy.name, False, error=str(exc), exception=exc)

    # what killed runs left in tmp/ goes first: on a full volume it is what makes room for the lock file
    stale = repo.remove_stale_staged()
    if stale:
        log.info(
            "backup.stale_staged_removed",
            repository=policy.repository,
            files=len(stale),
            bytes=sum(f.size for f in stale),
        )
    with (
        repo.lock(purpose=f"backup {policy_name}") as repo_lock,
        # exited after the pools: every point written flushed what was staged before it, so what is
        # still staged then belongs to failed VMs only, and goes rather than wait in tmp/ for GC
        repo.discard_pending_on_exit(),
        concurrent.futures.ThreadPoolExecutor(options.workers, thread_name_prefix="encode") as encode_pool,
        concurrent.futures.ThreadPoolExecutor(
            max(1, host_cfg.limits.concurrent_backups), thread_name_prefix="vm"
        ) as vm_pool,
    ):
        futures = [vm_pool.submit(one, v) for v in selected]
        try:
            for fut in concurrent.futures.as_completed(futures):
                res = fut.result()
                results.append(res)
                if on_result is not None:
                    on_result(res)
        except BaseException:
            cancel.set()  # SIGTERM/SIGINT in the main thread: every VM unwinds, snapshots are removed
            concurrent.futures.wait(futures)
            raise
    order = {v.name: i for i, v in enumerate(selected)}
    return sorted(results, key=lambda r: order.get(r.vm, 0))
