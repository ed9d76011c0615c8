"""Deleting restore points the retention no longer keeps, then freeing the data nothing references.

The plan was made from points read earlier (a saved plan may be hours old), so :func:`prune` reads the
points again and applies its guards at execution time — never trusting the plan's list:

* a point that no longer exists is skipped (someone else pruned it);
* a protected point is refused;
* the newest successful point of its retention group (policy, VM) is refused, whatever the plan says;
* no more than ``max_deletions`` points are deleted per run (a wrong retention or a clock jump cannot
  wipe a repository in one go).

Deleting a manifest only makes data unreferenced; :func:`collect` frees it with
:func:`reconciler.repository.gc.collect_garbage` under the repository's **exclusive** lock. A backup
holds a shared lock for its whole run, so GC can never sweep a chunk a running backup relies on; when
one runs, GC waits (bounded) and is otherwise deferred to the next run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

from reconciler.facts.points import RestorePoint, group_points
from reconciler.repository.errors import LockedError, MissingObjectError, ProtectedPointError
from reconciler.repository.gc import DeletionProgress, GcReport, collect_garbage
from reconciler.repository.lock import list_locks
from reconciler.repository.repo import Repository

log = structlog.get_logger(__name__)

PruneOutcome = Literal["deleted", "gone", "refused"]
"""What became of one point asked to be deleted (not :class:`reconciler.rules.retention.Decision`, which
says whether retention keeps a point)."""


@dataclass(frozen=True)
class PruneResult:
    """What became of one point asked to be deleted (``reason`` says why it was not)."""

    point_id: str
    decision: PruneOutcome
    reason: str | None = None


def _newest_successful(points: list[RestorePoint]) -> set[str]:
    keep = set()
    for group in group_points(points).values():
        ok = [p for p in group if p.status == "success"]
        if ok:
            keep.add(max(ok, key=lambda p: (p.time, p.id)).id)
    return keep


def prune(repo: Repository, point_ids: Sequence[str], *, max_deletions: int) -> list[PruneResult]:
    """Delete ``point_ids`` (in order) subject to the guards of the module doc, under a shared lock.

    Returns one result per requested id, in the same order. Raises only for repository-wide problems
    (lock held exclusively, storage unreadable).
    """
    results: list[PruneResult] = []
    with repo.lock(purpose="prune"):
        current = {p.id: p for p in repo.list_points()}
        newest = _newest_successful(list(current.values()))
        deleted = 0
        for point_id in point_ids:
            point = current.get(point_id)
            if point is None:
                results.append(PruneResult(point_id, "gone", "restore point no longer exists"))
                continue
            if point.protected:
                results.append(PruneResult(point_id, "refused", "restore point is protected"))
                continue
            if point.id in newest:
                results.append(
                    PruneResult(
                        point_id,
                        "refused",
                        f"newest successful point of {point.policy}/{point.vm.name} is never pruned",
                    )
                )
                continue
            if deleted >= max_deletions:
                results.append(
                    PruneResult(point_id, "refused", f"max_deletions_per_run ({max_deletions}) reached")
                )
                continue
            try:
                repo.delete_point(point_id)
            except MissingObjectError:
                results.append(PruneResult(point_id, "gone", "restore point no longer exists"))
                continue
            except ProtectedPointError:  # protected since the list was read (`points protect`)
                results.append(PruneResult(point_id, "refused", "restore point is protected"))
                continue
            deleted += 1
            current.pop(point_id)
            log.info("prune.deleted", point=point_id, policy=point.policy, vm=point.vm.name)
            results.append(PruneResult(point_id, "deleted"))
    return results


def forget_refusal(point: RestorePoint, points: list[RestorePoint], *, force: bool = False) -> str | None:
    """Why ``points forget`` must not delete ``point`` (one of ``points``, the repository's), or None.

    A protected point is never forgotten (``points unprotect`` first); the newest successful point of
    its VM in its policy only with ``force`` — the same guards as :func:`prune`, the last one waivable
    because a person asked for this very point.
    """
    if point.protected:
        return (
            f"restore point {point.id} is protected; run `esxi-reconciler points unprotect {point.id}` first"
        )
    if not force and point.id in _newest_successful(points):
        return (
            f"restore point {point.id} is the newest successful point of VM {point.vm.name!r} (on"
            f" {point.vm.host}) in policy {point.policy}; give --force to forget it anyway"
        )
    return None


def forget(repo: Repository, point_ids: Sequence[str], *, force: bool = False) -> list[PruneResult]:
    """Delete the restore points ``point_ids`` now (``points forget``), each re-checked under a shared
    lock against :func:`forget_refusal`. Their data becomes unreferenced: GC (:func:`collect`) frees it.
    """
    results: list[PruneResult] = []
    with repo.lock(purpose="forget"):
        current = {p.id: p for p in repo.list_points()}
        for point_id in point_ids:
            point = current.get(point_id)
            if point is None:
                results.append(PruneResult(point_id, "gone", "restore point no longer exists"))
                continue
            refusal = forget_refusal(point, list(current.values()), force=force)
            if refusal is not None:
                results.append(PruneResult(point_id, "refused", refusal))
                continue
            try:
                repo.delete_point(point_id)
            except MissingObjectError:
                results.append(PruneResult(point_id, "gone", "restore point no longer exists"))
                continue
            except ProtectedPointError:
                results.append(PruneResult(point_id, "refused", f"restore point {point_id} is protected"))
                continue
            current.pop(point_id)
            log.info("points.forgotten", point=point_id, policy=point.policy, vm=point.vm.name, force=force)
            results.append(PruneResult(point_id, "deleted"))
    return results


@dataclass(frozen=True)
class GcResult:
    """GC's report, or why it did not run (``deferred``)."""

    report: GcReport | None
    deferred: str | None = None
    waited: float = 0.0


def collect(
    repo: Repository,
    *,
    wait_seconds: float = 300.0,
    poll_seconds: float = 5.0,
    cancel: threading.Event | None = None,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    dry_run: bool = False,
    progress: DeletionProgress | None = None,
) -> GcResult:
    """Run GC when the exclusive lock can be had within ``wait_seconds``; else defer it.

    A running backup (shared lock) makes the exclusive lock fail: GC polls every ``poll_seconds``
    and, at the bound or on ``cancel``, returns ``deferred`` with the holder named. Nothing is swept
    unless the exclusive lock is held. ``dry_run``: count what would go, delete nothing.
    """
    cancel = cancel or threading.Event()
    started = clock()
    while True:
        try:
            report = collect_garbage(repo, dry_run=dry_run, progress=progress)
        except LockedError as exc:
            waited = clock() - started
            if waited >= wait_seconds or cancel.is_set():
                busy = any(not info.exclusive for info in list_locks(repo.backend))
                what = "backup running" if busy else "repository locked"
                log.info("gc.deferred", reason=str(exc), waited=round(waited, 1))
                return GcResult(None, f"{what}; GC deferred ({exc})", waited)
            log.info("gc.waiting", reason=str(exc))
            pause = min(poll_seconds, max(0.0, wait_seconds - waited))
            if sleep is not None:
                sleep(pause)
            else:
                cancel.wait(pause)
            continue
        log.info(
            "gc.done",
            dry_run=dry_run,
            chunks=report.unreferenced_chunks,
            bytes=report.unreferenced_bytes,
            indexes=report.unreferenced_indexes,
            tmp_files=report.tmp_files,
            interrupted_at=report.interrupted_at.isoformat() if report.interrupted_at else None,
        )
        return GcResult(report, None, clock() - started)
