"""The restore point manifest: JSON codec of :class:`~reconciler.facts.points.RestorePoint`
(docs/repository-format.md §4.5).

The record types are plain values in :mod:`reconciler.facts.points` (the planner reads them without
loading the repository); reading them back from bytes is the repository's business, because a bad
manifest is a :class:`~reconciler.repository.errors.FormatError` naming the object.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from reconciler.facts.points import DiskRecord, RestorePoint, StoredFile, VmRef
from reconciler.repository.errors import FormatError

MANIFEST_VERSION = 1


def manifest_doc(point: RestorePoint) -> dict[str, Any]:
    """The manifest as a JSON object; unknown keys read from a newer writer (``extra``) are kept."""
    doc: dict[str, Any] = dict(point.extra)
    doc.update(
        {
            "version": MANIFEST_VERSION,
            "id": point.id,
            "policy": point.policy,
            "vm": {
                "name": point.vm.name,
                "uuid": point.vm.uuid,
                "host": point.vm.host,
                "vmid": point.vm.vmid,
            },
            "started": point.started.isoformat(timespec="microseconds"),
            "snapshot_time": point.snapshot_time.isoformat(timespec="microseconds"),
            "finished": point.finished.isoformat(timespec="microseconds"),
            "status": point.status,
            "mode": point.mode,
            "fallback_reason": point.fallback_reason,
            "config_revision": point.config_revision,
            "protected": point.protected,
            "files": [{"name": f.name, "size": f.size, "chunks": list(f.chunks)} for f in point.files],
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
                    "mode": d.mode,
                    "reasons": list(d.reasons),
                }
                for d in point.disks
            ],
        }
    )
    return doc


def encode_manifest(point: RestorePoint) -> bytes:
    """The manifest's payload bytes (compact UTF-8 JSON)."""
    return json.dumps(manifest_doc(point), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_manifest(name: str, data: bytes) -> RestorePoint:
    """Parse a manifest; :class:`FormatError` naming ``name`` for anything unexpected."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise FormatError(f"{name}: manifest is not valid JSON") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{name}: manifest is not a JSON object")
    if doc.get("version") != MANIFEST_VERSION:
        raise FormatError(f"{name}: unsupported manifest version {doc.get('version')!r}")
    try:
        vm = doc["vm"]
        point = RestorePoint(
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
                    mode=d.get("mode"),
                    reasons=_reasons(d.get("reasons")),
                )
                for d in doc.get("disks", [])
            ),
            extra={k: v for k, v in doc.items() if k not in _KNOWN_KEYS},
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(1e400)
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


def _reasons(value: Any) -> tuple[str, ...]:
    """A disk's reasons: absent in manifests written before they were recorded."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"reasons {value!r} is not a list")
    return tuple(str(r) for r in value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
