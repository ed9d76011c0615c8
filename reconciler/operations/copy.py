"""Copying restore points from one repository to another (off-site copies, like Proxmox Backup Server's
sync jobs): local to S3, S3 to local, between two buckets.

Incremental and resumable by construction (docs/repository-format.md §13):

* A point keeps its id in the destination; a point whose manifest is already there is skipped, so a
  copy that was interrupted resumes where it stopped — the manifest is written last, after every chunk
  and index of the point, exactly as a backup writes it.
* Only chunks the destination lacks are uploaded. When both repositories name chunks alike (both plain,
  or encrypted with the same key) the stored blobs are copied as they are, after decoding them once to
  check them; otherwise each chunk is decrypted, re-encrypted (and re-named) with the destination's key,
  and the disk indexes are rewritten with the new ids. For the same VM's next point, the pair (source
  index, destination index) of the point copied before maps unchanged chunks without reading them.
* After writing a point the destination's manifest, indexes and digest maps are read back and every
  chunk the point references is checked to exist there; a failed check fails the copy of that point.

Both repositories are held under a shared lock for the whole copy (GC of either waits).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import structlog

from reconciler.facts.points import RestorePoint, StoredFile
from reconciler.planning.copies import select_points
from reconciler.repository.chunks import HOLE, chunk_name
from reconciler.repository.errors import RepositoryError
from reconciler.repository.index import DiskIndex
from reconciler.repository.repo import Repository

log = structlog.get_logger(__name__)

WORKERS = 8
"""Chunks read (and re-encoded) at once: object storage answers each GET after a round trip."""
_PROBE = b"esxi-reconciler chunk naming probe"


@dataclass
class PointCopy:
    """What became of one point: ``copied`` (and verified), ``present`` (there already) or ``failed``."""

    point_id: str
    vm: str
    policy: str
    time: datetime
    decision: str
    chunks_uploaded: int = 0
    bytes_uploaded: int = 0
    chunks_present: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "point": self.point_id,
            "vm": self.vm,
            "policy": self.policy,
            "time": self.time.isoformat(),
            "decision": self.decision,
            "chunks_uploaded": self.chunks_uploaded,
            "bytes_uploaded": self.bytes_uploaded,
            "chunks_present": self.chunks_present,
            "error": self.error,
        }


@dataclass
class CopyReport:
    """One copy run from ``source`` to ``destination`` (their locations)."""

    source: str
    destination: str
    reencrypted: bool
    points: list[PointCopy] = field(default_factory=list)
    seconds: float = 0.0
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return all(p.decision != "failed" for p in self.points)

    def count(self, decision: str) -> int:
        return sum(1 for p in self.points if p.decision == decision)

    @property
    def bytes_uploaded(self) -> int:
        return sum(p.bytes_uploaded for p in self.points)

    @property
    def chunks_uploaded(self) -> int:
        return sum(p.chunks_uploaded for p in self.points)

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "destination": self.destination,
            "reencrypted": self.reencrypted,
            "copied": self.count("copied"),
            "present": self.count("present"),
            "failed": self.count("failed"),
            "chunks_uploaded": self.chunks_uploaded,
            "bytes_uploaded": self.bytes_uploaded,
            "seconds": round(self.seconds, 3),
            "points": [p.to_dict() for p in self.points],
        }


def same_chunk_names(source: Repository, destination: Repository) -> bool:
    """Whether both repositories give the same data the same chunk id and can read each other's blobs
    (both plain, or encrypted with the same master key): then blobs are copied unchanged."""
    if source.encrypted != destination.encrypted:
        return False
    return source.chunk_id(_PROBE) == destination.chunk_id(_PROBE)


class _Copier:
    """Copies points of one run; holds the id map of the re-encrypting mode."""

    def __init__(self, src: Repository, dst: Repository, workers: int) -> None:
        self.src = src
        self.dst = dst
        self.raw = same_chunk_names(src, dst)
        self.workers = workers
        self.ids: dict[bytes, bytes] = {HOLE: HOLE}
        """Source chunk id -> destination chunk id (re-encrypting mode)."""
        self._lock = threading.Lock()
        self.uploaded = 0
        self.uploaded_bytes = 0
        self.present = 0

    # -- chunks --------------------------------------------------------------------------------------

    def _chunk(self, cid: bytes) -> bytes:
        """Make the source chunk ``cid`` present in the destination; its destination id."""
        if cid == HOLE:
            return HOLE
        if self.raw:
            name = chunk_name(cid)
            if self.dst.has_chunk(cid):
                self._count(0)
                return cid
            blob = self.src.backend.get(name)
            self.src.codec.decode_chunk(cid, blob)  # a damaged source chunk is not spread further
            if self.dst.backend.put_deferred(name, [blob]):
                self._count(len(blob))
            else:
                self._count(0)
            return cid
        with self._lock:
            known = self.ids.get(cid)
        if known is not None and self.dst.has_chunk(known):
            self._count(0)
            return known
        result = self.dst.write_chunk(self.src.read_chunk(cid))
        self._count(result.stored if result.new else 0)
        with self._lock:
            self.ids[cid] = result.id
        return result.id

    def _count(self, stored: int) -> None:
        with self._lock:
            if stored:
                self.uploaded += 1
                self.uploaded_bytes += stored
            else:
                self.present += 1

    def _chunks(self, ids: Sequence[bytes], pool: ThreadPoolExecutor) -> list[bytes]:
        return list(pool.map(self._chunk, ids))

    # -- one point -----------------------------------------------------------------------------------

    def learn(self, src_point: RestorePoint, dst_point: RestorePoint) -> None:
        """Re-encrypting mode: map the chunks of a point copied earlier (slot by slot), so unchanged
        chunks of the next point of the same VM need no read."""
        if self.raw:
            return
        by_key = {disk.key: disk for disk in dst_point.disks}
        for disk in src_point.disks:
            other = by_key.get(disk.key)
            if other is None:
                continue
            a, b = self.src.read_index(disk.index), self.dst.read_index(other.index)
            if a.count != b.count:
                continue
            with self._lock:
                for slot in range(a.count):
                    self.ids.setdefault(a[slot], b[slot])

    def copy(self, point: RestorePoint, pool: ThreadPoolExecutor) -> RestorePoint:
        """Chunks, digest maps and indexes of every disk, the files, then the manifest (last)."""
        disks = []
        for disk in point.disks:
            index = self.src.read_index(disk.index)
            ids = self._chunks(list(index), pool)
            new_index = DiskIndex(index.capacity, index.chunk_size, bytearray(b"".join(ids)))
            source_map = disk.digest_map or (index.digest_map.hex() if index.digest_map else None)
            digest_map = None
            if source_map is not None:  # the host's block digests: the same in any repository
                digest_map = self.dst.write_digest_map(self.src.read_digest_map(source_map))
                new_index.digest_map = bytes.fromhex(digest_map)
            index_id = self.dst.write_index(new_index)  # flushes the chunks first
            disks.append(replace(disk, index=index_id, digest_map=digest_map if disk.digest_map else None))
        files = []
        for stored in point.files:
            ids = self._chunks([bytes.fromhex(c) for c in stored.chunks], pool)
            files.append(StoredFile(stored.name, stored.size, tuple(c.hex() for c in ids)))
        extra = dict(point.extra)
        extra["copied_from"] = {
            "repository": self.src.id,
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        copied = replace(point, disks=tuple(disks), files=tuple(files), extra=extra)
        self.dst.write_point(copied)  # flushes, then the manifest: from now on the point is listed
        return copied


def verify_copy(dst: Repository, point_id: str) -> None:
    """Read the copied point back from ``dst``: manifest, indexes, digest maps, and that every chunk it
    references exists. Raises :class:`RepositoryError` naming what is wrong."""
    point = dst.read_point(point_id)
    needed: set[bytes] = set()
    for stored in point.files:
        needed.update(bytes.fromhex(c) for c in stored.chunks)
    for disk in point.disks:
        index = dst.read_index(disk.index)
        if index.capacity != disk.capacity:
            raise RepositoryError(f"copied point {point_id}: index of {disk.label} has the wrong capacity")
        if index.digest_map is not None:
            dst.read_digest_map(index.digest_map.hex())
        needed.update(index.referenced())
    needed.discard(HOLE)
    missing = [cid for cid in needed if not dst.has_chunk(cid)]
    if missing:
        raise RepositoryError(
            f"copied point {point_id}: {len(missing)} chunks are missing in the destination after the copy"
            f" (e.g. {missing[0].hex()[:12]}…)"
        )


Progress = Callable[[PointCopy], None]


def copy_points(  # noqa: PLR0913  the two repositories plus keyword-only selection and hooks, all defaulted
    src: Repository,
    dst: Repository,
    *,
    vms: Sequence[str] = (),
    policies: Sequence[str] = (),
    since: datetime | None = None,
    point_ids: Collection[str] | None = None,
    purpose: str = "copy",
    progress: Progress | None = None,
    workers: int = WORKERS,
    cancel: threading.Event | None = None,
) -> CopyReport:
    """Copy the selected points of ``src`` that ``dst`` lacks (see the module doc); one report.
    ``point_ids`` narrows the selection to those points (a copy policy's plan names them); ``cancel``
    stops between points (the report says ``cancelled``).

    A point that fails is reported and the next one is tried; a repository-wide failure (a lock held
    exclusively, an unreachable store, a refused write) raises.
    """
    started = time.monotonic()
    copier = _Copier(src, dst, workers)
    report = CopyReport(src.location, dst.location, reencrypted=not copier.raw)
    with src.lock(purpose=f"{purpose} (source)"), dst.lock(purpose=purpose), dst.discard_pending_on_exit():
        present = set(dst.point_ids())
        wanted = select_points(src.list_points(), vms=vms, policies=policies, since=since)
        if point_ids is not None:
            wanted = [p for p in wanted if p.id in point_ids]
        previous: dict[str, RestorePoint] = {}
        with ThreadPoolExecutor(workers, thread_name_prefix="copy") as pool:
            for point in wanted:
                if cancel is not None and cancel.is_set():
                    report.cancelled = True
                    break
                base = previous.get(point.vm.uuid)
                if point.id in present:
                    report.points.append(
                        PointCopy(point.id, point.vm.name, point.policy, point.time, "present")
                    )
                    previous[point.vm.uuid] = point
                    _emit(progress, report.points[-1])
                    continue
                result = PointCopy(point.id, point.vm.name, point.policy, point.time, "copied")
                before = (copier.uploaded, copier.uploaded_bytes, copier.present)
                try:
                    if base is not None and base.id in present:
                        copier.learn(base, dst.read_point(base.id))
                    copier.copy(point, pool)
                    verify_copy(dst, point.id)
                    present.add(point.id)
                    previous[point.vm.uuid] = point
                except (RepositoryError, OSError) as exc:
                    if _repository_wide(exc):
                        raise
                    result.decision = "failed"
                    result.error = str(exc)
                    dst.discard_pending()
                    log.warning("copy.point_failed", point=point.id, vm=point.vm.name, error=str(exc))
                result.chunks_uploaded = copier.uploaded - before[0]
                result.bytes_uploaded = copier.uploaded_bytes - before[1]
                result.chunks_present = copier.present - before[2]
                report.points.append(result)
                _emit(progress, result)
    report.seconds = time.monotonic() - started
    return report


def _repository_wide(exc: BaseException) -> bool:
    """A failure no other point would escape: the store refuses writes, is unreachable, the lock is lost."""
    from reconciler.repository.errors import LockedError, ObjectStoreUnavailable, StorageError

    return isinstance(exc, StorageError | ObjectStoreUnavailable | LockedError)


def _emit(progress: Progress | None, item: PointCopy) -> None:
    if progress is not None:
        progress(item)
