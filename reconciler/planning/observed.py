"""What the reconciler saw: hosts, repositories and its own run history, at one instant.

These are plain frozen values, the input of the pure planner (:func:`reconciler.planning.plan.plan`)
next to the desired state. :mod:`reconciler.operations.observe` builds them (I/O); tests build them by hand.

An unreachable host or repository is an *observation* (``reachable=False`` with the error), never an
exception: the planner turns it into notices for that object's VMs and plans everything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from reconciler.facts.inventory import SNAPSHOT_PREFIX, DatastoreInfo, SnapshotInfo, VmInfo
from reconciler.facts.points import RestorePoint


@dataclass(frozen=True)
class HostObservation:
    """One host as observed. ``license`` is ``"free"`` or ``"licensed"`` (None if unreachable)."""

    name: str
    reachable: bool
    error: str | None = None
    license: str | None = None
    ssh_enabled: bool = True
    vms: tuple[VmInfo, ...] = ()
    datastores: tuple[DatastoreInfo, ...] = ()
    snapshot_prefix: str = SNAPSHOT_PREFIX
    unfinished_overwrites: tuple[tuple[str, str], ...] = ()
    """``(VM name, what to do)`` for each VM an interrupted ``restore --overwrite`` left powered off
    (its journal is still in the VM's folder)."""

    def vm(self, name: str) -> VmInfo | None:
        """The VM with this display name, or None."""
        return next((v for v in self.vms if v.name == name), None)

    def datastore(self, name: str) -> DatastoreInfo | None:
        return next((d for d in self.datastores if d.name == name), None)

    def is_ours(self, snapshot: SnapshotInfo) -> bool:
        """Whether the snapshot was made by esxi-reconciler (by name prefix, like the host layer)."""
        return snapshot.name.startswith(self.snapshot_prefix)


@dataclass(frozen=True)
class RepositoryObservation:
    """One repository as observed: its complete restore points (or why it could not be read), and the
    cheap signs of garbage waiting for a GC (:func:`reconciler.repository.garbage_signs`)."""

    name: str
    reachable: bool
    error: str | None = None
    points: tuple[RestorePoint, ...] = ()
    gc_interrupted: datetime | None = None
    """Start of a GC that did not complete (killed, or failed): its garbage is still there."""
    unreferenced_indexes: int = 0
    """Disk indexes no restore point references (a failed or killed backup, or an interrupted prune)."""
    capacity_bytes: int | None = None
    """Size of the volume holding the repository (None: not measured)."""
    free_bytes: int | None = None
    """Free space on that volume, for an unprivileged writer."""


@dataclass(frozen=True)
class RunRecord:
    """The reconciler's own memory of one scheduled job (from the status store).

    Keys (see :func:`backup_key`, :func:`verify_key`, :func:`copy_key`): ``backup/<policy>/<host>/<vm>``,
    ``verify/<verify policy>`` and ``copy/<copy policy>``. A failed attempt counts as a start for the
    schedule (a missed run is not repeated every loop); ``retry_after`` holds the next attempt back
    (exponential backoff).
    """

    last_started: datetime | None = None
    last_succeeded: datetime | None = None
    consecutive_failures: int = 0
    retry_after: datetime | None = None
    last_error: str | None = None


def backup_key(policy: str, host: str, vm: str) -> str:
    """The :class:`RunRecord` key of one VM's backups under one policy."""
    return f"backup/{policy}/{host}/{vm}"


def verify_key(verify_policy: str) -> str:
    """The :class:`RunRecord` key of a verify policy."""
    return f"verify/{verify_policy}"


def copy_key(copy_policy: str) -> str:
    """The :class:`RunRecord` key of a copy policy."""
    return f"copy/{copy_policy}"


def _frozen(mapping: Mapping[str, object] | None) -> Mapping[str, object]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class ObservedState:
    """Everything observed in one pass; ``time`` is when the pass started (UTC)."""

    time: datetime
    hosts: Mapping[str, HostObservation] = field(default_factory=dict)
    repositories: Mapping[str, RepositoryObservation] = field(default_factory=dict)
    history: Mapping[str, RunRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.time.tzinfo is None:
            raise ValueError("ObservedState.time must be timezone-aware")
        for name in ("hosts", "repositories", "history"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def unobserved(self) -> tuple[str, ...]:
        """What could not be looked at, one line each (``host esxi1: ...``): a plan made without it is
        incomplete, never "no changes" (``plan --detailed-exitcode`` exits 3)."""
        lines = [
            f"host {name}: {h.error or 'unreachable'}"
            for name, h in sorted(self.hosts.items())
            if not h.reachable
        ]
        lines += [
            f"repository {name}: {r.error or 'unreachable'}"
            for name, r in sorted(self.repositories.items())
            if not r.reachable
        ]
        return tuple(lines)

    def record(self, key: str) -> RunRecord:
        """The run record under ``key`` (an empty one if the job never ran)."""
        return self.history.get(key) or RunRecord()
