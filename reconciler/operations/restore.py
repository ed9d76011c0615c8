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
  disks deleted. A kill at any moment before the rename leaves the VM on its original disks (the
  half-written ``-restored-`` files are the only leftover, removed by the next overwrite of the VM);
  after it, on verified restored disks. A whole-VM overwrite switches to the point's configuration in
  the same rename (its .vmx under the VM's current name, its .nvram written beforehand under a new
  name); ``--disk`` keeps the current configuration.
  The per-VM lock of :mod:`.vmlock` is held throughout, so no backup of this machine runs meanwhile.
* **The next backup is correct**: a restored disk is a new baseline. CBT of an overwritten disk is
  reset (its ``ctkEnabled`` switched off, reloaded, and on again), so the old changeIds are refused
  and the next backup falls back to a full read; the free-host digest compare compares content and
  needs nothing.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import structlog

from reconciler.config.model import DesiredState
from reconciler.esxi.errors import EsxiError, InsufficientSpaceError
from reconciler.esxi.host import EsxiHost
from reconciler.esxi.transport import ordered_parallel
from reconciler.esxi.vmdk import Descriptor
from reconciler.esxi.vmx import VmxFile, prepare_restored_vmx
from reconciler.facts.inventory import DiskInfo, VmInfo, split_ds_path
from reconciler.facts.points import DiskRecord, RestorePoint, StoredFile
from reconciler.operations.progress import Progress
from reconciler.operations.vmlock import vm_lock
from reconciler.repository import HOLE, Repository

log = structlog.get_logger(__name__)

OnData = Callable[[DiskRecord, int, int], None]
_ZERO = bytes(1 << 20)


class RestoreError(Exception):
    """A restore cannot be done or failed, with a message for the user."""


# -- reading a point -----------------------------------------------------------------------------


def disk_pieces(repo: Repository, disk: DiskRecord, *, streams: int = 4) -> Iterator[tuple[int, bytes]]:
    """The stored (non-hole) chunks of a disk as ``(offset, bytes)``, in disk order, decrypted on
    ``streams`` threads; what is not yielded is zero."""
    index = repo.read_index(disk.index)
    if index.capacity != disk.capacity:
        raise RestoreError(f"disk {disk.label}: index has {index.capacity} bytes, the point {disk.capacity}")
    size = index.chunk_size
    work = [(slot * size, index.chunk_length(slot)) for slot in range(index.count) if index[slot] != HOLE]
    return ordered_parallel(work, lambda off, n: repo.read_chunk(index[off // size])[:n], streams)


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


def find_point(repo: Repository, vm: str, point_id: str | None) -> RestorePoint:
    """The point ``point_id`` (must be of ``vm``), or with None/``latest`` the newest successful one."""
    if point_id and point_id != "latest":
        try:
            point = repo.read_point(point_id)
        except Exception as exc:
            raise RestoreError(f"restore point {point_id}: {exc}") from exc
        if point.vm.name != vm:
            raise RestoreError(f"restore point {point_id} is of VM {point.vm.name!r}, not {vm!r}")
        return point
    points = [p for p in repo.list_points(vm=vm) if p.status == "success"]
    if not points:
        raise RestoreError(f"no successful restore point of VM {vm!r} in the repository")
    return points[-1]


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
    sha256: str
    written: int


@dataclass
class RestoreResult:
    point_id: str
    host: str
    vm_name: str
    vmid: str | None
    vmx_path: str
    disks: list[RestoredDisk] = field(default_factory=list)
    powered_on: bool = False


@dataclass(frozen=True)
class RestoreOptions:
    """How to restore; ``on_data`` is a test seam called for every piece written."""

    name: str | None = None
    datastore: str | None = None
    keep_identity: bool = False
    power_on: bool = False
    thin: bool = True
    streams: int = 4
    shutdown_timeout: float = 300.0
    progress: Progress | None = None
    on_data: OnData | None = None


def default_name(vm: str, now: datetime | None = None) -> str:
    moment = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return f"{vm}-restored-{moment:%Y%m%d-%H%M}"


def safe_file_name(name: str) -> str:
    """A folder/file name for a VM name: ``/`` and control characters replaced (ESXi keeps the rest,
    spaces, quotes and non-ASCII included)."""
    cleaned = re.sub(r"[/\x00-\x1f\x7f]", "_", name).strip()
    return cleaned if cleaned not in ("", ".", "..") else "vm"


# -- writing one disk ------------------------------------------------------------------------------


def _write_verified(
    host: EsxiHost,
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
    digest = ContentHash()
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
    host.write_disk(
        flat, disk.capacity, hashed(disk_pieces(repo, disk, streams=options.streams), digest), on_written
    )
    if item is not None:
        item.done()
    expected = digest.hexdigest(disk.capacity)
    actual = host.file_sha256(flat, timeout=max(3600.0, disk.capacity / (50 << 20)))  # ≥ 50 MiB/s
    if actual != expected:
        raise RestoreError(
            f"disk {disk.label}: the written disk {flat} has SHA-256 {actual}, the restore point {expected}"
        )
    dlog.info("restore.disk_verified", sha256=expected, written=written)
    return RestoredDisk(disk.label, node, descriptor, expected, written)


def _check_space(host: EsxiHost, datastore: str, need: int) -> None:
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


def restore_new_vm(
    host: EsxiHost, repo: Repository, point: RestorePoint, options: RestoreOptions
) -> RestoreResult:
    """Restore ``point`` as a new VM on ``host`` (see the module doc); returns it registered."""
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
    if any(v.name == name for v in host.list_vms()):
        raise RestoreError(
            f"host {host.name} already has a VM named {name!r}; choose another --name, or replace that VM's"
            " disks with --overwrite"
        )
    sparse = options.thin and host.shell is not None  # an HTTPS upload writes the holes too
    need = sum(stored_bytes(repo, d) if sparse else d.capacity for d in point.disks)
    _check_space(host, datastore, need + sum(f.size for f in point.files))
    stem = safe_file_name(name)
    folder = f"[{datastore}] {stem}"
    if host.folder_exists(folder):
        raise RestoreError(f"folder {folder} already exists; choose another --name")
    rlog.info("restore.start", folder=folder, disks=len(point.disks), need=need)
    host.make_directory(folder)
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
        registered = host.register_vm(result.vmx_path)
        result.vmid = registered.vmid
    except BaseException:
        rlog.warning("restore.cleanup", folder=folder)
        try:
            if registered is not None:
                if host.vm(registered).power_state != "poweredOff":
                    host.power_off(registered)
                host.unregister_vm(registered)
            host.delete_path(folder)
        except Exception as exc:  # the original error is the one to report
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


def _power_off(host: EsxiHost, vm: VmInfo, timeout: float) -> None:
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


def _remove_leftovers(host: EsxiHost, vm: VmInfo, pairs: list[tuple[DiskRecord, DiskInfo]]) -> None:
    """Delete what an interrupted overwrite of these disks left behind: ``<disk>-restored-<time>-<random>``
    disks next to them that the VM does not use."""
    used = {f for d in vm.disks for f in d.chain}
    for _, cur in pairs:
        ds, rel = split_ds_path(cur.file)
        folder = f"[{ds}] {posixpath.dirname(rel)}"
        ours = re.compile(re.escape(_base_stem(rel)) + r"-restored-\d{14}-[0-9a-f]{4}\.vmdk")
        for name in host.list_folder(folder, "*-restored-*.vmdk"):
            path = f"{folder}/{name}"
            if ours.fullmatch(name) and path not in used:
                log.warning("restore.leftover_removed", vm=vm.name, file=path)
                host.delete_disk(path)
    ds, rel = split_ds_path(vm.vmx_path)
    folder = f"[{ds}] {posixpath.dirname(rel)}"
    in_use = host.read_vmx(vm).get("nvram")
    stem = posixpath.basename(rel).rsplit(".", 1)[0]
    ours = re.compile(re.escape(stem) + r"-restored-\d{14}-[0-9a-f]{4}\.nvram")
    for name in host.list_folder(folder, "*-restored-*.nvram"):
        if ours.fullmatch(name) and name != in_use:
            log.warning("restore.leftover_removed", vm=vm.name, file=f"{folder}/{name}")
            host.delete_path(f"{folder}/{name}")


def _point_configuration(
    host: EsxiHost,
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
    name = f"{posixpath.basename(rel).rsplit('.', 1)[0]}-restored-{stamp}.nvram"
    host.write_file(f"[{ds}] {posixpath.join(folder, name)}", repo.read_file(stored))
    vmx.set("nvram", name)
    previous = current.get("nvram")
    if not previous or "/" in previous:
        return vmx, None
    return vmx, f"[{ds}] {posixpath.join(folder, previous)}"


def restore_overwrite(
    host: EsxiHost,
    repo: Repository,
    point: RestorePoint,
    target: VmInfo,
    options: RestoreOptions,
    *,
    disk: str | None = None,
) -> RestoreResult:
    """Replace the disks of the existing VM ``target`` (all of the point's, or the one named by
    ``disk``) with the point's content, keeping the originals until the restored ones are verified and
    the .vmx switched (see the module doc). The VM is powered off first (guest shutdown, then hard off
    after ``shutdown_timeout``) and powered on afterwards only with ``power_on``."""
    _, point_vmx_file = point_vmx(repo, point)
    nodes = disk_nodes(point_vmx_file, point)
    chosen = [select_disk(point, nodes, disk)] if disk else list(point.disks)
    rlog = log.bind(point=point.id, vm=target.name, host=host.name)
    with vm_lock(host.identity, target.vmid):
        vm = host.vm(target)
        if vm.snapshots:
            raise RestoreError(f"VM {vm.name!r} has snapshots; remove them before overwriting its disks")
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
            sparse = options.thin and host.shell is not None
            by_ds[ds] = by_ds.get(ds, 0) + (stored_bytes(repo, rec) if sparse else rec.capacity)
        for ds, need in by_ds.items():
            _check_space(host, ds, need)
        _remove_leftovers(host, vm, pairs)
        rlog.info("restore.overwrite_start", disks=[r.label for r, _ in pairs])
        _power_off(host, vm, options.shutdown_timeout)
        stamp = f"{datetime.now(timezone.utc):%Y%m%d%H%M%S}-{secrets.token_hex(2)}"
        result = RestoreResult(point.id, host.name, vm.name, vm.vmid, vm.vmx_path)
        written: list[RestoredDisk] = []
        try:
            for rec, cur in pairs:
                ds, rel = split_ds_path(cur.file)
                name = f"{_base_stem(rel)}-restored-{stamp}.vmdk"
                new = f"[{ds}] {posixpath.join(posixpath.dirname(rel), name)}"
                written.append(
                    _write_verified(
                        host, repo, rec, cur.node or "", new, options, vm.name, _adapter(repo, point, rec)
                    )
                )
        except BaseException:
            for d in written:  # the VM still uses its original disks: only our new files go
                try:
                    host.delete_disk(d.descriptor)
                except Exception as exc:
                    rlog.error("restore.cleanup_failed", file=d.descriptor, error=str(exc))
            raise
        # the switch: one atomic .vmx rename; before it the VM runs on the originals, after it on
        # verified restored disks (and, for the whole VM, on the point's configuration)
        current_vmx = host.read_vmx(vm)
        old_nvram: str | None = None
        if disk is None:
            vmx, old_nvram = _point_configuration(host, repo, point, vm, point_vmx_file, current_vmx, stamp)
            where = {d.node: nodes.get(rec.key, d.node) for (rec, _), d in zip(pairs, written, strict=True)}
            written = [replace(d, node=where[d.node]) for d in written]
        else:
            vmx = current_vmx
        tracked = [d.node for d in written if vmx.is_true(f"{d.node}.ctkEnabled")]
        for d in written:
            vmx.set(f"{d.node}.fileName", _relative(vm.vmx_path, d.descriptor))
            if d.node in tracked:
                vmx.set(f"{d.node}.ctkEnabled", "FALSE")  # reset CBT: the old changeIds must not match
        host.write_file(vm.vmx_path, vmx.dumps().encode("utf-8", "surrogateescape"))
        vm = host.reload_vm(vm)
        if tracked:
            for node in tracked:
                vmx.set(f"{node}.ctkEnabled", "TRUE")  # tracking restarts at the next power-on
            host.write_file(vm.vmx_path, vmx.dumps().encode("utf-8", "surrogateescape"))
            vm = host.reload_vm(vm)
        result.vmid = vm.vmid
        now = {d.key: d for d in vm.disks}
        for rec, cur in pairs:
            if now.get(rec.key) is None or now[rec.key].file == cur.file:
                raise RestoreError(f"VM {vm.name!r} still uses {cur.file} after the switch; originals kept")
        for _, cur in pairs:
            rlog.info("restore.original_deleted", file=cur.file)
            host.delete_disk(cur.file)
        if old_nvram is not None:
            host.delete_path(old_nvram)
        result.disks = written
        if options.power_on:
            host.power_on(vm)
            result.powered_on = True
    rlog.info("restore.overwrite_done", disks=[d.descriptor for d in written])
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
    host: EsxiHost,
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
    name = f"{point.vm.name}-testrestore-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    options = RestoreOptions(name=name, datastore=datastore, progress=progress)
    result: RestoreResult | None = None
    state: str | None = None
    beat: str | None = None
    error: str | None = None
    try:
        result = restore_new_vm(host, repo, point, options)
        assert result.vmid is not None
        state = host.power_on(result.vmid, timeout=boot_timeout).power_state
        deadline = time.monotonic() + heartbeat_timeout
        while True:
            beat = host.guest_heartbeat(result.vmid)
            if beat in ("green", "gray") or time.monotonic() > deadline:
                break
            time.sleep(2.0)
        if beat not in ("green", "gray"):
            error = f"guest heartbeat {beat} after {heartbeat_timeout:.0f}s"
    except Exception as exc:
        error = str(exc) or exc.__class__.__name__
    finally:
        if result is not None and result.vmid is not None:
            try:
                if host.vm(result.vmid).power_state != "poweredOff":
                    host.power_off(result.vmid)
                host.unregister_vm(result.vmid)
                host.delete_path(result.vmx_path.rsplit("/", 1)[0])  # the folder restore_new_vm made
            except Exception as exc:
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
    from reconciler.operations.backup import open_repository
    from reconciler.operations.hosts import connect

    repo = open_repository(desired.repositories[repository])
    with repo.lock(purpose=f"test restore of {vm}"):
        point = find_point(repo, vm, point_id)
        with connect(desired.host(host)) as esxi:
            return run_test_restore(esxi, repo, point, datastore=datastore)


test_restore.__test__ = False  # type: ignore[attr-defined]
