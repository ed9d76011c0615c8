"""One disk's backup: gather the facts, let planning choose the mode, read, assemble, store the index.

:class:`DiskJob` gathers what :func:`~reconciler.planning.backup_mode.choose_disk_mode` decides from
(the previous point's record of the disk, capacity, changeIds, licence, SSH, chunks verify set aside),
then tries the choice: QueryChangedDiskAreas refusing, the previous digest map read and found of another
shape, the allocated areas or HTTPS refused are new facts, and the choice is asked again. The mode and
its reasons go into the disk's record in the point.

Readers, per :data:`~reconciler.planning.backup_mode.ReadMethod`: areas (CBT changed or allocated, or
the whole disk) through the host's transport; parallel HTTPS Range reads of the allocated blocks with
the digest map computed here exactly as the host program computes it (so the next run can be a digest
incremental); the host digest program (:mod:`reconciler.esxi.hostdigest`), in parallel ranges on large
disks, sending only blocks whose digests differ from the previous map.

Digest algorithm: a chain of digest maps keeps the algorithm of its first map (an incremental asks the
host for the previous map's, and its new map records it); a new chain (a full read) takes the one the
host computes faster, measured on the host (:mod:`reconciler.esxi.hostdigest`): by the allocation
listing of the HTTPS read, by the program itself for one range, by the allocation listing once for
all the parallel ranges of a disk (they must agree), or ``BackupOptions.digest_algorithm`` if set.

Pipeline and memory: the transport reads on its own threads (<= 2 x streams pieces of 4 MiB in flight)
or the digest stream delivers 64 KiB blocks; the VM's thread assembles 1 MiB chunks
(:class:`~reconciler.operations.backup.assembler.ChunkAssembler`); the shared encode pool hashes,
compresses, encrypts and stores them (<= ``IN_FLIGHT_PER_DISK`` chunks per disk).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass, replace

from reconciler.esxi.errors import EsxiError, FullBackupNeededError
from reconciler.esxi.hostdigest import (
    ALGORITHMS,
    BLOCK_SIZE,
    DEFAULT_ALGORITHM,
    DIGEST_SIZE,
    ZERO_DIGEST,
    DigestResult,
    local_digests,
)
from reconciler.facts.inventory import BackupSnapshot, FrozenDisk
from reconciler.facts.points import DiskRecord, RestorePoint
from reconciler.killpoint import kill_point
from reconciler.operations.backup.assembler import ChunkAssembler, coalesce
from reconciler.operations.backup.context import BackupContext, BackupError, Cancelled, DiskResult
from reconciler.operations.ports import DiskSource
from reconciler.operations.progress import DiskProgress
from reconciler.planning.backup_mode import (
    CbtRefusal,
    DigestShape,
    DiskFacts,
    ModeChoice,
    PreviousDisk,
    PreviousMap,
    ReadMethod,
    choose_disk_mode,
)
from reconciler.repository import HOLE, ChunkWriter, DigestMap

DIGEST_SHAPES = tuple(DigestShape(name, BLOCK_SIZE, DIGEST_SIZE) for name in ALGORITHMS)
"""The shapes of the maps the host program (and :func:`local_digests`) computes, one per algorithm
(:data:`reconciler.esxi.hostdigest.ALGORITHMS`: ``blake2b-128``, the only one before hosts chose, and
``sha256-128``); a map of another algorithm is never compared (a full read, with the reason)."""


class _RangeAborted(Cancelled):
    """A parallel digest range stopped because another range failed."""


DIGEST_RANGE_MIN = 256 * 1024 * 1024
"""A disk is split into parallel digest ranges of at least this many bytes."""


def digest_ranges(capacity: int, chunk_size: int, streams: int) -> list[tuple[int, int]]:
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


@dataclass(frozen=True)
class _Reading:
    """The choice, once tried: what the chosen read needs."""

    choice: ModeChoice
    facts: DiskFacts
    areas: list[tuple[int, int]] | None = None
    """changed-areas, allocated-areas, whole-disk: what to read; None for the other reads."""
    digest_map: DigestMap | None = None
    """digest-compare: the previous point's map."""


class DiskJob:
    """One disk of a VM's backup, under the VM's snapshot, against the VM's previous point (if any)."""

    def __init__(
        self,
        ctx: BackupContext[DiskSource],
        snapshot: BackupSnapshot,
        disk: FrozenDisk,
        previous: RestorePoint | None,
    ) -> None:
        self.ctx = ctx
        self.snapshot = snapshot
        self.disk = disk
        self.previous = previous
        self.record: DiskRecord | None = None
        """The same disk (device key) in the previous point."""
        if previous is not None:
            self.record = next((d for d in previous.disks if d.key == disk.key), None)
        self.log = ctx.log.bind(disk=disk.label, key=disk.key)

    def facts(self) -> DiskFacts:
        """What the choice is made from (the previous digest map is read only once it is chosen)."""
        host, disk, rec, options = self.ctx.host, self.disk, self.record, self.ctx.options
        previous = None
        if rec is not None:
            previous = PreviousDisk(
                capacity=rec.capacity,
                change_id=rec.change_id,
                has_digest_map=rec.digest_map is not None,
                lost_chunks=self._lost_chunks(rec),
            )
        return DiskFacts(
            capacity=disk.capacity,
            change_id=disk.change_id,
            licensed=host.license == "licensed",
            ssh=host.ssh_enabled,
            digest_shapes=DIGEST_SHAPES,
            previous_point=self.previous.id if self.previous is not None else None,
            previous=previous,
            full_requested=options.full,
            https_allowed=options.transport in ("auto", "https"),
        )

    def _lost_chunks(self, rec: DiskRecord) -> int:
        """How many chunks the previous point's index needs that verify set aside and no backup has
        stored again since (an incremental would keep referencing them)."""
        repo = self.ctx.repo
        quarantined = repo.quarantined()
        if not quarantined:
            return 0
        needed = quarantined.intersection(repo.read_index(rec.index).referenced())
        return sum(1 for cid in needed if not repo.has_chunk(cid))

    def choose(self) -> _Reading:
        """Ask planning, try the answer, and ask again with what trying taught (module docstring)."""
        facts = self.facts()
        previous_map: DigestMap | None = None
        while True:
            choice = choose_disk_mode(facts)
            if choice.read in ("changed-areas", "allocated-areas"):
                since = "*"
                if choice.read == "changed-areas":
                    assert self.record is not None and self.record.change_id
                    since = self.record.change_id
                try:
                    areas = self.ctx.host.changed_areas(
                        self.snapshot.vm, self.snapshot.snapshot, self.disk, since
                    )
                except FullBackupNeededError as exc:
                    if choice.read == "changed-areas":
                        self.log.info("backup.cbt_refused", code=exc.reason, detail=str(exc))
                        facts = replace(facts, cbt_refused=CbtRefusal(exc.reason, str(exc)))
                    else:
                        self.log.info("backup.allocated_areas_unavailable", reason=str(exc))
                        facts = replace(facts, allocated_refused=True)
                    continue
                return _Reading(choice, facts, areas=coalesce(areas))
            if choice.read == "digest-compare":
                assert self.record is not None and self.record.digest_map and facts.previous is not None
                if previous_map is None:
                    previous_map = self.ctx.repo.read_digest_map(self.record.digest_map)
                    shape = DigestShape(
                        previous_map.algorithm, previous_map.block_size, previous_map.digest_size
                    )
                    seen = PreviousMap(shape, previous_map.capacity)
                    facts = replace(facts, previous=replace(facts.previous, digest_map=seen))
                    continue
                return _Reading(choice, facts, digest_map=previous_map)
            if choice.read == "whole-disk":
                return _Reading(choice, facts, areas=[(0, self.disk.capacity)])
            return _Reading(choice, facts)

    def run(self) -> tuple[DiskRecord, DiskResult]:
        started = time.monotonic()
        repo, disk = self.ctx.repo, self.disk
        reading = self.choose()
        choice = reading.choice
        if choice.fallback:
            # expected (first backup, CBT reset, capacity change): info, not a warning to alert on
            self.log.info("backup.fallback_full", reason=choice.fallback_reason)
        base = None
        if choice.mode != "full":
            assert self.record is not None
            base = repo.read_index(self.record.index)
            if choice.read == "digest-compare" and (
                base.digest_map is None or base.digest_map.hex() != self.record.digest_map
            ):
                raise BackupError(f"disk {disk.label}: previous index and digest map do not belong together")
        writer = repo.chunk_writer(disk.capacity, base=base)
        asm = ChunkAssembler(repo, writer, base, self.ctx.pool, cancel=self.ctx.cancel)
        total = disk.capacity if reading.areas is None else sum(n for _, n in reading.areas)
        progress = self.ctx.options.progress
        disk_progress = progress.disk(self.snapshot.vm.name, disk.label, total) if progress else None
        self.log.debug("backup.disk_start", mode=choice.mode, read=choice.read, bytes_to_walk=total)
        method: ReadMethod = choice.read
        digest_map = None
        try:
            https = self._https_full(asm, disk_progress) if method == "https-allocated" else None
            if method == "https-allocated" and https is None:
                method = choose_disk_mode(replace(reading.facts, https_refused=True)).read
            if https is not None:
                read, sent, digest_map = https
            elif method in ("digest-compare", "digest-program"):
                read, sent, digest_map = self._digest(reading.digest_map, asm, writer, disk_progress)
            else:
                assert reading.areas is not None
                read, sent = self._areas(reading.areas, asm, disk_progress)
                asm.finish()
        except BaseException:
            asm.drain()
            raise
        finally:
            if disk_progress is not None:
                disk_progress.done()
        index_id = writer.finish(digest_map)
        kill_point("backup.index-written")
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
            mode=choice.mode,
            reasons=choice.reasons,
        )
        result = DiskResult(
            disk.key,
            disk.label,
            choice.mode,
            choice.fallback_reason,
            disk.capacity,
            read,
            sent,
            writer.bytes_stored,
            seconds,
            reasons=choice.reasons,
        )
        self.log.info(
            "backup.disk_done",
            mode=choice.mode,
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
        reader = self.ctx.host.disk_reader(self.ctx.options.transport, streams=self.ctx.options.streams)
        try:
            for off, data in reader.read(self.disk.data_file, areas):
                if self.ctx.options.on_data is not None:
                    self.ctx.options.on_data(self.disk, off, len(data))
                asm.add(off, data)
                received += len(data)
                if progress is not None:
                    progress.advance(len(data))
        finally:
            reader.close()
        return received, received

    def _https_full(
        self, asm: ChunkAssembler, progress: DiskProgress | None
    ) -> tuple[int, int, DigestMap] | None:
        """A full read over parallel HTTPS Range streams (free hosts allow ``/folder`` reads) of the
        blocks the host lists as allocated (:meth:`DiskSource.allocation`, one SSH round trip; everything
        when it cannot tell), with the digest map computed here exactly as the host program would
        (:func:`~reconciler.esxi.hostdigest.local_digests`), so the next run can be a digest incremental.
        None (nothing read) when HTTPS is unavailable: the caller runs the digest program instead."""
        disk = self.disk
        try:
            reader = self.ctx.host.https_reader(self.ctx.options.streams)
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
            algorithm = DEFAULT_ALGORITHM  # when the host cannot be asked (it computes it everywhere)
            try:
                alloc = self.ctx.host.allocation(disk)
            except EsxiError as exc:
                self.log.info("backup.allocation_unavailable", reason=str(exc))
                areas = [(0, disk.capacity)]
            else:
                algorithm = alloc.algorithm
                if alloc.size != disk.capacity:
                    raise BackupError(
                        f"disk {disk.label}: {disk.data_file} has {alloc.size} bytes (host listing), the"
                        f" disk {disk.capacity}"
                    )
                areas = [(0, disk.capacity)] if alloc.ranges is None else alloc.ranges
                sent += 64 + 40 * len(alloc.ranges or [])  # the listing, roughly (program sent once)
            algorithm = self.ctx.options.digest_algorithm or algorithm
            digests = bytearray(-(-disk.capacity // BLOCK_SIZE) * DIGEST_SIZE)
            received = 0
            for off, data in reader.read(disk.data_file, areas):
                if self.ctx.options.on_data is not None:
                    self.ctx.options.on_data(disk, off, len(data))
                i = off // BLOCK_SIZE * DIGEST_SIZE
                entries = local_digests(data, algorithm)
                digests[i : i + len(entries)] = entries
                asm.add(off, data)
                received += len(data)
                if progress is not None:
                    progress.advance(len(data), off + len(data))
            asm.finish()
        finally:
            reader.close()
        self.log.debug("backup.https_full", areas=len(areas), bytes_read=received)
        dm = DigestMap(algorithm, BLOCK_SIZE, disk.capacity, DIGEST_SIZE, bytes(digests))
        return received, received + sent, dm

    def _digest(  # noqa: C901  the ranges, their threads and their assemblers share one result; each branch is a fallback the host may force
        self,
        previous_map: DigestMap | None,
        asm: ChunkAssembler,
        writer: ChunkWriter,
        progress: DiskProgress | None,
    ) -> tuple[int, int, DigestMap]:
        """The host program compares block digests with ``previous_map`` (None: a full read) and sends
        the blocks that differ, in parallel ranges on large disks, all with one algorithm (module doc)."""
        previous = previous_map.digests if previous_map is not None else None
        ranges = digest_ranges(self.disk.capacity, writer.index.chunk_size, self.ctx.options.digest_streams)
        algorithm = self.ctx.options.digest_algorithm
        if previous_map is not None:
            algorithm = previous_map.algorithm
        elif algorithm is None and len(ranges) > 1:
            algorithm = self._host_algorithm()
        # one assembler per range (ranges are chunk-aligned, so they never share a chunk); the first
        # range runs on this thread, the others on their own threads and SSH connections
        assemblers = [asm] + [
            ChunkAssembler(self.ctx.repo, writer, asm.base, self.ctx.pool, cancel=self.ctx.cancel)
            for _ in ranges[1:]
        ]
        abort = threading.Event()

        def compare(i: int) -> DigestResult:
            first, count = ranges[i]
            part = asm if i == 0 else assemblers[i]

            def on_block(offset: int, data: bytes) -> None:
                if abort.is_set():
                    raise _RangeAborted("another digest range failed")
                if self.ctx.options.on_data is not None:
                    self.ctx.options.on_data(self.disk, offset, len(data))
                part.add(offset, data)
                if progress is not None:
                    progress.advance(len(data), offset + len(data))

            prev = None
            if previous is not None:
                prev = previous[first * DIGEST_SIZE : (first + count) * DIGEST_SIZE]
            if len(ranges) == 1:
                res = self.ctx.host.digest_compare(self.disk, prev, on_block, algorithm=algorithm)
            else:
                res = self.ctx.host.digest_compare(
                    self.disk, prev, on_block, algorithm=algorithm, first_block=first, block_count=count
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
        used = {r.algorithm for r in results}
        if len(used) != 1 or (algorithm is not None and used != {algorithm}):
            raise BackupError(
                f"disk {self.disk.label}: the digest ranges answered with {sorted(used)}, not one algorithm"
            )
        (algorithm,) = used
        digests = b"".join(r.digests for r in results)
        if previous is not None:
            self._zero_blocks_that_became_zero(previous, digests, writer)
        dm = DigestMap(algorithm, BLOCK_SIZE, self.disk.capacity, DIGEST_SIZE, digests)
        read = sum(r.host_bytes_read for r in results)
        return read, sum(r.wire_bytes_in + r.wire_bytes_out for r in results), dm

    def _host_algorithm(self) -> str:
        """The algorithm the host computes faster, asked once for all the parallel ranges of a new chain
        (the allocation listing measures it); :data:`DEFAULT_ALGORITHM` when the host cannot say."""
        try:
            return self.ctx.host.allocation(self.disk).algorithm
        except EsxiError as exc:
            self.log.info("backup.digest_algorithm_unmeasured", reason=str(exc), algorithm=DEFAULT_ALGORITHM)
            return DEFAULT_ALGORITHM

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
        self.ctx.repo.flush()  # chunks written by this run become readable
        for slot, blocks in slots.items():
            current = writer.index[slot]
            if current == HOLE:
                continue
            data = bytearray(self.ctx.repo.read_chunk(current)[: writer.index.chunk_length(slot)])
            for b in blocks:
                a, end = b * BLOCK_SIZE, min(len(data), (b + 1) * BLOCK_SIZE)
                data[a:end] = bytes(end - a)
            writer.write(slot * writer.index.chunk_size, data)
        self.log.info("backup.zeroed_blocks", chunks=len(slots), blocks=sum(len(b) for b in slots.values()))
