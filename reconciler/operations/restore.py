"""Restoring a restore point onto a host: as a new VM (default), over the original VM's disks
(``overwrite``), one disk of an existing VM, or as a throw-away test VM (:func:`test_restore`).

Safety rules, in order of importance:

* **Nothing existing is touched without an overwrite**: a new VM gets its own folder (created by us,
  refused if it exists) and name; only that folder is cleaned up after a failure.
* **Verified before used**: every written disk's SHA-256 is compared with the point's content (hashed
  while streaming it from the repository) *before* the VM is registered or the .vmx switched to it.
  On SSH hosts the digest is computed on the host (``sha256sum``; only the digest crosses the
  network), else the disk is read back over HTTPS.
* **Overwrite keeps the original until the restored disks are verified**: the restored disks are
  written next to the originals under new names (``<disk>-restored-<time>-<random>.vmdk``); the .vmx is then
  replaced atomically (temp file + rename) to point at them and reloaded; only then are the original
  disks deleted. A whole-VM overwrite switches to the point's configuration in the same rename (its
  .vmx under the VM's current name, its .nvram written beforehand under a new name); ``--disk`` keeps
  the current configuration. The per-VM lock of :mod:`.vmlock` is held throughout, so no backup of
  this machine runs meanwhile.
* **Only the VM's own points overwrite it**: a point is of a VM identity (host, BIOS UUID), not of a
  name; :func:`find_point` never mixes same-named VMs, and :func:`restore_overwrite` refuses a point of
  another VM unless told so (``--to-vm``), which then keeps the target's identity.
* **A stopped overwrite says where the VM is**: the overwrite powers the VM off first, so a kill leaves
  it powered off: before the rename on its original disks (the half-written ``-restored-`` files are
  the only leftover), after it on verified restored disks (the replaced files still in the folder). A
  journal written into the VM's folder before the power-off (:class:`OverwriteJournal`) records the
  power state and the files being replaced: the next overwrite of the VM finishes what the killed run
  left, :func:`abort_overwrite` gives it up and powers the VM back on. A failure that is not a kill does
  that at once before the rename (what was written goes, the VM gets its power state back).
* **The next backup is correct**: a restored disk is a new baseline. CBT of an overwritten disk is
  reset (its ``ctkEnabled`` switched off, reloaded, and on again), so the old changeIds are refused
  and the next backup falls back to a full read; the free-host digest compare compares content and
  needs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import secrets
import shlex
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import structlog

from reconciler.config.model import DesiredState
from reconciler.esxi.errors import EsxiError, InsufficientSpaceError
from reconciler.esxi.vmdk import Descriptor
from reconciler.esxi.vmx import VmxFile, prepare_restored_vmx
from reconciler.facts.inventory import DiskInfo, VmInfo, split_ds_path
from reconciler.facts.points import DiskRecord, RestorePoint, StoredFile, temporary_vm_name
from reconciler.killpoint import kill_point
from reconciler.operations.ports import HostReader, RestoreHost
from reconciler.operations.progress import Progress
from reconciler.operations.vmlock import vm_lock
from reconciler.parallel import ordered_parallel
from reconciler.repository import HOLE, Repository
from reconciler.repository.lock import pid_alive

log = structlog.get_logger(__name__)

OnData = Callable[[DiskRecord, int, int], None]
_ZERO = bytes(1 << 20)


class RestoreError(Exception):
    """A restore cannot be done or failed, with a message for the user."""


# -- reading a point -----------------------------------------------------------------------------


def disk_pieces(
    repo: Repository,
    disk: DiskRecord,
    *,
    streams: int = 4,
    sink: Callable[[int, bytes], None] | None = None,
) -> Iterator[tuple[int, bytes]]:
    """The stored (non-hole) chunks of a disk as ``(offset, bytes)``, in disk order, read, decrypted
    and decompressed on ``streams`` threads (at most ``4 × streams`` chunks in memory); what is not
    yielded is zero. ``sink(offset, bytes)``, when given, runs on the worker thread as soon as a chunk
    is decoded, in any order: a positioned write (``pwrite``) needs no ordering, so writing overlaps
    decoding while the caller consumes the pieces in order (e.g. to hash them)."""
    index = repo.read_index(disk.index)
    if index.capacity != disk.capacity:
        raise RestoreError(f"disk {disk.label}: index has {index.capacity} bytes, the point {disk.capacity}")
    size = index.chunk_size
    work = [(slot * size, index.chunk_length(slot)) for slot in range(index.count) if index[slot] != HOLE]

    def fetch(off: int, length: int) -> bytes:
        data = repo.read_chunk(index[off // size])
        if len(data) != length:
            data = data[:length]
        if sink is not None:
            sink(off, data)
        return data

    # 4 × streams 1 MiB chunks in memory: with 2 × streams, a slow write or read at the head stalled the
    # threads (an export of the benchmark disk 5.5–5.65 s, with 4 × streams 5.15–5.25 s)
    return ordered_parallel(work, fetch, streams, window=4 * streams)


def stored_bytes(repo: Repository, disk: DiskRecord) -> int:
    """Bytes of the disk that are not holes (what a thin restore allocates)."""
    index = repo.read_index(disk.index)
    return sum(index.chunk_length(s) for s in range(index.count) if index[s] != HOLE)


class ContentHash:
    """SHA-256 of a whole disk fed as ascending pieces, the gaps (holes) hashed as zeros."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.position = 0

    def _zeros(self, end: int) -> None:
        while self.position < end:
            n = min(len(_ZERO), end - self.position)
            self._h.update(_ZERO[:n])
            self.position += n

    def update(self, offset: int, data: bytes) -> None:
        if offset < self.position:
            raise ValueError(f"piece at {offset} is before {self.position}")
        self._zeros(offset)
        self._h.update(data)
        self.position += len(data)

    def hexdigest(self, capacity: int) -> str:
        self._zeros(capacity)
        return self._h.hexdigest()


def hashed(pieces: Iterable[tuple[int, bytes]], digest: ContentHash) -> Iterator[tuple[int, bytes]]:
    """Pass the pieces on, feeding ``digest``."""
    for off, data in pieces:
        digest.update(off, data)
        yield off, data


def disk_content(repo: Repository, point: RestorePoint, key: int) -> bytes:
    """A disk of a point as one ``bytes`` object (tests and small disks only)."""
    (disk,) = [d for d in point.disks if d.key == key]
    out = bytearray(disk.capacity)
    for off, data in disk_pieces(repo, disk):
        out[off : off + len(data)] = data
    return bytes(out)


def disk_sha256(repo: Repository, disk: DiskRecord) -> str:
    """SHA-256 of a stored disk's whole content."""
    digest = ContentHash()
    for off, data in disk_pieces(repo, disk):
        digest.update(off, data)
    return digest.hexdigest(disk.capacity)


# -- which point: a VM is its identity (host, uuid), not its name -----------------------------------


@dataclass(frozen=True)
class BackedUpVm:
    """One VM as the repository knows it: a name, the host it was backed up on and its BIOS UUID (what
    tells apart VMs of the same name, e.g. production and DR copies, or a VM deleted and re-created),
    with its newest successful point."""

    name: str
    host: str
    uuid: str
    newest: RestorePoint
    points: int

    def describe(self) -> str:
        newest = self.newest.time.astimezone(timezone.utc)
        return (
            f"{self.host} uuid {self.uuid or '?'} newest {newest:%Y-%m-%d %H:%M} UTC (point {self.newest.id})"
        )


def backed_up_vms(points: Iterable[RestorePoint]) -> list[BackedUpVm]:
    """The successful points grouped by VM identity (name, host, uuid), ordered by host then newest."""
    groups: dict[tuple[str, str, str], list[RestorePoint]] = {}
    for point in points:
        if point.status == "success":
            groups.setdefault((point.vm.name, point.vm.host, point.vm.uuid), []).append(point)
    found = [
        BackedUpVm(name, host, uuid, max(group, key=lambda p: p.id), len(group))
        for (name, host, uuid), group in groups.items()
    ]
    return sorted(found, key=lambda v: (v.name, v.host, -v.newest.time.timestamp(), v.uuid))


def describe_source(point: RestorePoint) -> str:
    """Which VM a point is of, for people: ``VM 'web01' from esxi1 (uuid …)``."""
    return f"VM {point.vm.name!r} from {point.vm.host} (uuid {point.vm.uuid or '?'})"


class AmbiguousVmError(RestoreError):
    """A VM name names several backed-up VMs; the message lists them and how to choose."""

    def __init__(self, vm: str, candidates: list[BackedUpVm]) -> None:
        self.candidates = candidates
        hosts = {c.host for c in candidates}
        how = "--from-host HOST or --point ID" if len(hosts) > 1 else "--point ID"
        super().__init__(
            f"{len(candidates)} different VMs named {vm!r} have restore points: "
            + "; ".join(c.describe() for c in candidates)
            + f"; choose one with {how} (see `esxi-reconciler points --vm {shlex.quote(vm)}`)"
        )


def find_point(
    repo: Repository, vm: str, point_id: str | None, *, host: str | None = None, uuid: str | None = None
) -> RestorePoint:
    """The point ``point_id`` (must be of a VM named ``vm``, backed up on ``host`` when given), or with
    None/``latest`` the newest successful one of the one VM named ``vm`` (on ``host``, with ``uuid``,
    when given). Points of a name are never mixed across VMs: when the name stands for several VMs
    (several hosts, or several UUIDs), :class:`AmbiguousVmError` lists them."""
    if point_id and point_id != "latest":
        try:
            point = repo.read_point(point_id)
        except Exception as exc:
            raise RestoreError(f"restore point {point_id}: {exc}") from exc
        if point.vm.name != vm:
            raise RestoreError(f"restore point {point_id} is of VM {point.vm.name!r}, not {vm!r}")
        if host is not None and point.vm.host != host:
            raise RestoreError(f"restore point {point_id} is of {describe_source(point)}, not from {host}")
        return point
    candidates = [
        c
        for c in backed_up_vms(repo.list_points(vm=vm))
        if (host is None or c.host == host) and (uuid is None or c.uuid == uuid)
    ]
    if not candidates:
        where = f" from {host}" if host is not None else ""
        which = f" with uuid {uuid}" if uuid is not None else ""
        raise RestoreError(f"no successful restore point of VM {vm!r}{where}{which} in the repository")
    if len(candidates) > 1:
        raise AmbiguousVmError(vm, candidates)
    return candidates[0].newest


def same_vm(point: RestorePoint, host: str, vm: VmInfo) -> bool:
    """Whether ``point`` is of ``vm`` (on the host named ``host``) itself: backed up on that host, with
    this BIOS UUID (the name may have changed since)."""
    return bool(point.vm.uuid) and point.vm.host == host and point.vm.uuid == vm.uuid


def point_file(point: RestorePoint, name: str) -> StoredFile | None:
    return next((f for f in point.files if f.name == name), None)


def point_vmx(repo: Repository, point: RestorePoint) -> tuple[StoredFile, VmxFile]:
    found = [f for f in point.files if f.name.lower().endswith(".vmx")]
    if len(found) != 1:
        raise RestoreError(f"restore point {point.id} holds {len(found)} .vmx files")
    text = repo.read_file(found[0]).decode("utf-8", "surrogateescape")
    return found[0], VmxFile.parse(text)


def disk_nodes(vmx: VmxFile, point: RestorePoint) -> dict[int, str]:
    """Disk key → .vmx node (``scsi0:0``), matched on the descriptor's file name."""
    by_name = {posixpath.basename(d.file_name): d.node for d in vmx.disks(include_independent=True)}
    out = {}
    for disk in point.disks:
        node = by_name.get(posixpath.basename(split_ds_path(disk.file)[1]))
        if node is None:
            raise RestoreError(f"restore point {point.id}: disk {disk.label} is not in the .vmx")
        out[disk.key] = node
    return out


def select_disk(point: RestorePoint, nodes: dict[int, str], which: str) -> DiskRecord:
    """A disk of the point by label (``Hard disk 2``), node (``scsi0:1``) or descriptor name."""
    for disk in point.disks:
        names = {disk.label, nodes.get(disk.key, ""), posixpath.basename(split_ds_path(disk.file)[1])}
        if which in names or which.lower() in {n.lower() for n in names}:
            return disk
    raise RestoreError(
        f"restore point {point.id} has no disk {which!r} (disks: "
        + ", ".join(f"{d.label} = {nodes.get(d.key, '?')}" for d in point.disks)
        + ")"
    )


def _adapter(repo: Repository, point: RestorePoint, disk: DiskRecord) -> tuple[str, str]:
    stored = point_file(point, posixpath.basename(split_ds_path(disk.file)[1]))
    if stored is None:
        return "lsilogic", "14"
    desc = Descriptor.parse(repo.read_file(stored).decode("utf-8", "surrogateescape"))
    return desc.ddb.get("ddb.adapterType", "lsilogic"), desc.ddb.get("ddb.virtualHWVersion", "14")


# -- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoredDisk:
    label: str
    node: str
    descriptor: str
    """Datastore path of the written disk."""
    sha256: str | None
    """SHA-256 of the whole disk where it was checked by reading it back; None where the host checked
    every piece as it wrote it (a whole-disk hash then checks nothing and cost 2.4 s of CPU per 4 GiB,
    a quarter of a restore's client CPU)."""
    written: int

    @property
    def verified(self) -> str:
        """How the written disk was checked: ``on-host`` (as written) or ``read-back``."""
        return "read-back" if self.sha256 is not None else "on-host"

    def check_line(self) -> str:
        """What a person reads about the check: ``sha256 1234abcd… ok`` or ``checked on the host``."""
        return (
            f"sha256 {self.sha256[:16]}… ok" if self.sha256 is not None else "checked on the host as written"
        )


@dataclass
class RestoreResult:
    point_id: str
    host: str
    vm_name: str
    vmid: str | None
    vmx_path: str
    disks: list[RestoredDisk] = field(default_factory=list)
    powered_on: bool = False
    power_state_before: str | None = None
    """Overwrite: the VM's power state before the restore (before an interrupted earlier one, if any)."""


@dataclass(frozen=True)
class RestoreOptions:
    """How to restore; ``on_data`` (every piece written) and ``on_stage`` (each step of an overwrite:
    ``powered-off``, ``written``, ``cbt-reset``, ``switched``) are test seams."""

    name: str | None = None
    datastore: str | None = None
    keep_identity: bool = False
    power_on: bool = False
    thin: bool = True
    streams: int = 4
    shutdown_timeout: float = 300.0
    progress: Progress | None = None
    on_data: OnData | None = None
    on_stage: Callable[[str], None] | None = None


VM_NAME_MAX = 80
"""ESXi's longest VM name, in characters."""
NAME_MAX = 255
"""The longest file name, in bytes, on VMFS, NFS and the local file systems an export goes to."""
_TEMPORARY_SUFFIX = ".esxi-reconciler.tmp"
"""What :meth:`EsxiHost.write_file` appends to a name while it writes the file."""
_RESTORED_DISK_SUFFIX = "-restored-20260101020304-3fa2-flat.vmdk"
"""The longest name an overwrite gives a disk (the shape of it, for the length only)."""
_RESTORED_NVRAM_SUFFIX = "-restored-20260101020304-3fa2.nvram"


def default_name(vm: str, now: datetime | None = None) -> str:
    """``<vm>-restored-<time>``, the VM's name cut so the whole stays within ESXi's 80 characters."""
    moment = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    suffix = f"-restored-{moment:%Y%m%d-%H%M}"
    return vm[: VM_NAME_MAX - len(suffix)] + suffix


def fit_stem(stem: str, suffix: str) -> str:
    """``stem``, cut at a character boundary and tagged with a digest of the whole so that ``stem +
    suffix`` fits in a file name (255 bytes) while it is written under its temporary name too. An
    80-character VM name is up to 240 bytes of UTF-8, and its files get suffixes (``_1-flat.vmdk``,
    ``-restored-<time>-<id>-flat.vmdk``, the overwrite journal's) that would not fit."""
    room = NAME_MAX - len(_TEMPORARY_SUFFIX) - len(suffix.encode("utf-8", "surrogateescape"))
    data = stem.encode("utf-8", "surrogateescape")
    if len(data) <= room:
        return stem
    # a digest of the whole stem keeps cut names apart (``disk`` and ``disk_1`` may differ only at the end)
    tag = "~" + hashlib.sha256(data).hexdigest()[:8]
    used = len(tag)
    for i, ch in enumerate(stem):
        used += len(ch.encode("utf-8", "surrogateescape"))
        if used > room:
            return stem[:i] + tag
    raise AssertionError("unreachable: the stem is longer than the room")


def safe_file_name(name: str) -> str:
    """A folder/file name for a VM name: ``/`` and control characters replaced (ESXi keeps the rest,
    spaces, quotes and non-ASCII included)."""
    cleaned = re.sub(r"[/\x00-\x1f\x7f]", "_", name).strip()
    return cleaned if cleaned not in ("", ".", "..") else "vm"


# -- writing one disk ------------------------------------------------------------------------------


def _write_verified(
    host: RestoreHost,
    repo: Repository,
    disk: DiskRecord,
    node: str,
    descriptor: str,
    options: RestoreOptions,
    vm_label: str,
    adapter: tuple[str, str],
) -> RestoredDisk:
    """Create ``descriptor``, write the disk's content into it and check its SHA-256 on the host."""
    dlog = log.bind(disk=disk.label, target=descriptor)
    flat = host.create_disk(
        descriptor, disk.capacity, thin=options.thin, adapter=adapter[0], hw_version=adapter[1]
    )
    # the host checks what it receives (hostwrite), or the written disk is read back and compared with
    # the SHA-256 of the pieces, computed as they pass
    digest = None if host.checks_disk_writes() else ContentHash()
    pieces = disk_pieces(repo, disk, streams=options.streams)
    written = 0
    item = options.progress.disk(vm_label, disk.label, disk.capacity) if options.progress else None

    def on_written(off: int, length: int) -> None:
        nonlocal written
        written += length
        if item is not None:
            item.advance(length, off + length)
        if options.on_data is not None:
            options.on_data(disk, off, length)

    dlog.info("restore.disk_write", capacity=disk.capacity)
    checked_on_host = host.write_disk(
        flat,
        disk.capacity,
        pieces if digest is None else hashed(pieces, digest),
        on_written,
        streams=options.streams,
    )
    if item is not None:
        item.done()
    expected: str | None = None
    if not checked_on_host:  # read back: on the host (sha256sum over SSH) or over HTTPS
        # (a host that stopped checking since it was asked, e.g. SSH gone: the repository is read again)
        expected = digest.hexdigest(disk.capacity) if digest is not None else disk_sha256(repo, disk)
        actual = host.file_sha256(flat, timeout=max(3600.0, disk.capacity / (50 << 20)))  # ≥ 50 MiB/s
        if actual != expected:
            raise RestoreError(
                f"disk {disk.label}: the written disk {flat} has SHA-256 {actual},"
                f" the restore point {expected}"
            )
    dlog.info("restore.disk_verified", sha256=expected, written=written, on_host=checked_on_host)
    return RestoredDisk(disk.label, node, descriptor, expected, written)


def _check_space(host: RestoreHost, datastore: str, need: int) -> None:
    stores = {d.name: d for d in host.datastores()}
    ds = stores.get(datastore)
    if ds is None:
        raise RestoreError(
            f"host {host.name} has no datastore {datastore!r} (it has: {', '.join(sorted(stores)) or 'none'})"
        )
    limits = host.limits
    left = ds.free - need
    if left < 0 or (limits is not None and not limits.datastore_has_room(ds.capacity, left)):
        raise InsufficientSpaceError(
            f"datastore {datastore} on {host.name} has {ds.free} bytes free; the restore needs {need}"
            + (" plus the host's free-space floor" if limits is not None and left >= 0 else "")
        )


# -- as a new VM -----------------------------------------------------------------------------------


RESTORE_MARKER = "esxi-reconciler-restore.json"
"""Written into a new VM's folder right after the folder is made and removed once the VM is registered
(a test restore's stays until its temporary VM is removed): a folder holding it is what a killed
restore left, which the next restore to that name removes."""


@dataclass(frozen=True)
class RestoreMarker:
    """Who is restoring into a new folder (:data:`RESTORE_MARKER`)."""

    point: str
    name: str
    started: datetime
    machine: str
    pid: int
    test: bool = False
    """A test restore's temporary VM: removed even when it was left powered on."""

    def to_json(self) -> bytes:
        doc = {
            "written_by": "esxi-reconciler restore",
            "point": self.point,
            "name": self.name,
            "started": self.started.isoformat(timespec="seconds"),
            "machine": self.machine,
            "pid": self.pid,
            "test": self.test,
        }
        return json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> RestoreMarker:
        try:
            doc = json.loads(data)
            started = datetime.fromisoformat(str(doc["started"]))
            return cls(
                str(doc["point"]), str(doc["name"]),
                started if started.tzinfo else started.replace(tzinfo=timezone.utc),
                str(doc.get("machine") or ""), int(doc.get("pid") or 0), bool(doc.get("test")),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls("?", "?", datetime.fromtimestamp(0, timezone.utc), "", 0)


def _remove_unfinished_restore(host: RestoreHost, folder: str, stem: str, name: str) -> None:
    """Remove what a restore into ``folder`` that did not finish (killed) left: the VM registered from
    it, if any, and the folder. Refused while that restore's process still runs on this machine, and
    for a VM it left powered on (someone may be using it), unless that was a test restore's."""
    path = f"{folder}/{RESTORE_MARKER}"
    if not host.file_exists(path):
        return
    marker = RestoreMarker.from_json(host.read_file(path))
    since = f"{marker.started.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC"
    if marker.machine == socket.gethostname() and marker.pid != os.getpid() and pid_alive(marker.pid):
        raise RestoreError(f"a restore into {folder} is running (pid {marker.pid}, since {since})")
    vmx = f"{folder}/{stem}.vmx"
    for vm in host.list_vms():
        if vm.vmx_path != vmx:
            continue
        if vm.power_state != "poweredOff":
            if not marker.test:
                raise RestoreError(
                    f"VM {vm.name!r} on {host.name} was restored by a run that did not finish (started"
                    f" {since}) and is {vm.power_state}: check it, then remove it or choose another --name"
                )
            host.power_off(vm)
        host.unregister_vm(vm)
    host.delete_path(folder)
    log.warning("restore.unfinished_removed", folder=folder, vm=name, point=marker.point, started=since)


def restore_new_vm(
    host: RestoreHost, repo: Repository, point: RestorePoint, options: RestoreOptions, *, test: bool = False
) -> RestoreResult:
    """Restore ``point`` as a new VM on ``host`` (see the module doc); returns it registered. A folder
    of the same name left by a killed restore is removed first (:data:`RESTORE_MARKER`); ``test``: the
    VM is a test restore's temporary one."""
    name = options.name or default_name(point.vm.name)
    rlog = log.bind(point=point.id, vm=point.vm.name, new_name=name, host=host.name)
    _, vmx = point_vmx(repo, point)
    nodes = disk_nodes(vmx, point)
    original_ds = split_ds_path(point.disks[0].file)[0] if point.disks else None
    stores = {d.name for d in host.datastores()}
    datastore = options.datastore or (original_ds if original_ds in stores else None)
    if datastore is None:
        raise RestoreError(
            f"choose a datastore of host {host.name} with --datastore ({', '.join(sorted(stores))})"
        )
    stem = fit_stem(safe_file_name(name), "_15" + _RESTORED_DISK_SUFFIX)  # room for a later overwrite
    folder = f"[{datastore}] {stem}"
    _remove_unfinished_restore(host, folder, stem, name)  # what a killed restore to this name left
    if any(v.name == name for v in host.list_vms()):
        raise RestoreError(
            f"host {host.name} already has a VM named {name!r}; choose another --name, or replace that VM's"
            " disks with --overwrite"
        )
    sparse = options.thin and host.ssh_enabled  # an HTTPS upload writes the holes too
    need = sum(stored_bytes(repo, d) if sparse else d.capacity for d in point.disks)
    _check_space(host, datastore, need + sum(f.size for f in point.files))
    exists = host.folder_exists(folder)
    if exists and host.list_folder(folder, "*"):
        raise RestoreError(f"folder {folder} already exists; choose another --name")
    rlog.info("restore.start", folder=folder, disks=len(point.disks), need=need)
    if not exists:  # an empty one is what a kill between its creation and the marker leaves: reused
        host.make_directory(folder)
    started = datetime.now(timezone.utc)
    marker = RestoreMarker(point.id, name, started, socket.gethostname(), os.getpid(), test)
    host.write_file(f"{folder}/{RESTORE_MARKER}", marker.to_json())
    kill_point("restore.folder-created")
    result = RestoreResult(point.id, host.name, name, None, f"{folder}/{stem}.vmx")
    registered: VmInfo | None = None
    try:
        files: dict[str, str] = {}
        for i, disk in enumerate(sorted(point.disks, key=lambda d: d.key)):
            file_name = f"{stem}.vmdk" if i == 0 else f"{stem}_{i}.vmdk"
            node = nodes[disk.key]
            restored = _write_verified(
                host, repo, disk, node, f"{folder}/{file_name}", options, name, _adapter(repo, point, disk)
            )
            result.disks.append(restored)
            kill_point("restore.disk-written")
            files[node] = file_name
        nvram_name = None
        nvram_src = vmx.get("nvram")
        stored_nvram = point_file(point, posixpath.basename(nvram_src)) if nvram_src else None
        if stored_nvram is not None:
            nvram_name = f"{stem}.nvram"
            host.write_file(f"{folder}/{nvram_name}", repo.read_file(stored_nvram))
        dropped = prepare_restored_vmx(
            vmx, display_name=name, disk_files=files, nvram=nvram_name, keep_identity=options.keep_identity
        )
        if dropped:
            rlog.warning("restore.disks_not_in_point", nodes=dropped)
        host.write_file(result.vmx_path, vmx.dumps().encode("utf-8", "surrogateescape"))
        kill_point("restore.vmx-written")
        registered = host.register_vm(result.vmx_path)
        kill_point("restore.registered")
        result.vmid = registered.vmid
        if not test:  # complete: no longer a leftover (a test VM is one until it is removed)
            host.delete_path(f"{folder}/{RESTORE_MARKER}")
    except BaseException:
        rlog.warning("restore.cleanup", folder=folder)
        try:
            if registered is not None:
                if host.vm(registered).power_state != "poweredOff":
                    host.power_off(registered)
                host.unregister_vm(registered)
            host.delete_path(folder)
        except Exception as exc:  # noqa: BLE001  the original error is the one to report
            rlog.error("restore.cleanup_failed", folder=folder, error=str(exc))
        raise
    rlog.info("restore.done", vmid=result.vmid, vmx=result.vmx_path)
    if options.power_on:  # the restore is complete and verified: a failed power-on keeps the VM
        try:
            host.power_on(registered)
        except EsxiError as exc:
            raise RestoreError(
                f"restored as VM {name!r} (vmid {result.vmid}), but power-on failed: {exc}"
            ) from exc
        result.powered_on = True
    return result


# -- over an existing VM ---------------------------------------------------------------------------


def _relative(vmx_path: str, descriptor: str) -> str:
    """How the .vmx names a disk: relative when it is in the VM's folder, else absolute."""
    vds, vrel = split_ds_path(vmx_path)
    dds, drel = split_ds_path(descriptor)
    if vds == dds and posixpath.dirname(vrel) == posixpath.dirname(drel):
        return posixpath.basename(drel)
    return f"/vmfs/volumes/{dds}/{drel}"


def _power_off(host: RestoreHost, vm: VmInfo, timeout: float) -> None:
    if vm.power_state == "poweredOff":
        return
    try:
        host.shutdown_guest(vm, timeout=timeout)
    except EsxiError as exc:
        log.warning("restore.guest_shutdown_failed", vm=vm.name, error=str(exc))
        host.power_off(vm)


def _base_stem(rel: str) -> str:
    """A disk's file name without ``.vmdk`` and without the suffix of earlier overwrites, so names do not
    grow: ``web01-restored-20260101020304-3fa2.vmdk`` → ``web01``."""
    return re.sub(r"(-restored-\d{14}-[0-9a-f]{4})+$", "", posixpath.basename(rel)[:-5])


def _remove_leftovers(host: RestoreHost, vm: VmInfo, disk_files: Iterable[str]) -> list[str]:
    """Delete what an interrupted overwrite of these disks left behind: ``<disk>-restored-<time>-<random>``
    disks next to them and ``<vmx>-restored-…nvram`` files, that the VM uses neither as the host sees
    it nor in its .vmx file (which a killed run may have written without the reload); returns them."""
    removed: list[str] = []
    vmx = host.read_vmx(vm)
    used = {f for d in vm.disks for f in d.chain}
    named = {posixpath.basename(d.file_name) for d in vmx.disks(include_independent=True)}
    for file in disk_files:
        ds, rel = split_ds_path(file)
        folder = f"[{ds}] {posixpath.dirname(rel)}"
        base = fit_stem(_base_stem(rel), _RESTORED_DISK_SUFFIX)
        ours = re.compile(re.escape(base) + r"-restored-\d{14}-[0-9a-f]{4}\.vmdk")
        for name in host.list_folder(folder, "*-restored-*.vmdk"):
            path = f"{folder}/{name}"
            if ours.fullmatch(name) and path not in used and name not in named and path not in removed:
                log.warning("restore.leftover_removed", vm=vm.name, file=path)
                host.delete_disk(path)
                removed.append(path)
    ds, rel = split_ds_path(vm.vmx_path)
    folder = f"[{ds}] {posixpath.dirname(rel)}"
    in_use = vmx.get("nvram")
    stem = fit_stem(posixpath.basename(rel).rsplit(".", 1)[0], _RESTORED_NVRAM_SUFFIX)
    ours = re.compile(re.escape(stem) + r"-restored-\d{14}-[0-9a-f]{4}\.nvram")
    for name in host.list_folder(folder, "*-restored-*.nvram"):
        if ours.fullmatch(name) and name != in_use:
            log.warning("restore.leftover_removed", vm=vm.name, file=f"{folder}/{name}")
            host.delete_path(f"{folder}/{name}")
            removed.append(f"{folder}/{name}")
    return removed


# -- the overwrite journal: what a killed overwrite leaves for the next command ----------------------

JOURNAL_SUFFIX = ".esxi-reconciler-overwrite.json"
MAX_FOLDER_DEPTH = 4
"""Deepest VM folder below a datastore's root that the daemon looks for journals in."""


@dataclass(frozen=True)
class OverwriteJournal:
    """Written into the VM's folder before an overwrite powers the VM off and removed when it is done.
    A killed run leaves it behind, so the next ``restore`` of the VM knows that an unfinished overwrite
    powered it off, which power state to give back (``--abort``) and which files that run replaced."""

    point: str
    source: str
    """The point's VM, for people (:func:`describe_source`)."""
    started: datetime
    power_state: str | None
    """The VM's power state before the overwrite (before the first of several interrupted ones);
    None: unknown (an unreadable journal)."""
    stamp: str
    replaced: tuple[str, ...] = ()
    """Datastore paths of the disks being replaced."""
    nvram: str | None = None
    """Datastore path of the .nvram being replaced (whole-VM overwrite, set just before the switch)."""
    cbt_nodes: tuple[str, ...] = ()
    """Disks whose CBT the switch turns off and on again (set just before the switch)."""
    point_vm: str = ""
    """The name of the point's VM (what ``restore`` is given to run the same overwrite again)."""
    other_vm: bool = False
    """A point of another VM (``--to-vm``)."""

    def to_json(self) -> bytes:
        doc = {
            "written_by": "esxi-reconciler restore --overwrite",
            "point": self.point,
            "source": self.source,
            "started": self.started.isoformat(timespec="seconds"),
            "power_state": self.power_state,
            "stamp": self.stamp,
            "replaced": list(self.replaced),
            "nvram": self.nvram,
            "cbt_nodes": list(self.cbt_nodes),
            "point_vm": self.point_vm,
            "other_vm": self.other_vm,
        }
        return json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> OverwriteJournal:
        """Parse a journal; one that cannot be read still says that an overwrite did not finish."""
        try:
            doc = json.loads(data)
            started = datetime.fromisoformat(str(doc["started"]))
            return cls(
                point=str(doc["point"]),
                source=str(doc.get("source") or "?"),
                started=started if started.tzinfo else started.replace(tzinfo=timezone.utc),
                power_state=str(doc["power_state"]) if doc.get("power_state") else None,
                stamp=str(doc.get("stamp") or ""),
                replaced=tuple(str(f) for f in doc.get("replaced") or ()),
                nvram=str(doc["nvram"]) if doc.get("nvram") else None,
                cbt_nodes=tuple(str(n) for n in doc.get("cbt_nodes") or ()),
                point_vm=str(doc.get("point_vm") or ""),
                other_vm=bool(doc.get("other_vm")),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls(point="?", source="?", started=datetime.fromtimestamp(0, timezone.utc),
                       power_state=None, stamp="")  # fmt: skip

    def notice(self, vm: VmInfo, host: str) -> str:
        """One line for the user: what the unfinished overwrite left and the two ways on (the same
        overwrite again, or ``--abort``)."""
        where = f"--host {shlex.quote(host)}"
        rerun = f"esxi-reconciler restore {shlex.quote(self.point_vm or vm.name)} {where} --overwrite"
        if self.point != "?":
            rerun += f" --point {self.point}"
        if self.other_vm:
            rerun += f" --to-vm {shlex.quote(vm.name)}"
        abort = f"esxi-reconciler restore {shlex.quote(vm.name)} {where} --abort"
        was = (
            f"it was {self.power_state} before" if self.power_state else "its earlier power state is unknown"
        )
        state = "is powered off" if vm.power_state == "poweredOff" else f"is {vm.power_state}"
        back = " and power the VM back on" if self.power_state == "poweredOn" else ""
        return (
            f"VM {vm.name!r} on {host} {state} after an overwrite that did not finish (restore point"
            f" {self.point}, started {self.started.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC; {was}):"
            f" run `{rerun}` to finish it, or `{abort}` to give it up{back}"
        )


def journal_path(vm: VmInfo) -> str:
    """``[ds] dir/<vmx name>.esxi-reconciler-overwrite.json`` beside the VM's .vmx."""
    ds, rel = split_ds_path(vm.vmx_path)
    stem = fit_stem(posixpath.basename(rel).rsplit(".", 1)[0], JOURNAL_SUFFIX)
    return f"[{ds}] {posixpath.join(posixpath.dirname(rel), stem + JOURNAL_SUFFIX)}"


def unfinished_overwrite(host: RestoreHost, vm: VmInfo) -> OverwriteJournal | None:
    """The journal an interrupted overwrite of ``vm`` left, if any."""
    path = journal_path(vm)
    if not host.file_exists(path):
        return None
    return OverwriteJournal.from_json(host.read_file(path, 1 << 20))


def unfinished_overwrites(
    host: HostReader, host_name: str, vms: Sequence[VmInfo], datastores: Sequence[str]
) -> tuple[tuple[str, str], ...]:
    """``(VM name, notice)`` for every VM of the host whose folder holds an overwrite journal: one search
    of the host's VM folders, then only the journals found are read (the daemon asks each cycle)."""
    # VMs keep their files in a top-level folder, unless someone made them deeper (VMs/web01/...)
    depth = min(MAX_FOLDER_DEPTH, max((split_ds_path(vm.vmx_path)[1].count("/") for vm in vms), default=1))
    found = set(host.find_in_vm_folders(datastores, "*" + JOURNAL_SUFFIX, max(depth, 1)))
    out = []
    for vm in vms:
        path = journal_path(vm)
        if path in found:
            journal = OverwriteJournal.from_json(host.read_file(path, 1 << 20))
            out.append((vm.name, journal.notice(vm, host_name)))
    return tuple(out)


def _write_journal(host: RestoreHost, vm: VmInfo, journal: OverwriteJournal) -> None:
    host.write_file(journal_path(vm), journal.to_json())


@dataclass
class Settled:
    """What cleaning up after an interrupted overwrite found and did."""

    vm: VmInfo
    switched: bool
    """Whether that overwrite had switched the VM to its (verified) restored disks."""
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    """Replaced files of the VM still in its folder (kept by ``--abort``)."""


def _settle(host: RestoreHost, vm: VmInfo, journal: OverwriteJournal, *, delete_replaced: bool) -> Settled:
    """Clean up after an interrupted overwrite. Before its switch the VM is on its original disks: only
    the restored files it does not use go. After the switch it is on verified restored disks: CBT is
    switched on again where that run had switched it off, and the files it replaced are deleted
    (``delete_replaced``: a new overwrite, which replaces them anyway) or kept and listed (``--abort``:
    nothing the VM had is deleted without an overwrite that says so). The .vmx file decides which side
    of the switch the VM is on: a run killed between writing it and the reload has switched."""
    if vm.snapshots:
        raise RestoreError(f"VM {vm.name!r} has snapshots (a backup running?); try again once they are gone")
    vmx = host.read_vmx(vm)
    named = {posixpath.basename(d.file_name) for d in vmx.disks(include_independent=True)}
    switched = bool(journal.replaced) and not any(posixpath.basename(f) in named for f in journal.replaced)
    if not switched:
        return Settled(vm, False, _remove_leftovers(host, vm, [d.file for d in vm.disks]))
    if vm.power_state == "poweredOff":
        off = [n for n in journal.cbt_nodes if not vmx.is_true(f"{n}.ctkEnabled")]
        for node in off:
            vmx.set(f"{node}.ctkEnabled", "TRUE")
        if off:
            host.write_file(vm.vmx_path, vmx.dumps().encode("utf-8", "surrogateescape"))
        hostd = {f for d in vm.disks for f in d.chain}
        if off or any(f in hostd for f in journal.replaced):  # edited, or written but not reloaded
            vm = host.reload_vm(vm)
    used = {f for d in vm.disks for f in d.chain}
    files = [f for f in journal.replaced if f not in used and host.file_exists(f)]
    old_nvram = journal.nvram
    if old_nvram and posixpath.basename(old_nvram) != vmx.get("nvram") and host.file_exists(old_nvram):
        files.append(old_nvram)
    if not delete_replaced:
        return Settled(vm, True, kept=files)
    for f in files:
        log.warning("restore.replaced_file_deleted", vm=vm.name, file=f)
        if f.lower().endswith(".vmdk"):
            host.delete_disk(f)
        else:
            host.delete_path(f)
    return Settled(vm, True, removed=files)


@dataclass
class AbortResult:
    journal: OverwriteJournal
    vm: VmInfo
    switched: bool
    removed: list[str]
    kept: list[str]
    powered_on: bool


def abort_overwrite(host: RestoreHost, target: VmInfo) -> AbortResult | None:
    """Give up the interrupted overwrite of ``target`` (None: there is none): remove what it wrote
    (before its switch; after it the VM stays on the verified restored disks and the replaced files are
    kept), power the VM on if it was on before, and remove the journal."""
    with vm_lock(host.identity, target.vmid):
        vm = host.vm(target)
        journal = unfinished_overwrite(host, vm)
        if journal is None:
            return None
        settled = _settle(host, vm, journal, delete_replaced=False)
        vm = settled.vm
        powered_on = False
        if journal.power_state == "poweredOn" and vm.power_state != "poweredOn":
            vm = host.power_on(vm)
            powered_on = True
        host.delete_path(journal_path(vm))
    log.info("restore.overwrite_aborted", vm=vm.name, point=journal.point, switched=settled.switched)
    return AbortResult(journal, vm, settled.switched, settled.removed, settled.kept, powered_on)


def _point_configuration(
    host: RestoreHost,
    repo: Repository,
    point: RestorePoint,
    vm: VmInfo,
    point_vmx_file: VmxFile,
    current: VmxFile,
    stamp: str,
) -> tuple[VmxFile, str | None]:
    """The .vmx a whole-VM overwrite switches to: the point's (memory, CPUs, devices, identity as backed
    up) under the VM's current display name, with the point's .nvram written beside the current one
    under a new name (so the one .vmx rename switches both). Returns it and the datastore path of the
    replaced .nvram to delete after the switch (None: none replaced)."""
    vmx = VmxFile.parse(point_vmx_file.dumps())
    vmx.set("displayName", vm.name)
    src = vmx.get("nvram")
    stored = point_file(point, posixpath.basename(src)) if src else None
    if stored is None:
        return vmx, None
    ds, rel = split_ds_path(vm.vmx_path)
    folder = posixpath.dirname(rel)
    stem = fit_stem(posixpath.basename(rel).rsplit(".", 1)[0], _RESTORED_NVRAM_SUFFIX)
    name = f"{stem}-restored-{stamp}.nvram"
    host.write_file(f"[{ds}] {posixpath.join(folder, name)}", repo.read_file(stored))
    vmx.set("nvram", name)
    previous = current.get("nvram")
    if not previous or "/" in previous:
        return vmx, None
    return vmx, f"[{ds}] {posixpath.join(folder, previous)}"


_VM_IDENTITY = ("uuid.bios", "uuid.location", "vc.uuid", "uuid.action")
_NIC_IDENTITY = ("addressType", "address", "generatedAddress", "generatedAddressOffset")
_NIC = re.compile(r"^(ethernet\d+)\.present$", re.IGNORECASE)


def _keep_identity(vmx: VmxFile, current: VmxFile) -> None:
    """Give the configuration switched onto another VM (``--to-vm``) that VM's own identity: its BIOS
    and vCenter UUIDs and MAC addresses, so two VMs never share them; a network card it does not have
    gets a generated address."""
    for key in _VM_IDENTITY:
        value = current.get(key)
        if value is None:
            vmx.remove(key)
        else:
            vmx.set(key, value)
    for key, _ in vmx.items():
        m = _NIC.match(key)
        if m is None:
            continue
        nic = m.group(1)
        has_nic = f"{nic}.present" in current
        for suffix in _NIC_IDENTITY:
            value = current.get(f"{nic}.{suffix}") if has_nic else None
            if value is None:
                vmx.remove(f"{nic}.{suffix}")
            else:
                vmx.set(f"{nic}.{suffix}", value)
        if not has_nic:
            vmx.set(f"{nic}.addressType", "generated")


def check_overwrite(point: RestorePoint, host: str, vm: VmInfo, *, other_vm: bool) -> None:
    """Refuse to put a point over a VM it is not of (another host's VM of the same name, a re-created
    VM), unless the caller says so explicitly (``other_vm``: ``--to-vm``)."""
    if other_vm or same_vm(point, host, vm):
        return
    name = shlex.quote(vm.name)
    raise RestoreError(
        f"restore point {point.id} is of {describe_source(point)}, not of VM {vm.name!r} on {host}"
        f" (uuid {vm.uuid or '?'}) that would be overwritten; nothing changed. Use a point of that VM"
        f" (`esxi-reconciler points --vm {name}` shows each point's host and uuid), or, to put this other"
        f" VM's point over it anyway, name the target with --to-vm {name}"
    )


class OverwriteFailed(RestoreError):
    """An overwrite stopped after it had powered the VM off; says where the VM is left and the way on."""

    def __init__(self, cause: str, vm_state: str) -> None:
        super().__init__(f"{cause}; {vm_state}")
        self.cause = cause
        self.vm_state = vm_state


def _cause(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, SystemExit):
        return f"stopped (exit status {exc.code})"
    return str(exc) or exc.__class__.__name__


def _find_again(host: RestoreHost, vm: VmInfo) -> VmInfo:
    """The VM after a failure: by vmid, else by its .vmx (a reload re-registers it with a new vmid
    where there is no SSH); registered again if the failure came between unregister and register."""
    try:
        return host.vm(vm)
    except EsxiError:
        found = [v for v in host.list_vms() if v.vmx_path == vm.vmx_path]
        if found:
            return found[0]
        log.warning("restore.reregister", vm=vm.name, vmx=vm.vmx_path)
        return host.register_vm(vm.vmx_path)


def _after_failure(host: RestoreHost, vm: VmInfo, journal: OverwriteJournal) -> str:
    """After an overwrite stopped: before its switch, remove what it wrote and give the VM its power
    state back (the VM is as it was; the journal goes); after it, leave the journal for the next
    command. Returns where the VM is left, for the user."""
    try:
        vm = _find_again(host, vm)
        settled = _settle(host, vm, journal, delete_replaced=False)
        vm = settled.vm
        if settled.switched:
            return "the VM is on the verified restored disks, but " + journal.notice(vm, host.name)
        powered = ""
        if journal.power_state == "poweredOn" and vm.power_state != "poweredOn":
            vm = host.power_on(vm)
            powered = ", and powered on again"
        host.delete_path(journal_path(vm))
        return f"VM {vm.name!r} is unchanged, on its original disks{powered}"
    except Exception as exc:  # noqa: BLE001  the host may be gone: the journal stays for the next command
        log.error("restore.overwrite_cleanup_failed", vm=vm.name, error=str(exc))
        return f"cleaning up failed too ({exc}): " + journal.notice(vm, host.name)


def _stage(options: RestoreOptions, name: str) -> None:
    kill_point(f"restore.overwrite-{name}")
    if options.on_stage is not None:
        options.on_stage(name)


def restore_overwrite(  # noqa: C901  the overwrite's journal steps in order; each failure point needs its own way back (module doc)
    host: RestoreHost,
    repo: Repository,
    point: RestorePoint,
    target: VmInfo,
    options: RestoreOptions,
    *,
    disk: str | None = None,
    other_vm: bool = False,
) -> RestoreResult:
    """Replace the disks of the existing VM ``target`` (all of the point's, or the one named by
    ``disk``) with the point's content, keeping the originals until the restored ones are verified and
    the .vmx switched (see the module doc). The point must be of ``target`` itself (host and UUID)
    unless ``other_vm``; then ``target`` keeps its own identity. The VM is powered off first (guest
    shutdown, then hard off after ``shutdown_timeout``) and powered on afterwards only with
    ``power_on``. A journal in the VM's folder (:class:`OverwriteJournal`) lets the next command finish
    or undo a killed run; a failure before the switch removes what was written and powers the VM on
    again if it was on; any failure after the power-off raises :class:`OverwriteFailed`."""
    _, point_vmx_file = point_vmx(repo, point)
    nodes = disk_nodes(point_vmx_file, point)
    chosen = [select_disk(point, nodes, disk)] if disk else list(point.disks)
    rlog = log.bind(point=point.id, vm=target.name, host=host.name)
    with vm_lock(host.identity, target.vmid):
        vm = host.vm(target)
        check_overwrite(point, host.name, vm, other_vm=other_vm)
        other_identity = not same_vm(point, host.name, vm)
        if vm.snapshots:
            raise RestoreError(f"VM {vm.name!r} has snapshots; remove them before overwriting its disks")
        earlier = unfinished_overwrite(host, vm)
        if earlier is not None:  # finish what a killed run left before replacing anything
            rlog.warning(
                "restore.unfinished_overwrite", earlier=earlier.point, power_state=earlier.power_state
            )
            vm = _settle(host, vm, earlier, delete_replaced=True).vm
        current = {d.key: d for d in vm.disks}
        pairs: list[tuple[DiskRecord, DiskInfo]] = []
        for rec in chosen:
            cur = current.get(rec.key)
            if cur is None or cur.node is None:
                raise RestoreError(f"VM {vm.name!r} has no disk {rec.label} (key {rec.key}) to overwrite")
            if cur.capacity != rec.capacity:
                rlog.warning("restore.capacity_differs", disk=rec.label, now=cur.capacity, point=rec.capacity)
            pairs.append((rec, cur))
        by_ds: dict[str, int] = {}
        for rec, cur in pairs:
            ds = split_ds_path(cur.file)[0]
            sparse = options.thin and host.ssh_enabled
            by_ds[ds] = by_ds.get(ds, 0) + (stored_bytes(repo, rec) if sparse else rec.capacity)
        for ds, need in by_ds.items():
            _check_space(host, ds, need)
        _remove_leftovers(host, vm, [cur.file for _, cur in pairs])
        stamp = f"{datetime.now(timezone.utc):%Y%m%d%H%M%S}-{secrets.token_hex(2)}"
        before = earlier.power_state if earlier is not None and earlier.power_state else vm.power_state
        journal = OverwriteJournal(
            point.id,
            describe_source(point),
            datetime.now(timezone.utc),
            before,
            stamp,
            tuple(cur.file for _, cur in pairs),
            point_vm=point.vm.name,
            other_vm=other_identity or point.vm.name != vm.name,
        )
        _write_journal(host, vm, journal)  # before anything changes: a killed run is found by the next one
        rlog.info("restore.overwrite_start", disks=[r.label for r, _ in pairs], power_state=before)
        result = RestoreResult(point.id, host.name, vm.name, vm.vmid, vm.vmx_path, power_state_before=before)
        written: list[RestoredDisk] = []
        try:
            _power_off(host, vm, options.shutdown_timeout)
            _stage(options, "powered-off")
            for rec, cur in pairs:
                ds, rel = split_ds_path(cur.file)
                name = f"{fit_stem(_base_stem(rel), _RESTORED_DISK_SUFFIX)}-restored-{stamp}.vmdk"
                new = f"[{ds}] {posixpath.join(posixpath.dirname(rel), name)}"
                written.append(
                    _write_verified(
                        host, repo, rec, cur.node or "", new, options, vm.name, _adapter(repo, point, rec)
                    )
                )
            current_vmx = host.read_vmx(vm)
            old_nvram: str | None = None
            if disk is None:
                vmx, old_nvram = _point_configuration(
                    host, repo, point, vm, point_vmx_file, current_vmx, stamp
                )
                if other_identity:
                    _keep_identity(vmx, current_vmx)
                where = {
                    d.node: nodes.get(rec.key, d.node) for (rec, _), d in zip(pairs, written, strict=True)
                }
                written = [replace(d, node=where[d.node]) for d in written]
            else:
                vmx = current_vmx
            tracked = [d.node for d in written if vmx.is_true(f"{d.node}.ctkEnabled")]
            journal = replace(journal, nvram=old_nvram, cbt_nodes=tuple(tracked))
            _write_journal(host, vm, journal)
            _stage(options, "written")
            # the switch: one atomic .vmx rename; before it the VM is on the originals, after it on
            # verified restored disks (and, for the whole VM, on the point's configuration)
            for d in written:
                vmx.set(f"{d.node}.fileName", _relative(vm.vmx_path, d.descriptor))
                if d.node in tracked:
                    vmx.set(f"{d.node}.ctkEnabled", "FALSE")  # reset CBT: the old changeIds must not match
            host.write_file(vm.vmx_path, vmx.dumps().encode("utf-8", "surrogateescape"))
            vm = host.reload_vm(vm)
            if tracked:
                _stage(options, "cbt-reset")
                for node in tracked:
                    vmx.set(f"{node}.ctkEnabled", "TRUE")  # tracking restarts at the next power-on
                host.write_file(vm.vmx_path, vmx.dumps().encode("utf-8", "surrogateescape"))
                vm = host.reload_vm(vm)
            result.vmid = vm.vmid
            now = {d.key: d for d in vm.disks}
            for rec, cur in pairs:
                if now.get(rec.key) is None or now[rec.key].file == cur.file:
                    raise RestoreError(
                        f"VM {vm.name!r} still uses {cur.file} after the switch; originals kept"
                    )
            _stage(options, "switched")
            for _, cur in pairs:
                rlog.info("restore.original_deleted", file=cur.file)
                host.delete_disk(cur.file)
            if old_nvram is not None:
                host.delete_path(old_nvram)
            host.delete_path(journal_path(vm))
        except BaseException as exc:
            state = _after_failure(host, vm, journal)
            rlog.error("restore.overwrite_failed", error=_cause(exc), state=state)
            raise OverwriteFailed(_cause(exc), state) from exc
        result.disks = written
    rlog.info("restore.overwrite_done", disks=[d.descriptor for d in written])
    if options.power_on:  # the restore is complete and verified: a failed power-on changes nothing
        try:
            host.power_on(vm)
        except EsxiError as exc:
            raise RestoreError(f"overwrote VM {vm.name!r} (verified), but power-on failed: {exc}") from exc
        result.powered_on = True
    return result


# -- test restore ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestRestoreResult:
    """The outcome of a test restore (a status condition of the VM's verify policy)."""

    __test__ = False  # not a pytest test class
    vm: str
    point_id: str
    host: str
    datastore: str | None
    ok: bool
    power_state: str | None = None
    heartbeat: str | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def message(self) -> str:
        if not self.ok:
            return f"test restore of {self.vm} (point {self.point_id}) on {self.host} FAILED: {self.error}"
        beat = f", guest heartbeat {self.heartbeat}" if self.heartbeat else ""
        return (
            f"test restore of {self.vm} (point {self.point_id}) on {self.host}: {self.power_state}{beat}"
            f" in {self.seconds:.0f}s; removed"
        )


def run_test_restore(
    host: RestoreHost,
    repo: Repository,
    point: RestorePoint,
    *,
    datastore: str | None = None,
    boot_timeout: float = 300.0,
    heartbeat_timeout: float = 300.0,
    progress: Progress | None = None,
) -> TestRestoreResult:
    """Restore ``point`` as a temporary VM, power it on, wait for ``poweredOn`` and a green guest
    heartbeat (where the host reports one: ``gray`` means no Tools, which is not a failure), then
    power it off, unregister it and delete its files, whatever happened."""
    started = time.monotonic()
    name = temporary_vm_name(point.vm.name)  # one name per VM: a killed test restore's VM is found again
    options = RestoreOptions(name=name, datastore=datastore, progress=progress)
    result: RestoreResult | None = None
    state: str | None = None
    beat: str | None = None
    error: str | None = None
    try:
        result = restore_new_vm(host, repo, point, options, test=True)
        assert result.vmid is not None
        state = host.power_on(result.vmid, timeout=boot_timeout).power_state
        kill_point("restore.test-powered-on")
        deadline = time.monotonic() + heartbeat_timeout
        while True:
            beat = host.guest_heartbeat(result.vmid)
            if beat in ("green", "gray") or time.monotonic() > deadline:
                break
            time.sleep(2.0)
        if beat not in ("green", "gray"):
            error = f"guest heartbeat {beat} after {heartbeat_timeout:.0f}s"
    except Exception as exc:  # noqa: BLE001  any failure of the test restore is its result (in the outcome); the VM is still removed below
        error = str(exc) or exc.__class__.__name__
    finally:
        if result is not None and result.vmid is not None:
            try:
                if host.vm(result.vmid).power_state != "poweredOff":
                    host.power_off(result.vmid)
                host.unregister_vm(result.vmid)
                host.delete_path(result.vmx_path.rsplit("/", 1)[0])  # the folder restore_new_vm made
            except Exception as exc:  # noqa: BLE001  a failed cleanup is reported with the result; the test's own error stays first
                error = error or f"cleanup failed: {exc}"
                log.error("restore.test_cleanup_failed", vm=name, error=str(exc))
    ok = error is None
    log.info(
        "restore.test_result",
        vm=point.vm.name,
        point=point.id,
        ok=ok,
        state=state,
        heartbeat=beat,
        error=error,
    )
    return TestRestoreResult(
        point.vm.name, point.id, host.name, datastore, ok, state, beat, time.monotonic() - started, error
    )


def test_restore(
    desired: DesiredState,
    repository: str,
    vm: str,
    point_id: str | None,
    host: str,
    datastore: str | None,
) -> TestRestoreResult:
    """For the apply executor (a ``RunTestRestore`` action): open the configured repository and host,
    test-restore ``vm``'s point (``None``/``latest``: the newest successful one)."""
    from reconciler.operations.hosts import connect
    from reconciler.operations.repositories import open_repository

    repo = open_repository(desired.repositories[repository])
    with repo.lock(purpose=f"test restore of {vm}"):
        point = find_point(repo, vm, point_id)
        with connect(desired.host(host)) as esxi:
            return run_test_restore(esxi, repo, point, datastore=datastore)


test_restore.__test__ = False  # type: ignore[attr-defined]
