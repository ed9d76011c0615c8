"""Garbage collection (docs/repository-format.md §8): mark from every manifest, sweep the rest.

Runs under an **exclusive** lock, so no backup is writing meanwhile: a chunk a running backup skipped as
"already stored" can never be swept from under it, and every index or digest map that no manifest
references is the leftover of an interrupted backup.

A GC that is killed half-way must not leave its garbage for ever: :data:`GC_MARKER` is written when a
GC starts and removed only when it completes, so the next observation sees "a GC was interrupted at
<time>" (:func:`read_gc_marker`) and the planner runs one again. :func:`garbage_signs` is the cheap look
(no chunk listing, no index read) the planner gets: that marker, and disk indexes no point references.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import structlog

from reconciler.facts.points import RestorePoint
from reconciler.repository.backend import ObjectInfo, fsync_dir
from reconciler.repository.chunks import chunk_name
from reconciler.repository.errors import FormatError, MissingObjectError, RepositoryError, StorageError
from reconciler.repository.lock import RepositoryLock, list_locks, pid_alive, stale_staged_files
from reconciler.repository.repo import Repository

log = structlog.get_logger(__name__)

GC_MARKER = "gc-running.json"
"""Present while a GC runs, and after one that was killed or failed (§8); plaintext JSON."""
GC_MARKER_VERSION = 1

DeletionProgress = Callable[[int, int], None]
"""Called after each deletion with (deleted so far, to delete)."""


@dataclass(frozen=True)
class GcMarker:
    """The content of :data:`GC_MARKER`: when and by whom the unfinished GC was started."""

    started: datetime
    host: str = ""
    pid: int = 0
    lock: str = ""

    def to_json(self) -> bytes:
        doc = {
            "version": GC_MARKER_VERSION,
            "started": self.started.isoformat(timespec="microseconds"),
            "host": self.host,
            "pid": self.pid,
            "lock": self.lock,
        }
        return json.dumps(doc).encode("utf-8")


def read_gc_marker(repo: Repository) -> GcMarker | None:
    """The marker of a GC that started and did not complete, or None. A marker that does not parse
    still means that (its time is then the file's modification time)."""
    try:
        data = repo.backend.get(GC_MARKER)
    except MissingObjectError:
        return None
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != GC_MARKER_VERSION:
            raise ValueError("not a version-1 GC marker")
        started = datetime.fromisoformat(str(doc["started"]))
        if started.tzinfo is None:
            started = started.replace(tzinfo=timezone.utc)
        return GcMarker(started, str(doc.get("host", "")), int(doc.get("pid", 0)), str(doc.get("lock", "")))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        try:
            mtime = repo.backend.stat(GC_MARKER).mtime
        except MissingObjectError:
            return None
        return GcMarker(datetime.fromtimestamp(mtime, timezone.utc))


@dataclass
class GcReport:
    """What GC found (and, unless ``dry_run``, deleted)."""

    dry_run: bool
    points: int = 0
    referenced_chunks: int = 0
    unreferenced_chunks: int = 0
    unreferenced_bytes: int = 0
    """Bytes of the unreferenced chunks."""
    unreferenced_indexes: int = 0
    unreferenced_digest_maps: int = 0
    tmp_files: int = 0
    """Staged files in ``tmp/`` left by writers that are gone (§7.1)."""
    tmp_bytes: int = 0
    interrupted_at: datetime | None = None
    """Start of an earlier GC that did not complete (its marker was found); this one completes it."""
    deleted: list[str] = field(default_factory=list, repr=False)
    """Names deleted (or that would be, in a dry run)."""

    def to_dict(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "points": self.points,
            "referenced_chunks": self.referenced_chunks,
            "unreferenced_chunks": self.unreferenced_chunks,
            "unreferenced_bytes": self.unreferenced_bytes,
            "unreferenced_indexes": self.unreferenced_indexes,
            "unreferenced_digest_maps": self.unreferenced_digest_maps,
            "tmp_files": self.tmp_files,
            "tmp_bytes": self.tmp_bytes,
            "interrupted_at": self.interrupted_at.isoformat() if self.interrupted_at else None,
        }


def collect_garbage(
    repo: Repository,
    *,
    dry_run: bool = False,
    lock: RepositoryLock | None = None,
    progress: DeletionProgress | None = None,
) -> GcReport:
    """Delete unreferenced chunks, indexes and digest maps, and the staged files of writers that are gone.

    Takes an exclusive lock unless an exclusive ``lock`` already held is passed (a dry run's lock
    leaves stale lock files alone: it deletes nothing). Without a lock given, stale staged files are
    removed first, before the lock file is written — on a full volume that is what makes room for it.
    If any manifest or index cannot be read, nothing is swept (the error propagates): GC never guesses
    what is unreferenced.
    """
    if lock is not None:
        if not (lock.held and lock.exclusive):
            raise ValueError("collect_garbage needs an exclusive lock that is held")
        return _collect(repo, dry_run, lock, progress)
    report = GcReport(dry_run=dry_run)
    if not dry_run:
        _count_tmp(report, repo.remove_stale_staged())
    purpose = "gc (dry run)" if dry_run else "gc"
    with repo.lock(exclusive=True, purpose=purpose, remove_stale=not dry_run) as held:
        return _collect(repo, dry_run, held, progress, report)


def _count_tmp(report: GcReport, staged: list[ObjectInfo]) -> None:
    for info in staged:
        report.tmp_files += 1
        report.tmp_bytes += info.size
        report.deleted.append(info.name)


def _write_marker(repo: Repository, lock: RepositoryLock) -> None:
    assert lock.info is not None
    marker = GcMarker(datetime.now(timezone.utc), socket.gethostname(), os.getpid(), lock.info.id)
    try:
        repo.backend.replace(GC_MARKER, [marker.to_json()])
    except StorageError as exc:
        # GC is what frees space: it goes on; only a kill of this very GC would go unnoticed
        log.warning("gc.marker_not_written", repository=str(repo.path), error=str(exc))


def _collect(
    repo: Repository,
    dry_run: bool,
    lock: RepositoryLock,
    progress: DeletionProgress | None,
    report: GcReport | None = None,
) -> GcReport:
    report = report or GcReport(dry_run=dry_run)
    marker = read_gc_marker(repo)
    report.interrupted_at = marker.started if marker is not None else None
    if not dry_run:
        _write_marker(repo, lock)
    points = repo.list_points()
    report.points = len(points)
    chunks, indexes, digests = repo.referenced(points)  # mark
    report.referenced_chunks = len(chunks)

    doomed: list[str] = []
    for cid in repo.iter_chunk_ids():
        if cid not in chunks:
            name = chunk_name(cid)
            try:
                report.unreferenced_bytes += repo.backend.stat(name).size
            except MissingObjectError:
                continue
            report.unreferenced_chunks += 1
            doomed.append(name)
    for name in repo.backend.list("indexes"):
        if name not in indexes:
            report.unreferenced_indexes += 1
            doomed.append(name)
    for name in repo.backend.list("digests"):
        if name not in digests:
            report.unreferenced_digest_maps += 1
            doomed.append(name)
    # no other process holds a lock now: every staged file not of a live process is a leftover
    leftovers = stale_staged_files(repo.backend, own=lock.info)
    _count_tmp(report, leftovers)
    report.deleted.extend(doomed)
    doomed.extend(info.name for info in leftovers)

    if dry_run:
        return report
    lock.check()  # a lost lock (removed as stale) means a backup may be writing: sweep nothing
    for done, name in enumerate(doomed, 1):  # sweep
        repo.backend.delete(name)
        if progress is not None:
            progress(done, len(doomed))
        if done % 1024 == 0:
            lock.check()
    repo.backend.delete(GC_MARKER)  # completed: the marker goes last
    fsync_dir(repo.path)
    return report


@dataclass(frozen=True)
class GarbageSigns:
    """What a cheap look (no chunk listing, no index read) tells about garbage waiting for GC."""

    gc_interrupted: datetime | None = None
    """Start of a GC that did not complete (:data:`GC_MARKER` left behind)."""
    unreferenced_indexes: int = 0
    """Disk indexes no restore point references: a failed or killed backup, or points deleted without
    the GC that should have followed. 0 when another process held a lock (it may be writing one)."""


def garbage_signs(repo: Repository, points: list[RestorePoint], lock: RepositoryLock) -> GarbageSigns:
    """Signs of garbage in ``repo``, whose ``points`` were just read under ``lock`` (shared or exclusive).

    Indexes are listed after the points, then the locks are read: an index seen without its manifest
    while no other process holds a lock either belongs to a writer that finished in between — its
    manifest is then found by listing the point ids again — or is garbage. Costs a listing of
    ``indexes/`` and ``points/``, never a chunk.
    """
    marker = read_gc_marker(repo)
    started = marker.started if marker is not None else None
    referenced = {f"indexes/{disk.index}" for point in points for disk in point.disks}
    unreferenced = [name for name in repo.backend.list("indexes") if name not in referenced]
    if not unreferenced:
        return GarbageSigns(started, 0)
    now = datetime.now(timezone.utc)
    here = socket.gethostname()
    own = lock.info.id if lock.info is not None else None
    if any(info.id != own and not info.is_stale(now, here, pid_alive) for info in list_locks(repo.backend)):
        return GarbageSigns(started, 0)
    known = {point.id for point in points}
    for point_id in repo.point_ids():
        if point_id in known:
            continue
        try:
            point = repo.read_point(point_id)
        except (MissingObjectError, FormatError, RepositoryError):
            continue  # deleted meanwhile, or damaged: verify reports that, GC refuses to sweep then
        referenced.update(f"indexes/{disk.index}" for disk in point.disks)
    return GarbageSigns(started, sum(1 for name in unreferenced if name not in referenced))
