"""Garbage collection (docs/repository-format.md §8): mark from every manifest, sweep the rest.

Runs under an **exclusive** lock, so no backup is writing meanwhile: a chunk a running backup skipped as
"already stored" can never be swept from under it, and every index or digest map that no manifest
references is the leftover of an interrupted backup.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from reconciler.repository.backend import TMP_DIR
from reconciler.repository.chunks import chunk_name
from reconciler.repository.errors import MissingObjectError
from reconciler.repository.lock import RepositoryLock
from reconciler.repository.repo import Repository

DEFAULT_TMP_MAX_AGE_HOURS = 24.0


@dataclass
class GcReport:
    """What GC found (and, unless ``dry_run``, deleted)."""

    dry_run: bool
    points: int = 0
    referenced_chunks: int = 0
    unreferenced_chunks: int = 0
    unreferenced_bytes: int = 0
    unreferenced_indexes: int = 0
    unreferenced_digest_maps: int = 0
    tmp_files: int = 0
    deleted: list[str] = field(default_factory=list, repr=False)
    """Names deleted (or that would be, in a dry run)."""


def collect_garbage(
    repo: Repository,
    *,
    dry_run: bool = False,
    tmp_max_age_hours: float = DEFAULT_TMP_MAX_AGE_HOURS,
    lock: RepositoryLock | None = None,
    now: float | None = None,
) -> GcReport:
    """Delete unreferenced chunks, indexes and digest maps, and ``tmp/`` files older than the limit.

    Takes an exclusive lock unless an exclusive ``lock`` already held is passed. If any manifest or index
    cannot be read, nothing is swept (the error propagates): GC never guesses what is unreferenced.
    """
    if lock is not None:
        if not (lock.held and lock.exclusive):
            raise ValueError("collect_garbage needs an exclusive lock that is held")
        return _collect(repo, dry_run, tmp_max_age_hours, now)
    with repo.lock(exclusive=True, purpose="gc"):
        return _collect(repo, dry_run, tmp_max_age_hours, now)


def _collect(repo: Repository, dry_run: bool, tmp_max_age_hours: float, now: float | None) -> GcReport:
    report = GcReport(dry_run=dry_run)
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
    cutoff = (time.time() if now is None else now) - tmp_max_age_hours * 3600
    for name in repo.backend.list(TMP_DIR):
        try:
            if repo.backend.stat(name).mtime < cutoff:
                report.tmp_files += 1
                doomed.append(name)
        except MissingObjectError:
            continue

    report.deleted = doomed
    if not dry_run:
        for name in doomed:  # sweep
            repo.backend.delete(name)
    return report
