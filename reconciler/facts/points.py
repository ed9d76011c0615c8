"""Restore point records: what a repository holds for one VM at one moment (docs/repository-format.md §4.5).

Plain values shared by the repository (which stores them, :mod:`reconciler.repository.manifest` is the
JSON codec), the planner and retention: a :class:`RestorePoint` satisfies
:class:`reconciler.rules.retention.RestorePointLike` (``id``, ``time``, ``status``, ``protected``), so
retention evaluates the repository's own objects. Standard library only.
"""

from __future__ import annotations

import re
import secrets
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Literal

PointStatus = Literal["success", "partial", "failed"]
"""This version writes only ``success`` (a manifest is written last, once everything is stored; a failed
backup leaves no point). ``partial`` and ``failed`` are read, reserved for a writer that records
incomplete runs: never restored from, never an incremental's base, not counted by retention."""
BackupMode = Literal["full", "cbt", "digest"]
_STATUSES = ("success", "partial", "failed")
_MODES = ("full", "cbt", "digest")
POINT_ID_RE = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{8}$")


def new_point_id(when: datetime | None = None) -> str:
    """A sortable, unique point id: UTC time with microseconds, then 32 random bits."""
    moment = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return f"{moment:%Y%m%dT%H%M%S%f}Z-{secrets.token_hex(4)}"


def point_name(point_id: str) -> str:
    if not POINT_ID_RE.match(point_id):
        raise ValueError(f"invalid restore point id {point_id!r}")
    return f"points/{point_id}"


@dataclass(frozen=True)
class VmRef:
    """Which VM a point is of."""

    name: str
    uuid: str
    host: str
    vmid: str


@dataclass(frozen=True)
class StoredFile:
    """A VM configuration file (``.vmx``, ``.nvram``, disk descriptor) stored as chunks."""

    name: str
    size: int
    chunks: tuple[str, ...]
    """Chunk ids (hex) in order; holes are ``"0"*64``."""


@dataclass(frozen=True)
class DiskRecord:
    """One disk of a restore point."""

    key: int
    label: str
    file: str
    capacity: int
    index: str
    """Disk index id (hex)."""
    change_id: str | None = None
    digest_map: str | None = None
    bytes_read: int = 0
    bytes_sent: int = 0
    bytes_stored: int = 0
    mode: BackupMode | None = None
    """How this disk was read (None: written by a version that did not record it per disk)."""
    reasons: tuple[str, ...] = ()
    """Why that mode, in words for people (:mod:`reconciler.planning.backup_mode`)."""

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in _MODES:
            raise ValueError(f"invalid mode {self.mode!r}")


@dataclass(frozen=True)
class RestorePoint:
    """One VM at one moment; listed only once its manifest is written (complete)."""

    id: str
    policy: str
    vm: VmRef
    started: datetime
    snapshot_time: datetime
    finished: datetime
    status: PointStatus
    mode: BackupMode
    config_revision: str
    fallback_reason: str | None = None
    """Why a full read replaced an incremental, per disk (``"Hard disk 1: …"``); each disk's
    :attr:`DiskRecord.mode` and :attr:`DiskRecord.reasons` say more."""
    protected: bool = False
    files: tuple[StoredFile, ...] = ()
    disks: tuple[DiskRecord, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Unknown keys read from a newer writer of the same version (kept, not interpreted)."""

    def __post_init__(self) -> None:
        point_name(self.id)
        if self.status not in _STATUSES:
            raise ValueError(f"invalid status {self.status!r}")
        if self.mode not in _MODES:
            raise ValueError(f"invalid mode {self.mode!r}")
        for moment in (self.started, self.snapshot_time, self.finished):
            if moment.tzinfo is None:
                raise ValueError("restore point times must be timezone-aware")

    @property
    def time(self) -> datetime:
        """When the disks were frozen (retention's notion of a point's time)."""
        return self.snapshot_time

    @property
    def name(self) -> str:
        return point_name(self.id)

    @property
    def group(self) -> tuple[str, str]:
        """Retention group: (policy, VM uuid)."""
        return (self.policy, self.vm.uuid)

    def with_protected(self, protected: bool) -> RestorePoint:
        return replace(self, protected=protected)


def group_points(points: Iterable[RestorePoint]) -> dict[tuple[str, str], list[RestorePoint]]:
    """Points by retention group (policy, VM uuid), each list oldest first."""
    groups: dict[tuple[str, str], list[RestorePoint]] = defaultdict(list)
    for point in sorted(points, key=lambda p: p.id):
        groups[point.group].append(point)
    return dict(groups)
