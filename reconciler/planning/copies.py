"""Which restore points a copy goes for, and which copy policy's retention governs a point in its
destination. Pure: the planner (:mod:`reconciler.planning.plan`) and ``repo copy``
(:mod:`reconciler.operations.copy`) decide with the same rules.

A copy policy copies the successful points of its source that its filters select (``policies``,
``vms`` globs, ``max_age``) and that its destination lacks, but only those the destination's retention
(the copy policy's ``retention``) would keep next to what the destination already holds: a point the
destination pruned is not copied back on the next run.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime

from reconciler.config.model import CopyPolicy, DesiredState
from reconciler.facts.points import RestorePoint
from reconciler.rules.retention import evaluate


def select_points(
    points: Iterable[RestorePoint],
    *,
    vms: Sequence[str] = (),
    policies: Sequence[str] = (),
    since: datetime | None = None,
) -> list[RestorePoint]:
    """The successful points to copy, oldest first: VM names matching one of ``vms`` (globs; empty: all),
    made by one of ``policies`` (empty: all), taken at or after ``since``."""
    chosen = []
    for point in points:
        if point.status != "success":
            continue  # never restored from, never the base of anything: not worth a copy
        if not _matches(point, vms, policies):
            continue
        if since is not None and point.time < since:
            continue
        chosen.append(point)
    return sorted(chosen, key=lambda p: (p.time, p.id))


def _matches(point: RestorePoint, vms: Sequence[str], policies: Sequence[str]) -> bool:
    if vms and not any(fnmatch.fnmatchcase(point.vm.name, pattern) for pattern in vms):
        return False
    return not policies or point.policy in policies


def governing_copy(desired: DesiredState, repository: str, point: RestorePoint) -> CopyPolicy | None:
    """The copy policy (first by name, suspended ones too) that brings ``point``'s kind of points into
    ``repository``, so whose retention prunes them there; None when no copy policy does."""
    for copy in desired.copy_policies.values():
        if copy.destination == repository and _matches(point, copy.vms, copy.policies):
            return copy
    return None


def points_to_copy(
    policy: CopyPolicy, source: Iterable[RestorePoint], destination: Iterable[RestorePoint], now: datetime
) -> list[RestorePoint]:
    """The points of ``source`` the copy policy sends now (see the module doc), oldest first."""
    since = now - policy.max_age if policy.max_age is not None else None
    present = {p.id for p in destination}
    missing = [
        p
        for p in select_points(source, vms=policy.vms, policies=policy.policies, since=since)
        if p.id not in present
    ]
    if not missing:
        return []
    groups: dict[tuple[str, str], list[RestorePoint]] = defaultdict(list)
    for point in destination:
        if _matches(point, policy.vms, policy.policies):
            groups[point.group].append(point)
    for point in missing:
        groups[point.group].append(point)
    kept: set[str] = set()
    for points in groups.values():
        kept.update(d.point.id for d in evaluate(points, policy.retention) if d.keep)
    return [p for p in missing if p.id in kept]
