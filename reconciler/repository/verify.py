"""Verify a repository: every listed restore point can be read back (docs/repository-format.md §12).

Two phases, both under a shared lock (backups may run meanwhile; their chunks are referenced by no
manifest yet, so they are not looked at):

1. **Structure**: every manifest decodes; every index and digest map it references exists, decodes, is
   complete and fits the manifest's disk; every referenced chunk exists.
2. **Data**: the selected chunks are read, decrypted, decompressed and hashed against their id.
   ``subset=(n, t)`` selects the n-th of t slices of the chunk id space (t runs cover every chunk
   exactly once); ``read_data_percent`` a random share.

Memory is the set of referenced chunk ids (as in GC), so a chunk shared by many points is read once.
Only for the few chunks found bad is a second walk over the manifests done, to name where each is used.
"""

from __future__ import annotations

import math
import os
import random
import threading
from collections import deque
from collections.abc import Container
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timezone
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from reconciler.facts.points import RestorePoint
from reconciler.repository.chunks import HOLE, ID_SIZE, chunk_name
from reconciler.repository.errors import FormatError, MissingObjectError, RepositoryError
from reconciler.repository.index import DiskIndex, chunk_count

if TYPE_CHECKING:
    from reconciler.repository.repo import Repository

log = structlog.get_logger(__name__)

MiB = 1 << 20
SHORT_ID = 12
"""Hex digits of an object id shown in messages (the full name is in :attr:`Defect.object`)."""
MAX_NAMED = 3
"""Places named per problem message; the rest are counted."""
INDEX_HEADER_SIZE = len(DiskIndex(0).encode())
READ_THREADS = min(4, os.cpu_count() or 1)


class ProgressItem(Protocol):
    """One counted piece of work: bytes read so far (and how far in), then done."""

    def advance(self, received: int, position: int | None = None) -> None: ...

    def done(self) -> None: ...


class ProgressSink(Protocol):
    """Where the chunk reads are counted (:class:`reconciler.operations.progress.Progress` is one); the
    repository only reports, the caller draws or logs."""

    def disk(self, vm: str, disk: str, total: int) -> ProgressItem: ...


@dataclass(frozen=True)
class Defect:
    """One defect: what is wrong with which object, and which restore points cannot be restored."""

    kind: str
    """``manifest-damaged``, ``index-missing``, ``index-damaged``, ``index-truncated``, ``index-mismatch``,
    ``digest-map-missing``, ``digest-map-damaged``, ``chunk-missing``, ``chunk-damaged``."""
    object: str
    """The repository object's name, e.g. ``chunks/3f/3fa2…`` (full id)."""
    message: str
    points: tuple[str, ...]
    """Ids of the restore points affected."""

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "object": self.object,
            "message": self.message,
            "points": list(self.points),
        }


@dataclass
class VerifyReport:
    """What :func:`verify_repository` looked at and every problem found (none = healthy)."""

    points: int = 0
    """Restore points whose manifest was read."""
    chunks: int = 0
    """Distinct referenced chunks checked for presence."""
    chunks_read: int = 0
    """Of those, read back and authenticated."""
    bytes_read: int = 0
    """Stored (encoded) bytes of the chunks read."""
    problems: list[Defect] = field(default_factory=list)
    damaged_points: dict[str, str] = field(default_factory=dict)
    """Affected point id -> a label for people (``web01@2026-11-20T02:00Z``; the id if unreadable)."""
    quarantined: int = 0
    """Bad chunks set aside (``quarantine/``) so that the next backup of their content stores them again."""
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems and not self.cancelled

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "points": self.points,
            "chunks": self.chunks,
            "chunks_read": self.chunks_read,
            "bytes_read": self.bytes_read,
            "cancelled": self.cancelled,
            "quarantined": self.quarantined,
            "problems": [p.to_dict() for p in self.problems],
            "damaged_points": [{"id": k, "label": v} for k, v in sorted(self.damaged_points.items())],
        }


def parse_subset(text: str) -> tuple[int, int] | float:
    """``--read-data-subset``: ``n/t`` -> ``(n, t)`` (1 <= n <= t), ``P%`` -> P (0 < P <= 100)."""
    text = text.strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise ValueError(f"{text!r}: expected a percentage like 10%") from None
        if not 0 < percent <= 100 or math.isnan(percent):
            raise ValueError(f"{text!r}: the percentage must be more than 0 and at most 100")
        return percent
    n_text, slash, t_text = text.partition("/")
    if not slash or not n_text.isdigit() or not t_text.isdigit():
        raise ValueError(f"{text!r}: expected n/t (e.g. 2/7) or P% (e.g. 10%)")
    n, t = int(n_text), int(t_text)
    if not 1 <= n <= t:
        raise ValueError(f"{text!r}: n/t needs 1 <= n <= t")
    return (n, t)


def in_subset(chunk_id: bytes, subset: tuple[int, int]) -> bool:
    """Whether ``chunk_id`` falls in slice n of t: slices split the id space evenly and never overlap."""
    n, t = subset
    return (int.from_bytes(chunk_id[:8], "big") * t) >> 64 == n - 1


def point_label(point: RestorePoint) -> str:
    """``web01@2026-11-20T02:00Z``: the VM and when its disks were frozen, for messages."""
    return f"{point.vm.name}@{point.snapshot_time.astimezone(timezone.utc):%Y-%m-%dT%H:%MZ}"


def _short(hexid: str) -> str:
    return hexid[:SHORT_ID] + "…"


def _detail(exc: Exception, name: str) -> str:
    """The cause without the object name and the generic parenthesis: ``authentication failed``."""
    text = str(exc).removeprefix(f"{name}: ")
    return text.split(" (", 1)[0] if "(damaged or" in text else text


def _offset_text(offset: int) -> str:
    return f"{offset // MiB} MiB" if offset % MiB == 0 else f"byte {offset}"


@dataclass
class _Finding:
    """A problem being collected: its users (point, where) are added as the walk finds them."""

    kind: str
    object: str
    what: str
    state: str
    users: dict[str, list[str]] = field(default_factory=dict)
    """point id -> [label, where...]"""
    name_users: bool = True
    """Whether the message ends with "needed by N points (...)" (not for a point's own manifest)."""

    def use(self, point_id: str, label: str, where: str) -> None:
        entry = self.users.setdefault(point_id, [label])
        entry.append(where)

    def problem(self) -> Defect:
        message = f"{self.what} {self.state}"
        if self.users and self.name_users:
            named = []
            for entry in list(self.users.values())[:MAX_NAMED]:
                label, first, more = entry[0], entry[1] if len(entry) > 1 else "", len(entry) - 2
                extra = f" and {more} more place{'s' if more > 1 else ''}" if more > 0 else ""
                named.append(f"{label} {first}{extra}".rstrip())
            rest = len(self.users) - len(named)
            tail = f", and {rest} more" if rest > 0 else ""
            count = len(self.users)
            message += f": needed by {count} point{'s' if count > 1 else ''} ({', '.join(named)}{tail})"
        return Defect(self.kind, self.object, message, tuple(sorted(self.users)))


class _Walk:
    """Phase 1 state: findings by key, referenced chunk ids, indexes and digest maps already judged."""

    def __init__(self, repo: Repository, report: VerifyReport) -> None:
        self.repo = repo
        self.report = report
        self.findings: dict[tuple[str, str, str], _Finding] = {}
        self.chunks: set[bytes] = set()
        self.indexes: dict[tuple[str, int], list[_Finding]] = {}
        self.digests: dict[tuple[str, int], list[_Finding]] = {}
        """Findings by (object id, the disk's capacity): whether it fits depends on the disk."""
        self.readable: list[str] = []

    def finding(self, kind: str, obj: str, what: str, state: str) -> _Finding:
        return self.findings.setdefault((kind, obj, state), _Finding(kind, obj, what, state))

    def point(self, point_id: str) -> None:
        try:
            point = self.repo.read_point(point_id)
        except MissingObjectError:
            return  # deleted since it was listed (delete_point runs under a shared lock too)
        except (RepositoryError, OSError) as exc:
            name = f"points/{point_id}"
            found = self.finding(
                "manifest-damaged",
                name,
                f"restore point {point_id}",
                f"is damaged ({_detail(exc, name)}): its manifest cannot be read",
            )
            found.users[point_id] = [point_id]
            found.name_users = False
            return
        self.report.points += 1
        self.readable.append(point_id)
        label = point_label(point)
        for stored in point.files:
            for hexid in stored.chunks:
                try:
                    self.chunks.add(_chunk_id(hexid))
                except FormatError:
                    found = self.finding(
                        "manifest-damaged",
                        point.name,
                        f"restore point {point_id}",
                        f"is damaged: file {stored.name!r} names an invalid chunk id {hexid[:80]!r}",
                    )
                    found.users[point_id] = [label]
                    found.name_users = False
        for disk in point.disks:
            where = f"disk {disk.label!r}"
            key = (disk.index, disk.capacity)
            if key not in self.indexes:
                self.indexes[key] = self._index(disk.index, disk.capacity)
            for found in self.indexes[key]:
                found.use(point_id, label, where)
            if disk.digest_map is not None:
                for found in self._digest_map(disk.digest_map, disk.capacity):
                    found.use(point_id, label, where)

    def _index(self, index_id: str, capacity: int) -> list[_Finding]:
        name = f"indexes/{index_id}"
        what = f"index {_short(index_id)}"
        try:
            index = self.repo.read_index(index_id)
        except MissingObjectError:
            return [self.finding("index-missing", name, what, "is missing")]
        except OSError as exc:
            return [self.finding("index-damaged", name, what, f"cannot be read ({exc.strerror or exc})")]
        except RepositoryError as exc:
            expected = chunk_count(capacity, self.repo.chunk_size)
            present = _truncated_entries(self.repo, name, expected)
            if present is not None:
                state = f"is truncated ({present} of {expected} entries)"
                return [self.finding("index-truncated", name, what, state)]
            return [self.finding("index-damaged", name, what, f"is damaged ({_detail(exc, name)})")]
        found = []
        if index.capacity != capacity or index.chunk_size != self.repo.chunk_size:
            state = (
                f"does not fit its disk (index: {index.capacity} bytes in {index.chunk_size}-byte chunks;"
                f" manifest: {capacity} bytes)"
            )
            found.append(self.finding("index-mismatch", name, what, state))
        self.chunks.update(index.referenced())
        if index.digest_map is not None:
            found.extend(self._digest_map(index.digest_map.hex(), capacity))
        return found

    def _digest_map(self, dm_id: str, capacity: int) -> list[_Finding]:
        key = (dm_id, capacity)
        if key not in self.digests:
            self.digests[key] = self._judge_digest_map(dm_id, capacity)
        return self.digests[key]

    def _judge_digest_map(self, dm_id: str, capacity: int) -> list[_Finding]:
        name = f"digests/{dm_id}"
        what = f"digest map {_short(dm_id)}"
        try:
            digest_map = self.repo.read_digest_map(dm_id)
        except MissingObjectError:
            return [self.finding("digest-map-missing", name, what, "is missing")]
        except (RepositoryError, OSError) as exc:
            return [self.finding("digest-map-damaged", name, what, f"is damaged ({_detail(exc, name)})")]
        if digest_map.capacity != capacity:
            state = f"is damaged (for {digest_map.capacity} bytes, the disk has {capacity})"
            return [self.finding("digest-map-damaged", name, what, state)]
        return []


def _chunk_id(hexid: str) -> bytes:
    try:
        raw = bytes.fromhex(hexid)
    except ValueError:
        raise FormatError(f"invalid chunk id {hexid!r}") from None
    if len(raw) != ID_SIZE:
        raise FormatError(f"invalid chunk id {hexid!r}")
    return raw


def _truncated_entries(repo: Repository, name: str, expected: int) -> int | None:
    """How many entries of an index blob that failed to decode are still readable if it was cut short;
    None if it is damaged otherwise (:meth:`BlobCodec.readable_prefix`)."""
    try:
        blob = repo.backend.get(name)
    except (RepositoryError, OSError):
        return None
    present = repo.codec.readable_prefix(blob, INDEX_HEADER_SIZE + expected * ID_SIZE)
    if present is None:
        return None
    return max(0, (present - INDEX_HEADER_SIZE) // ID_SIZE)


def _select(
    ids: list[bytes], percent: float, subset: tuple[int, int] | None, seed: int | str | None
) -> list[bytes]:
    """The chunks to read, in id order: a slice of the id space, or a random share, or all."""
    if subset is not None:
        return [cid for cid in ids if in_subset(cid, subset)]
    if percent >= 100:
        return ids
    if percent <= 0:
        return []
    count = min(len(ids), math.ceil(len(ids) * percent / 100))
    return sorted(random.Random(seed).sample(ids, count))


def verify_repository(
    repo: Repository,
    *,
    read_data_percent: float = 100.0,
    subset: tuple[int, int] | None = None,
    seed: int | str | None = None,
    progress: ProgressSink | None = None,
    cancel: threading.Event | None = None,
    quarantine: bool = False,
) -> VerifyReport:
    """Check every listed restore point of ``repo``; problems are collected, not raised.

    ``quarantine``: set every bad chunk aside (:meth:`Repository.quarantine_chunk`) so that the next
    backups store its content again (``verify --repair``, and the daemon's scheduled verifications).

    Takes a shared lock for the run (:class:`LockedError` if GC holds the repository). ``subset`` (n, t)
    overrides ``read_data_percent``; 0 percent checks the structure and chunk presence only.
    """
    if subset is not None and not 1 <= subset[0] <= subset[1]:
        raise ValueError(f"invalid subset {subset[0]}/{subset[1]}")
    report = VerifyReport()
    with repo.lock(purpose="verify") as lock:
        walk = _Walk(repo, report)
        for point_id in repo.point_ids():
            if cancel is not None and cancel.is_set():
                report.cancelled = True
                return report
            walk.point(point_id)
        walk.chunks.discard(HOLE)
        ids = sorted(walk.chunks)
        walk.chunks.clear()  # the sorted list is all that is needed from here on
        report.chunks = len(ids)
        to_read = _select(ids, read_data_percent, subset, seed)
        log.info("verify.structure", repository=str(repo.path), points=report.points, chunks=len(ids))
        bad = _check_chunks(repo, ids, to_read, report, progress, cancel)
        lock.check()  # a lost lock means GC may have run: "missing" could be false alarms
        if bad:
            _locate(repo, walk, bad)
            for cid in bad if quarantine else ():
                repo.quarantine_chunk(cid)
                report.quarantined += 1
                log.warning("verify.quarantined", repository=str(repo.path), chunk=cid.hex())
    for found in walk.findings.values():
        report.problems.append(found.problem())
        for point_id, entry in found.users.items():
            report.damaged_points[point_id] = entry[0]
    log.info(
        "verify.done",
        repository=str(repo.path),
        ok=report.ok,
        problems=len(report.problems),
        damaged_points=len(report.damaged_points),
        chunks_read=report.chunks_read,
        bytes_read=report.bytes_read,
    )
    return report


def _check_chunks(
    repo: Repository,
    ids: list[bytes],
    to_read: list[bytes],
    report: VerifyReport,
    progress: ProgressSink | None,
    cancel: threading.Event | None,
) -> dict[bytes, tuple[str, str]]:
    """Presence of ``ids``, content of ``to_read``; returns bad chunk id -> (kind, state).

    Chunks are read and decoded by a few threads (hashing, AES-GCM and zstd release the GIL), with at
    most ``2 * READ_THREADS`` in flight, so memory stays a few MiB.
    """
    bad: dict[bytes, tuple[str, str]] = {}
    if len(to_read) < len(ids):  # presence of the chunks not read
        reading = set(to_read)
        for cid in ids:
            if cancel is not None and cancel.is_set():
                report.cancelled = True
                return bad
            if cid not in reading and not repo.backend.exists(chunk_name(cid)):
                bad[cid] = ("chunk-missing", "is missing")
        del reading
    item = progress.disk(repo.path.name, "chunks", len(to_read) * repo.chunk_size) if progress else None
    done = 0

    def take(future: Future[tuple[bytes, int, tuple[str, str] | None]]) -> None:
        nonlocal done
        cid, size, problem = future.result()
        if problem is not None:
            bad[cid] = problem
        if size:
            report.chunks_read += 1
            report.bytes_read += size
        done += 1
        if item is not None:
            item.advance(size, done * repo.chunk_size)

    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="verify-read") as pool:
        window: deque[Future[tuple[bytes, int, tuple[str, str] | None]]] = deque()
        for cid in to_read:
            if cancel is not None and cancel.is_set():
                report.cancelled = True
                break
            window.append(pool.submit(_read_chunk, repo, cid))
            if len(window) >= 2 * READ_THREADS:
                take(window.popleft())
        while window:
            take(window.popleft())
    if item is not None:
        item.done()
    return bad


def _read_chunk(repo: Repository, cid: bytes) -> tuple[bytes, int, tuple[str, str] | None]:
    """(id, stored bytes read, problem or None) for one chunk: read, decrypt, decompress, hash."""
    name = chunk_name(cid)
    try:
        blob = repo.backend.get(name)
    except MissingObjectError:
        return cid, 0, ("chunk-missing", "is missing")
    except OSError as exc:
        return cid, 0, ("chunk-damaged", f"cannot be read ({exc.strerror or exc})")
    try:
        repo.codec.decode_chunk(cid, blob)
    except RepositoryError as exc:
        return cid, len(blob), ("chunk-damaged", f"is damaged ({_detail(exc, name)})")
    return cid, len(blob), None


def _locate(repo: Repository, walk: _Walk, bad: dict[bytes, tuple[str, str]]) -> None:
    """Second walk, only for bad chunks: which points use them, and where."""
    findings = {
        cid: walk.finding(kind, chunk_name(cid), f"chunk {_short(cid.hex())}", state)
        for cid, (kind, state) in bad.items()
    }
    indexes: dict[str, list[tuple[bytes, int]]] = {}
    for point_id in walk.readable:
        try:
            point = repo.read_point(point_id)
        except (RepositoryError, OSError):
            continue
        label = point_label(point)
        for stored in point.files:
            for position, hexid in enumerate(stored.chunks):
                cid = _safe_id(hexid)
                if cid in findings:
                    at = f" at {_offset_text(position * repo.chunk_size)}" if position else ""
                    where = f"file {stored.name!r}{at}"
                    findings[cid].use(point_id, label, where)
        for disk in point.disks:
            if disk.index not in indexes:
                indexes[disk.index] = _bad_slots(repo, disk.index, findings)
            for cid, offset in indexes[disk.index]:
                findings[cid].use(point_id, label, f"disk {disk.label!r} at offset {_offset_text(offset)}")


def _safe_id(hexid: str) -> bytes | None:
    try:
        return _chunk_id(hexid)
    except FormatError:
        return None


def _bad_slots(repo: Repository, index_id: str, bad: Container[bytes]) -> list[tuple[bytes, int]]:
    """(chunk id, disk offset) of every slot of the index holding a bad chunk."""
    try:
        index = repo.read_index(index_id)
    except (RepositoryError, OSError):
        return []  # already reported by the structure walk
    return [(cid, slot * index.chunk_size) for slot, cid in enumerate(index) if cid in bad]
