"""Restore point manifests (docs/repository-format.md §4.5).

A :class:`RestorePoint` satisfies :class:`reconciler.rules.retention.RestorePointLike` (``id``, ``time``,
``status``, ``protected``), so retention can evaluate the repository's own objects.
"""

from __future__ import annotations

import json
import re
import secrets
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Literal

MANIFEST_VERSION = 1
PointStatus = Literal["success", "partial", "failed"]
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

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = dict(self.extra)
        doc.update(
            {
                "version": MANIFEST_VERSION,
                "id": self.id,
                "policy": self.policy,
                "vm": {
                    "name": self.vm.name,
                    "uuid": self.vm.uuid,
                    "host": self.vm.host,
                    "vmid": self.vm.vmid,
                },
                "started": self.started.isoformat(timespec="microseconds"),
                "snapshot_time": self.snapshot_time.isoformat(timespec="microseconds"),
                "finished": self.finished.isoformat(timespec="microseconds"),
                "status": self.status,
                "mode": self.mode,
                "fallback_reason": self.fallback_reason,
                "config_revision": self.config_revision,
                "protected": self.protected,
                "files": [{"name": f.name, "size": f.size, "chunks": list(f.chunks)} for f in self.files],
                "disks": [
                    {
                        "key": d.key,
                        "label": d.label,
                        "file": d.file,
                        "capacity": d.capacity,
                        "index": d.index,
                        "change_id": d.change_id,
                        "digest_map": d.digest_map,
                        "bytes_read": d.bytes_read,
                        "bytes_sent": d.bytes_sent,
                        "bytes_stored": d.bytes_stored,
                    }
                    for d in self.disks
                ],
            }
        )
        return doc

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, name: str, data: bytes) -> RestorePoint:
        """Parse a manifest; :class:`FormatError` naming ``name`` for anything unexpected."""
        from reconciler.repository.errors import FormatError  # moves to repository/ with the codec

        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise FormatError(f"{name}: manifest is not valid JSON") from None
        if not isinstance(doc, dict):
            raise FormatError(f"{name}: manifest is not a JSON object")
        if doc.get("version") != MANIFEST_VERSION:
            raise FormatError(f"{name}: unsupported manifest version {doc.get('version')!r}")
        try:
            vm = doc["vm"]
            point = cls(
                id=str(doc["id"]),
                policy=str(doc["policy"]),
                vm=VmRef(str(vm["name"]), str(vm["uuid"]), str(vm["host"]), str(vm["vmid"])),
                started=_time(doc["started"]),
                snapshot_time=_time(doc["snapshot_time"]),
                finished=_time(doc["finished"]),
                status=doc["status"],
                mode=doc["mode"],
                config_revision=str(doc["config_revision"]),
                fallback_reason=_opt_str(doc.get("fallback_reason")),
                protected=bool(doc.get("protected", False)),
                files=tuple(
                    StoredFile(str(f["name"]), int(f["size"]), tuple(str(c) for c in f["chunks"]))
                    for f in doc.get("files", [])
                ),
                disks=tuple(
                    DiskRecord(
                        key=int(d["key"]),
                        label=str(d["label"]),
                        file=str(d["file"]),
                        capacity=int(d["capacity"]),
                        index=str(d["index"]),
                        change_id=_opt_str(d.get("change_id")),
                        digest_map=_opt_str(d.get("digest_map")),
                        bytes_read=int(d.get("bytes_read", 0)),
                        bytes_sent=int(d.get("bytes_sent", 0)),
                        bytes_stored=int(d.get("bytes_stored", 0)),
                    )
                    for d in doc.get("disks", [])
                ),
                extra={k: v for k, v in doc.items() if k not in _KNOWN_KEYS},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{name}: malformed manifest ({exc.__class__.__name__}: {exc})") from None
        if point.name != name and name.startswith("points/"):
            raise FormatError(f"{name}: manifest claims id {point.id}")
        return point


_KNOWN_KEYS = frozenset(
    (
        "version",
        "id",
        "policy",
        "vm",
        "started",
        "snapshot_time",
        "finished",
        "status",
        "mode",
        "fallback_reason",
        "config_revision",
        "protected",
        "files",
        "disks",
    )
)


def _time(value: Any) -> datetime:
    moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        raise ValueError(f"time {value!r} has no UTC offset")
    return moment


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def group_points(points: Iterable[RestorePoint]) -> dict[tuple[str, str], list[RestorePoint]]:
    """Points by retention group (policy, VM uuid), each list oldest first."""
    groups: dict[tuple[str, str], list[RestorePoint]] = defaultdict(list)
    for point in sorted(points, key=lambda p: p.id):
        groups[point.group].append(point)
    return dict(groups)
