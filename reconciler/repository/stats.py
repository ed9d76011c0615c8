"""How much a repository holds and saves: logical vs stored bytes, deduplication and compression, in
total, per VM and per policy (``esxi-reconciler repo stats``).

Figures, for a set of restore points:

* ``logical``: what restoring every one of them would write (disk capacities plus the small files);
* ``data``: of that, what is not zeros (zero chunks are holes, never stored);
* ``unique``: the plaintext of the distinct chunks they reference — ``data`` after deduplication;
* ``stored``: what those chunks take on the volume — ``unique`` after compression (and encryption);
* ``exclusive``: the stored bytes no point outside the set references: what forgetting all of them
  would free (after garbage collection).

``dedup = data / unique``, ``compression = unique / stored``, ``reduction = logical / stored``.
Computing them reads every point's disk indexes and stats every chunk, under a shared lock; like
garbage collection it holds the ids of the referenced chunks in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from reconciler.facts.points import RestorePoint
from reconciler.repository.chunks import HOLE, ID_SIZE
from reconciler.repository.errors import MissingObjectError
from reconciler.repository.repo import Repository


def _ratio(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


@dataclass
class Usage:
    """The figures of one set of restore points (see the module doc)."""

    points: int = 0
    logical: int = 0
    data: int = 0
    unique: int = 0
    stored: int = 0
    exclusive: int = 0
    chunks: int = 0
    """Distinct chunks referenced."""

    @property
    def dedup_ratio(self) -> float | None:
        return _ratio(self.data, self.unique)

    @property
    def compression_ratio(self) -> float | None:
        return _ratio(self.unique, self.stored)

    @property
    def reduction_ratio(self) -> float | None:
        return _ratio(self.logical, self.stored)

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": self.points,
            "logical_bytes": self.logical,
            "data_bytes": self.data,
            "unique_bytes": self.unique,
            "stored_bytes": self.stored,
            "exclusive_bytes": self.exclusive,
            "chunks": self.chunks,
            "dedup_ratio": self.dedup_ratio,
            "compression_ratio": self.compression_ratio,
            "reduction_ratio": self.reduction_ratio,
        }


@dataclass(frozen=True)
class VmKey:
    """A backed-up VM: its identity (host, UUID) and the name of its newest point."""

    host: str
    uuid: str
    name: str


@dataclass
class UsageReport:
    """The figures of a whole repository, per VM and per policy, and what its volume holds."""

    total: Usage
    by_vm: dict[VmKey, Usage] = field(default_factory=dict)
    by_policy: dict[str, Usage] = field(default_factory=dict)
    volume_chunks: int = 0
    volume_bytes: int = 0
    """Every chunk in ``chunks/`` and its size, referenced or not."""
    unreferenced_chunks: int = 0
    unreferenced_bytes: int = 0
    """Chunks no point references: what the next garbage collection frees."""
    missing_chunks: int = 0
    """Referenced chunks that are not there (``verify`` says more)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total.to_dict(),
            "vms": [
                {"vm": key.name, "host": key.host, "uuid": key.uuid, **usage.to_dict()}
                for key, usage in sorted(self.by_vm.items(), key=lambda kv: (kv[0].name, kv[0].host))
            ],
            "policies": [
                {"policy": name, **usage.to_dict()} for name, usage in sorted(self.by_policy.items())
            ],
            "volume": {
                "chunks": self.volume_chunks,
                "bytes": self.volume_bytes,
                "unreferenced_chunks": self.unreferenced_chunks,
                "unreferenced_bytes": self.unreferenced_bytes,
                "missing_chunks": self.missing_chunks,
            },
        }


class _Group:
    """The chunks of one set of points while they are counted."""

    def __init__(self) -> None:
        self.usage = Usage()
        self.chunks: set[bytes] = set()


def _point_chunks(
    repo: Repository, point: RestorePoint, lengths: dict[bytes, int]
) -> tuple[int, int, set[bytes]]:
    """``(logical, data, chunk ids)`` of one point; records each chunk's plaintext length."""
    logical = 0
    data = 0
    ids: set[bytes] = set()
    for stored in point.files:
        logical += stored.size
        remaining = stored.size
        for hexid in stored.chunks:
            length = min(repo.chunk_size, remaining)
            remaining -= length
            cid = bytes.fromhex(hexid)
            if cid != HOLE:
                data += length
                lengths[cid] = length
                ids.add(cid)
    for disk in point.disks:
        logical += disk.capacity
        index = repo.read_index(disk.index)
        for slot, cid in enumerate(index):
            if cid == HOLE:
                continue
            length = index.chunk_length(slot)
            data += length
            lengths[cid] = length
            ids.add(cid)
    return logical, data, ids


def _count(
    groups: Iterable[_Group], owners: dict[bytes, int], lengths: dict[bytes, int], sizes: dict[bytes, int]
) -> None:
    for number, group in enumerate(groups):
        usage = group.usage
        usage.chunks = len(group.chunks)
        for cid in group.chunks:
            usage.unique += lengths[cid]
            size = sizes.get(cid, 0)
            usage.stored += size
            if owners[cid] == number:
                usage.exclusive += size


def usage_report(repo: Repository, points: list[RestorePoint]) -> UsageReport:
    """The figures of ``points`` (normally every point of ``repo``; call under a shared lock)."""
    lengths: dict[bytes, int] = {}
    total = _Group()
    by_vm: dict[tuple[str, str], _Group] = {}
    vm_names: dict[tuple[str, str], tuple[str, str]] = {}  # identity -> (point id, name) of its newest point
    by_policy: dict[str, _Group] = {}
    for point in points:
        logical, data, ids = _point_chunks(repo, point, lengths)
        identity = (point.vm.host, point.vm.uuid)
        if point.id > vm_names.get(identity, ("", ""))[0]:
            vm_names[identity] = (point.id, point.vm.name)
        for group in (
            total,
            by_vm.setdefault(identity, _Group()),
            by_policy.setdefault(point.policy, _Group()),
        ):
            group.usage.points += 1
            group.usage.logical += logical
            group.usage.data += data
            group.chunks |= ids

    sizes: dict[bytes, int] = {}
    report = UsageReport(total.usage)
    for name in repo.backend.list("chunks"):
        hexid = name.rpartition("/")[2]
        try:
            cid = bytes.fromhex(hexid)
            size = repo.backend.stat(name).size
        except (ValueError, MissingObjectError):
            continue
        if len(cid) != ID_SIZE:
            continue
        report.volume_chunks += 1
        report.volume_bytes += size
        if cid in total.chunks:
            sizes[cid] = size
        else:
            report.unreferenced_chunks += 1
            report.unreferenced_bytes += size
    report.missing_chunks = sum(1 for cid in total.chunks if cid not in sizes)

    _count([total], dict.fromkeys(total.chunks, 0), lengths, sizes)
    for groups in (list(by_vm.values()), list(by_policy.values())):
        _count(groups, _owners(groups), lengths, sizes)
    report.by_vm = {
        VmKey(host, uuid, vm_names[(host, uuid)][1]): g.usage for (host, uuid), g in by_vm.items()
    }
    report.by_policy = {name: g.usage for name, g in by_policy.items()}
    return report


def _owners(groups: list[_Group]) -> dict[bytes, int]:
    """Chunk id → the number of the one group referencing it, or -1 when several do."""
    owners: dict[bytes, int] = {}
    for number, group in enumerate(groups):
        for cid in group.chunks:
            owners[cid] = number if owners.get(cid, number) == number else -1
    return owners
