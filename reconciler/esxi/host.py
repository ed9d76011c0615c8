"""``EsxiHost``: the one interface the backup engine uses to talk to a standalone ESXi host.

The implementation picks the vSphere API or SSH per operation and per licence; the engine never asks:

================================  ==========================  ====================================
operation                         licensed host               free host
================================  ==========================  ====================================
inventory, snapshot tree, space   API (reads)                 API (reads work on free hosts)
snapshot create / remove          API tasks                   ``vim-cmd`` over SSH, confirmed via API
changed areas (CBT)               QueryChangedDiskAreas       refused → :class:`FullBackupNeededError`
                                                              (use :meth:`EsxiHost.digest_compare`)
CBT on/off                        ReconfigVM + stun cycle     ``.vmx`` edit over SSH (VM off) + reload
small files (.vmx, descriptors)   SSH ``cat`` if enabled, else HTTPS ``/folder``
disk data                         HTTPS Range (default when the API is reachable) or ``dd`` over SSH
================================  ==========================  ====================================

When a host configured or detected as licensed answers ``RestrictedVersion`` anyway, snapshot and CBT
operations fall back to SSH (if enabled) and stay there for the session.

Snapshots are identified by **our** id only and ``removeall`` is never used. Ours are named
``<prefix><UTC time>-<random>`` (prefix ``esxi-reconciler-``). :meth:`EsxiHost.backup_snapshot` is the
context manager for one backup: it refuses VMs with foreign snapshots, creates ours, finds the frozen
disks, and **always** removes ours on the way out — on exceptions, timeouts, ``KeyboardInterrupt``
and, if the process turns SIGTERM into an exception (use :func:`sigterm_raises` in the main thread),
on SIGTERM. SIGINT/SIGTERM arriving *during* the removal are deferred until it is done. It then
verifies the chain (backings back at the pre-backup files, our delta files gone) and raises
:class:`ChainNotCleanError` if not. SIGKILL cannot be caught: the next run finds the leftover with
:meth:`EsxiHost.find_orphaned_snapshots` and removes it with
:meth:`EsxiHost.remove_orphaned_snapshots`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import posixpath
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pyVmomi import vim, vmodl

from reconciler.esxi import vimcmd
from reconciler.esxi.api import ApiSession, license_kind_from_editions, mapped_faults, wait_task
from reconciler.esxi.errors import (
    ApiError,
    ChainNotCleanError,
    CommandError,
    EsxiError,
    ForeignSnapshotError,
    FullBackupNeededError,
    InsufficientSpaceError,
    PowerStateTimeoutError,
    ProtocolError,
    RestrictedByLicenseError,
    ShellError,
    SnapshotError,
    SnapshotTimeoutError,
    TaskTimeoutError,
    UnsupportedDiskError,
)
from reconciler.esxi.hostdigest import (
    BLOCK_SIZE,
    Allocation,
    DigestResult,
    allocation_on_host,
    compare_on_host,
)
from reconciler.esxi.shell import ShellSession
from reconciler.esxi.transport import DiskReader, HttpsRangeReader, SshDdReader, SshDdWriter, vmfs_path
from reconciler.esxi.vmdk import Descriptor, vmfs_descriptor
from reconciler.esxi.vmx import VmxFile
from reconciler.facts.inventory import (
    SNAPSHOT_PREFIX,
    DatastoreInfo,
    DiskInfo,
    HostLimits,
    License,
    SnapshotInfo,
    VmInfo,
    split_ds_path,
)

log = logging.getLogger(__name__)

_LICENSES_SEEN: dict[str, str] = {}
"""The licence last logged per host name: the daemon connects anew every cycle and logs only changes."""

_VMFS_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{12}$")


# -- what a backup reads -------------------------------------------------------------------------


@dataclass(frozen=True)
class FrozenDisk:
    """A disk as frozen by our snapshot: what to read."""

    key: int
    label: str
    node: str | None
    descriptor: str
    """Datastore path of the frozen descriptor (``[ds] vm/vm.vmdk``)."""
    data_file: str
    """Datastore path of its raw extent (``[ds] vm/vm-flat.vmdk``)."""
    capacity: int
    change_id: str | None
    """The changeId to store for the next incremental (None: CBT off)."""
    uuid: str | None
    descriptor_text: str


@dataclass(frozen=True)
class BackupSnapshot:
    """What :meth:`EsxiHost.backup_snapshot` yields."""

    vm: VmInfo
    """The VM as it was just before the snapshot."""
    snapshot: SnapshotInfo
    disks: tuple[FrozenDisk, ...]
    deltas: tuple[str, ...] = field(default=())
    """Delta descriptors our snapshot created (checked gone afterwards)."""


# -- signals --------------------------------------------------------------------------------------


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """In the main thread: turn SIGTERM into ``SystemExit(143)`` so ``finally`` blocks (snapshot
    removal) run. Without it Python dies on SIGTERM without cleaning up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while cleaning up; re-raise the first one afterwards (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        caught.append(signum)

    olds = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in olds.items():
            signal.signal(s, old)
    if caught:
        if caught[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + caught[0])


# -- the host -------------------------------------------------------------------------------------


def _snapshot_name(prefix: str) -> str:
    return f"{prefix}{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(4)}"


def _walk_tree(nodes: Any, parent: str | None, out: list[tuple[SnapshotInfo, Any]]) -> None:
    for node in nodes or []:
        info = SnapshotInfo(
            id=str(node.id),
            name=str(node.name),
            description=str(node.description or ""),
            created=node.createTime,
            parent_id=parent,
            quiesced=bool(node.quiesced),
        )
        out.append((info, node.snapshot))
        _walk_tree(node.childSnapshotList, info.id, out)


def _vmid(ref: VmInfo | str) -> str:
    if isinstance(ref, VmInfo):
        return ref.vmid
    if not ref.isdigit():
        raise ValueError(f"not a vmid: {ref!r} (look VMs up by name with find_vm)")
    return ref


def _ds_join(dir_ds_path: str, name: str) -> str:
    """Resolve a descriptor-relative file name against the datastore path of its directory."""
    if name.startswith("/vmfs/volumes/"):
        ds, _, rel = name[len("/vmfs/volumes/") :].partition("/")
        return f"[{ds}] {rel}"
    ds, rel = split_ds_path(dir_ds_path)
    return f"[{ds}] {posixpath.join(rel, name)}" if rel else f"[{ds}] {name}"


def _same_file(a: str, b: str) -> bool:
    """Whether two datastore paths name the same file. An absolute hint may name the datastore by its
    UUID (``/vmfs/volumes/5c59…/vm/vm.vmdk``) where the API uses its name, so when the datastores differ
    only the paths inside them are compared."""
    (ds_a, rel_a), (ds_b, rel_b) = split_ds_path(a), split_ds_path(b)
    return rel_a == rel_b and (ds_a == ds_b or bool(_VMFS_UUID.match(ds_a) or _VMFS_UUID.match(ds_b)))


def _dir_of(ds_path: str) -> str:
    ds, rel = split_ds_path(ds_path)
    return f"[{ds}] {posixpath.dirname(rel)}"


class EsxiHost:
    """A standalone ESXi host (see the module doc for what goes over which protocol)."""

    def __init__(
        self,
        api: ApiSession,
        shell: ShellSession | None,
        *,
        license: License = License.AUTO,
        limits: HostLimits | None = None,
        name: str = "",
        snapshot_prefix: str = SNAPSHOT_PREFIX,
        api_user: str = "root",
        api_password: Callable[[], str] | None = None,
    ) -> None:
        self.api = api
        self.shell = shell
        self.configured_license = license
        self.limits = limits
        self.name = name or api.address
        self.prefix = snapshot_prefix
        self._license: str | None = None if license == License.AUTO else license.value
        self._api_restricted = False
        self._api_user = api_user
        self._api_password = api_password

    @property
    def identity(self) -> str:
        """``address:port`` of the API: what tells hosts apart (per-VM locks), whatever their names in
        the config."""
        return f"{self.api.address}:{self.api.port}"

    def close(self) -> None:
        self.api.close()
        if self.shell is not None:
            self.shell.close()

    def __enter__(self) -> EsxiHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- licence and routing

    @property
    def license(self) -> str:
        """``free`` or ``licensed``: as configured, or detected once (rule in :mod:`.api`)."""
        if self._license is None:
            try:
                editions = self.api.license_editions()
            except (ApiError, OSError):
                if self.shell is None:
                    raise
                text = self._ssh().run(vimcmd.license_show(), timeout=60).text
                editions = vimcmd.parse_license_editions(text)
            self._license = license_kind_from_editions(editions)
            # every cycle connects anew: log a change of licence, not each detection
            level = logging.DEBUG if _LICENSES_SEEN.get(self.name) == self._license else logging.INFO
            _LICENSES_SEEN[self.name] = self._license
            log.log(
                level, "host %s: licence detected as %s (editions %s)", self.name, self._license, editions
            )
        return self._license

    def _use_api_for_changes(self) -> bool:
        return self.license == "licensed" and not self._api_restricted

    def _ssh(self) -> ShellSession:
        if self.shell is None:
            raise ShellError(f"host {self.name}: this operation needs SSH, which is disabled in the config")
        return self.shell

    def _vm_mo(self, vmid: str) -> Any:
        return vim.VirtualMachine(vmid, self.api.si._stub)  # type: ignore[no-untyped-call]

    # -- inventory (API reads: work on free hosts too)

    def _controllers(self, devices: Any) -> dict[int, str]:
        out = {}
        for d in devices:
            prefix = (
                "scsi" if isinstance(d, vim.vm.device.VirtualSCSIController)
                else "sata" if isinstance(d, vim.vm.device.VirtualSATAController)
                else "ide" if isinstance(d, vim.vm.device.VirtualIDEController)
                else "nvme" if isinstance(d, vim.vm.device.VirtualNVMEController)
                else None
            )  # fmt: skip
            if prefix is not None:
                out[d.key] = f"{prefix}{d.busNumber}"
        return out

    def _disks(self, devices: Any) -> tuple[DiskInfo, ...]:
        controllers = self._controllers(devices)
        out = []
        for dev in devices:
            if not isinstance(dev, vim.vm.device.VirtualDisk):
                continue
            d: Any = dev
            backing: Any = d.backing
            chain = []
            b: Any = backing
            while b is not None:
                chain.append(str(b.fileName))
                b = getattr(b, "parent", None)
            ctrl = controllers.get(d.controllerKey)
            out.append(
                DiskInfo(
                    key=int(d.key),
                    label=str(d.deviceInfo.label) if d.deviceInfo else f"disk {d.key}",
                    node=f"{ctrl}:{d.unitNumber}" if ctrl is not None and d.unitNumber is not None else None,
                    file=str(backing.fileName),
                    chain=tuple(chain),
                    capacity=int(d.capacityInBytes or (d.capacityInKB or 0) * 1024),
                    change_id=getattr(backing, "changeId", None) or None,
                    uuid=getattr(backing, "uuid", None),
                    mode=getattr(backing, "diskMode", None),
                    thin=getattr(backing, "thinProvisioned", None),
                )
            )
        return tuple(out)

    def _vm_info(self, mo: Any) -> VmInfo:
        def read() -> VmInfo:
            config = mo.config
            tree: list[tuple[SnapshotInfo, Any]] = []
            snap = mo.snapshot
            if snap is not None:
                _walk_tree(snap.rootSnapshotList, None, tree)
            vmx = str(config.files.vmPathName)
            return VmInfo(
                vmid=str(mo._moId),
                name=str(config.name),
                uuid=config.uuid,
                instance_uuid=config.instanceUuid,
                power_state=str(mo.runtime.powerState),
                vmx_path=vmx,
                datastore=split_ds_path(vmx)[0],
                disks=self._disks(config.hardware.device),
                snapshots=tuple(info for info, _ in tree),
                cbt_enabled=bool(config.changeTrackingEnabled),
                hw_version=config.version,
            )

        return self.api.call(f"inventory of VM {mo._moId}", read)

    def list_vms(self) -> list[VmInfo]:
        """Every registered VM (through the API)."""

        def ids() -> list[Any]:
            content = self.api.content
            view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
            try:
                return list(view.view)
            finally:
                view.Destroy()

        out = []
        for mo in self.api.call("list VMs", ids):
            try:
                out.append(self._vm_info(mo))
            except ApiError as exc:
                if isinstance(exc.__cause__, vmodl.fault.ManagedObjectNotFound):
                    continue  # unregistered meanwhile
                raise
        return out

    def vm(self, ref: VmInfo | str) -> VmInfo:
        """Fresh information about one VM, by VmInfo or vmid (names: :meth:`find_vm`; a name is never
        taken for an id, so a VM called ``"12"`` cannot be confused with vmid 12)."""
        return self._vm_info(self._vm_mo(_vmid(ref)))

    def find_vm(self, name: str) -> VmInfo:
        """The VM whose display name is exactly ``name``."""
        found = [vm for vm in self.list_vms() if vm.name == name]
        if len(found) != 1:
            raise EsxiError(f"host {self.name}: {len(found)} VMs named {name!r}")
        return found[0]

    def datastores(self) -> list[DatastoreInfo]:
        """Capacity and free space of every datastore."""

        def read() -> list[DatastoreInfo]:
            content = self.api.content
            view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datastore], True)
            try:
                return [
                    DatastoreInfo(
                        name=str(ds.summary.name),
                        capacity=int(ds.summary.capacity),
                        free=int(ds.summary.freeSpace),
                        accessible=bool(ds.summary.accessible),
                        type=str(ds.summary.type),
                    )
                    for ds in view.view
                ]
            finally:
                view.Destroy()

        return self.api.call("datastores", read)

    def check_datastore_space(self, vm: VmInfo, limits: HostLimits | None = None) -> None:
        """Raise :class:`InsufficientSpaceError` if a datastore holding the VM's files is below the host's
        free-space floor (``limits`` default: the configured ones; no limits → no check)."""
        limits = limits or self.limits
        if limits is None:
            return
        names = {vm.datastore} | {split_ds_path(d.file)[0] for d in vm.disks}
        for ds in self.datastores():
            if ds.name in names and not limits.datastore_has_room(ds.capacity, ds.free):
                raise InsufficientSpaceError(
                    f"datastore {ds.name} on {self.name} has {ds.free} of {ds.capacity} bytes free, below"
                    f" the limit (min {limits.min_datastore_free_bytes} bytes /"
                    f" {limits.min_datastore_free_percent} %); no snapshot taken"
                )

    # -- snapshots

    def _snapshot_mo(self, vmid: str, snapshot_id: str) -> Any:
        def find() -> Any:
            tree: list[tuple[SnapshotInfo, Any]] = []
            snap = self._vm_mo(vmid).snapshot
            if snap is not None:
                _walk_tree(snap.rootSnapshotList, None, tree)
            for info, mo in tree:
                if info.id == snapshot_id:
                    return mo
            return None

        return self.api.call(f"snapshot {snapshot_id} of VM {vmid}", find)

    def is_ours(self, snapshot: SnapshotInfo) -> bool:
        return snapshot.name.startswith(self.prefix)

    def foreign_snapshots(self, vm: VmInfo | str) -> list[SnapshotInfo]:
        """Snapshots of the VM that are not ours."""
        return [s for s in self.vm(vm).snapshots if not self.is_ours(s)]

    def find_orphaned_snapshots(self, prefix: str | None = None) -> list[tuple[VmInfo, SnapshotInfo]]:
        """Snapshots named as ours (``prefix``, default ours) on every VM: leftovers of killed runs."""
        p = self.prefix if prefix is None else prefix
        return [(vm, s) for vm in self.list_vms() for s in vm.snapshots if s.name.startswith(p)]

    def remove_orphaned_snapshots(self, timeout: float = 3600.0) -> list[tuple[VmInfo, SnapshotInfo]]:
        """Remove every snapshot named as ours (call when no backup of this host runs)."""
        found = self.find_orphaned_snapshots()
        for vm, snap in found:
            log.warning("removing orphaned snapshot %r (id %s) of VM %r", snap.name, snap.id, vm.name)
            self.remove_snapshot(vm, snap.id, timeout=timeout)
        return found

    def create_snapshot(
        self,
        vm: VmInfo | str,
        name: str,
        *,
        description: str = "",
        quiesce: bool = False,
        timeout: float = 1800.0,
    ) -> SnapshotInfo:
        """Create a snapshot (no memory) named ``name`` and return it (with its id)."""
        vmid = _vmid(vm)
        vimcmd.check_arg(name)
        vimcmd.check_arg(description)
        if self._use_api_for_changes():
            try:
                vm_mo = self._vm_mo(vmid)
                with mapped_faults("create snapshot"):  # not api.call: a retry could make two snapshots
                    task = vm_mo.CreateSnapshot_Task(name, description, False, quiesce)
                wait_task(task, timeout, f"snapshot {name!r} of VM {vmid}")
            except RestrictedByLicenseError:
                if self.shell is None:
                    raise
                log.warning("host %s refuses API snapshots (licence); using vim-cmd over SSH", self.name)
                self._api_restricted = True
            except TaskTimeoutError as exc:
                with contextlib.suppress(Exception):
                    exc.task.CancelTask()  # type: ignore[attr-defined]
                raise SnapshotTimeoutError(f"creating snapshot {name!r} of VM {vmid}: {exc}") from exc
            except ApiError as exc:
                raise SnapshotError(f"creating snapshot {name!r} of VM {vmid}: {exc}") from exc
            else:
                return self._confirm_snapshot(vmid, name)
        try:
            self._ssh().run(
                vimcmd.snapshot_create(vmid, name, description, memory=False, quiesce=quiesce),
                timeout=timeout,
                retry=False,
            )
        except CommandError as exc:
            raise SnapshotError(f"creating snapshot {name!r} of VM {vmid} over SSH: {exc}") from exc
        except ShellError as exc:  # timed out or dropped: vim-cmd may still finish on the host
            raise SnapshotTimeoutError(f"creating snapshot {name!r} of VM {vmid} over SSH: {exc}") from exc
        return self._confirm_snapshot(vmid, name, via_ssh=True)

    def _confirm_snapshot(
        self, vmid: str, name: str, via_ssh: bool = False, wait: float = 30.0
    ) -> SnapshotInfo:
        """Find the snapshot called ``name`` (in snapshot.get when made over SSH, and in the API tree)."""
        if via_ssh:
            rows = vimcmd.parse_snapshot_get(self._ssh().run(vimcmd.snapshot_get(vmid), timeout=120).text)
            ids = [r.id for r in rows if r.name == name]
            if len(ids) != 1:
                raise SnapshotError(f"VM {vmid}: {len(ids)} snapshots named {name!r} after snapshot.create")
        deadline = time.monotonic() + wait
        while True:
            found = [s for s in self.vm(vmid).snapshots if s.name == name]
            if len(found) == 1 and (not via_ssh or found[0].id == ids[0]):
                return found[0]
            if time.monotonic() > deadline:
                raise SnapshotError(f"VM {vmid}: snapshot {name!r} not confirmed through the API")
            time.sleep(0.5)

    def remove_snapshot(self, vm: VmInfo | str, snapshot_id: str, *, timeout: float = 3600.0) -> None:
        """Remove one snapshot, ours only (by id; children are kept; never ``removeall``)."""
        vmid = _vmid(vm)
        current = {s.id: s for s in self.vm(vmid).snapshots}
        snap = current.get(snapshot_id)
        if snap is None:
            raise SnapshotError(f"VM {vmid} has no snapshot {snapshot_id}")
        if not self.is_ours(snap):
            raise SnapshotError(f"refusing to remove snapshot {snap.name!r} of VM {vmid}: not ours")
        if self._use_api_for_changes():
            try:
                mo = self._snapshot_mo(vmid, snapshot_id)
                task = self.api.call("remove snapshot", lambda: mo.RemoveSnapshot_Task(removeChildren=False))
                wait_task(task, timeout, f"remove snapshot {snapshot_id} of VM {vmid}")
            except RestrictedByLicenseError:
                if self.shell is None:
                    raise
                self._api_restricted = True
            except ApiError as exc:
                raise SnapshotError(f"removing snapshot {snapshot_id} of VM {vmid}: {exc}") from exc
            else:
                self._confirm_removed(vmid, snapshot_id)
                return
        try:
            self._ssh().run(vimcmd.snapshot_remove(vmid, snapshot_id), timeout=timeout, retry=False)
        except ShellError as exc:
            if snapshot_id in {s.id for s in self.vm(vmid).snapshots}:
                raise SnapshotError(f"removing snapshot {snapshot_id} of VM {vmid} over SSH: {exc}") from exc
        self._confirm_removed(vmid, snapshot_id)

    def _confirm_removed(self, vmid: str, snapshot_id: str, wait: float = 30.0) -> None:
        deadline = time.monotonic() + wait
        while snapshot_id in {s.id for s in self.vm(vmid).snapshots}:
            if time.monotonic() > deadline:
                raise SnapshotError(f"VM {vmid}: snapshot {snapshot_id} still listed after removal")
            time.sleep(0.5)

    # -- files

    def read_file(self, ds_path: str, max_size: int = 16 << 20) -> bytes:
        """A small datastore file (.vmx, descriptor): SSH ``cat`` when enabled, else HTTPS."""
        if self.shell is not None:
            data = self._ssh().run(["cat", vmfs_path(ds_path)], timeout=120).stdout
        else:
            reader = self._https_reader(streams=1)
            try:
                data = reader.get_file(ds_path)
            finally:
                reader.close()
        if len(data) > max_size:
            raise ProtocolError(f"{ds_path} is larger than {max_size} bytes; not a small file")
        return data

    def file_exists(self, ds_path: str) -> bool:
        if self.shell is not None:
            res = self._ssh().run(["test", "-e", vmfs_path(ds_path)], check=False, timeout=60)
            return res.exit_status == 0
        reader = self._https_reader(streams=1)
        try:
            reader.size(ds_path)
            return True
        except EsxiError:
            return False
        finally:
            reader.close()

    def read_vmx(self, vm: VmInfo | str) -> VmxFile:
        info = vm if isinstance(vm, VmInfo) else self.vm(vm)
        return VmxFile.parse(self.read_file(info.vmx_path).decode("utf-8", "surrogateescape"))

    def read_descriptor(self, ds_path: str) -> Descriptor:
        return Descriptor.parse(self.read_file(ds_path, 1 << 20).decode("utf-8", "surrogateescape"))

    # -- the backup snapshot

    def frozen_disks(
        self, vm: VmInfo, snapshot: SnapshotInfo
    ) -> tuple[tuple[FrozenDisk, ...], tuple[str, ...]]:
        """The disks frozen by ``snapshot`` (from the snapshot's device backings, cross-checked with the
        top delta descriptor's ``parentFileNameHint``) and the delta descriptors on top of them."""
        mo = self._snapshot_mo(vm.vmid, snapshot.id)
        if mo is None:
            raise SnapshotError(f"VM {vm.vmid}: snapshot {snapshot.id} vanished")
        snap_disks = {
            d.key: d for d in self.api.call("snapshot config", lambda: self._disks(mo.config.hardware.device))
        }
        now = {d.key: d for d in self.vm(vm.vmid).disks}
        out = []
        deltas = []
        for before in vm.disks:
            if before.independent:
                continue
            frozen = snap_disks.get(before.key)
            top = now.get(before.key)
            if frozen is None or top is None:
                raise SnapshotError(f"VM {vm.vmid}: disk {before.key} not found in snapshot {snapshot.id}")
            top_desc = self.read_descriptor(top.file)
            hint = top_desc.parent_file_name_hint
            if hint is None or not _same_file(_ds_join(_dir_of(top.file), hint), frozen.file):
                raise SnapshotError(
                    f"VM {vm.vmid} disk {before.key}: top {top.file} has parent hint {hint!r}, the snapshot"
                    f" froze {frozen.file}"
                )
            deltas.append(top.file)
            text = self.read_file(frozen.file, 1 << 20).decode("utf-8", "surrogateescape")
            desc = Descriptor.parse(text)
            extent = desc.flat_extent
            if extent is None or extent.file_name is None:
                raise UnsupportedDiskError(
                    f"VM {vm.vmid} disk {before.key}: frozen file {frozen.file} is not a flat base disk"
                    f" (createType {desc.create_type!r}, {len(desc.extents)} extents); remove other snapshots"
                )
            out.append(
                FrozenDisk(
                    key=before.key,
                    label=before.label,
                    node=before.node,
                    descriptor=frozen.file,
                    data_file=_ds_join(_dir_of(frozen.file), extent.file_name),
                    capacity=frozen.capacity,
                    change_id=frozen.change_id,
                    uuid=frozen.uuid,
                    descriptor_text=text,
                )
            )
        return tuple(out), tuple(deltas)

    @contextlib.contextmanager
    def backup_snapshot(
        self,
        vm: VmInfo | str,
        *,
        quiesce: bool = False,
        timeout: float = 1800.0,
        remove_timeout: float = 3600.0,
        check_space: bool = True,
    ) -> Iterator[BackupSnapshot]:
        """Snapshot the VM for one backup, yield what to read, and always remove the snapshot (see the
        module doc). Raises ForeignSnapshotError if the VM has snapshots (ours from a dead run included:
        call :meth:`remove_orphaned_snapshots` first)."""
        info = self.vm(vm)
        if info.snapshots:
            foreign = [s.name for s in info.snapshots if not self.is_ours(s)]
            raise ForeignSnapshotError(
                f"VM {info.name!r} has snapshots {foreign or [s.name for s in info.snapshots]}"
                + ("" if foreign else " left by an earlier run: remove orphaned snapshots first")
            )
        if check_space:
            self.check_datastore_space(info)
        name = _snapshot_name(self.prefix)
        try:
            snap = self.create_snapshot(
                info, name, description="esxi-reconciler backup", quiesce=quiesce, timeout=timeout
            )
        except BaseException as exc:
            # after a timeout or an interruption the snapshot may still appear: watch for it a while
            grace = (
                0.0 if isinstance(exc, SnapshotError) and not isinstance(exc, SnapshotTimeoutError) else 60.0
            )
            with _deferred_signals():
                self._cleanup_by_name(info.vmid, name, remove_timeout, grace)
            raise
        deltas: tuple[str, ...] = ()
        try:
            disks, deltas = self.frozen_disks(info, snap)
            yield BackupSnapshot(vm=info, snapshot=snap, disks=disks, deltas=deltas)
        finally:
            with _deferred_signals():
                self.remove_snapshot(info.vmid, snap.id, timeout=remove_timeout)
                self.verify_chain(info, deltas)

    def _cleanup_by_name(self, vmid: str, name: str, timeout: float, grace: float = 0.0) -> None:
        """After a failed or interrupted create: remove the snapshot called ``name`` if it exists, watching
        for it up to ``grace`` seconds (a timed-out create may still complete on the host)."""
        deadline = time.monotonic() + grace
        try:
            while True:
                for s in self.vm(vmid).snapshots:
                    if s.name == name:
                        log.warning("removing snapshot %r of VM %s after a failed create", name, vmid)
                        self.remove_snapshot(vmid, s.id, timeout=timeout)
                        return
                if time.monotonic() >= deadline:
                    return
                time.sleep(1.0)
        except EsxiError as exc:
            log.error("could not check for a half-made snapshot %r of VM %s: %s", name, vmid, exc)

    def verify_chain(self, before: VmInfo, deltas: tuple[str, ...] = ()) -> None:
        """Raise ChainNotCleanError unless every disk is back at its pre-backup chain and ``deltas`` are
        gone."""
        now = {d.key: d for d in self.vm(before.vmid).disks}
        problems = []
        for d in before.disks:
            cur = now.get(d.key)
            if cur is None or cur.chain != d.chain:
                problems.append(f"disk {d.key}: chain {cur.chain if cur else None} != {d.chain}")
        for delta in deltas:
            if delta not in {f for d in before.disks for f in d.chain} and self.file_exists(delta):
                problems.append(f"leftover delta {delta}")
        if problems:
            raise ChainNotCleanError(
                f"VM {before.name!r}: after removing our snapshot: {'; '.join(problems)}"
                " (consolidation needed)"
            )

    # -- changed areas (CBT, licensed hosts)

    def changed_areas(
        self, vm: VmInfo | str, snapshot: SnapshotInfo, disk: FrozenDisk | DiskInfo, change_id: str | None
    ) -> list[tuple[int, int]]:
        """Byte ranges of ``disk`` changed since ``change_id`` up to ``snapshot`` (``"*"``: all allocated),
        per the loop of esxi-reference §5. Raises FullBackupNeededError when CBT cannot answer."""
        vmid = _vmid(vm)
        if not change_id:
            raise FullBackupNeededError("no-change-id", f"no previous changeId for disk {disk.key}")
        if self.license == "free" or self._api_restricted:
            raise FullBackupNeededError("restricted", "the host's licence refuses QueryChangedDiskAreas")
        mo = self._snapshot_mo(vmid, snapshot.id)
        vm_mo = self._vm_mo(vmid)
        areas: list[tuple[int, int]] = []
        off = 0
        try:
            with mapped_faults(f"QueryChangedDiskAreas disk {disk.key}"):
                while off < disk.capacity:
                    r = vm_mo.QueryChangedDiskAreas(
                        snapshot=mo, deviceKey=disk.key, startOffset=off, changeId=change_id
                    )
                    areas.extend((int(a.start), int(a.length)) for a in r.changedArea or [])
                    if r.length == 0:
                        break
                    off = int(r.startOffset) + int(r.length)
        except RestrictedByLicenseError as exc:
            raise FullBackupNeededError("restricted", str(exc)) from exc
        except ApiError as exc:
            cause = exc.__cause__
            if isinstance(cause, vim.fault.FileFault):
                raise FullBackupNeededError("cbt-inactive", str(exc)) from exc
            if isinstance(cause, vmodl.fault.InvalidArgument):
                raise FullBackupNeededError("change-id-rejected", str(exc)) from exc
            raise
        return areas

    # -- digests on the host (free hosts)

    def digest_compare(
        self,
        disk: FrozenDisk,
        previous: bytes | None,
        on_block: Callable[[int, bytes], None],
        *,
        block_size: int = BLOCK_SIZE,
        timeout: float = 600.0,
        first_block: int = 0,
        block_count: int | None = None,
    ) -> DigestResult:
        """Run :mod:`.hostdigest` on the host against the frozen disk: ``on_block(offset, data)`` gets
        every block whose digest differs from ``previous`` (None: every non-zero block). With a block
        range, only blocks ``[first_block, first_block + block_count)`` (``previous`` and the result's
        digests cover that range); each call uses its own SSH connection, so ranges can run in parallel."""
        conn = self._ssh().new_connection()
        try:
            return compare_on_host(
                conn,
                vmfs_path(disk.data_file),
                previous,
                on_block,
                block_size=block_size,
                timeout=timeout,
                first_block=first_block,
                block_count=block_count,
            )
        finally:
            conn.close()

    def allocation(
        self, disk: FrozenDisk, *, block_size: int = BLOCK_SIZE, timeout: float = 120.0
    ) -> Allocation:
        """The frozen disk file's size and data ranges (``SEEK_DATA``, block-aligned), listed on the host
        over SSH by :data:`.hostdigest.ALLOC_PROGRAM`; ``ranges`` is None when the host cannot tell."""
        conn = self._ssh().new_connection()
        try:
            return allocation_on_host(conn, vmfs_path(disk.data_file), block_size=block_size, timeout=timeout)
        finally:
            conn.close()

    # -- readers

    def https_reader(self, streams: int = 4) -> HttpsRangeReader:
        """A pinned HTTPS ``/folder`` Range reader (works on free hosts too); raises when the API is
        unreachable. The caller closes it."""
        return self._https_reader(streams)

    def _https_reader(self, streams: int) -> HttpsRangeReader:
        """Pinned like the API; authenticated with the API session's cookie (no extra host session),
        falling back to Basic auth if the cookie is refused."""
        cookie = self.api.cookie
        return HttpsRangeReader(
            self.api.address,
            self.api.port,
            self.api.ssl_context,
            user=self._api_user if self._api_password else None,
            password=self._api_password,
            cookie=cookie,
            streams=streams,
        )

    def disk_reader(self, transport: str = "auto", streams: int = 4) -> DiskReader:
        """A reader for frozen disk files: ``https``, ``ssh`` or ``auto`` (HTTPS when the API answers,
        else SSH). The caller closes it."""
        if transport not in ("auto", "https", "ssh"):
            raise ValueError(f"unknown transport {transport!r}")
        if transport in ("auto", "https"):
            try:
                return self._https_reader(streams)
            except (EsxiError, OSError) as exc:
                if transport == "https" or self.shell is None:
                    raise
                log.warning("host %s: API unreachable (%s); reading disks over SSH", self.name, exc)
        shell = self._ssh()
        return SshDdReader(shell.new_connection, streams=streams)

    # -- power and registration (API when licensed, vim-cmd over SSH otherwise)

    def _vm_change(
        self,
        what: str,
        api_call: Callable[[Any], Any],
        argv: list[str],
        timeout: float,
        check_output: Callable[[str], None] | None = None,
    ) -> str:
        """Run one state-changing VM operation: ``api_call(vm_mo)`` (a task or a plain call) on a
        licensed host, else ``argv`` over SSH; returns the SSH output ("" through the API).
        ``check_output`` judges stdout and stderr together (vim-cmd can report a failure with exit status
        0; ESXi 6.x print a bare ``Power on failed`` on stderr)."""
        if self._use_api_for_changes():
            try:
                with mapped_faults(what):  # not api.call: retrying a power or register call is unsafe
                    result = api_call(None)
                if isinstance(result, vim.Task):
                    wait_task(result, timeout, what)
                return ""
            except RestrictedByLicenseError:
                if self.shell is None:
                    raise
                self._api_restricted = True
        try:
            res = self._ssh().run(argv, timeout=timeout, retry=False)
            if check_output is not None:
                check_output("\n".join(part for part in (res.text, res.error_text) if part))
            return res.text
        except CommandError as exc:
            raise EsxiError(f"{what} over SSH: {exc}") from exc

    def wait_power_state(self, vm: VmInfo | str, state: str, *, timeout: float = 300.0) -> VmInfo:
        """Poll until the VM reports ``state`` (``poweredOn``/``poweredOff``/``suspended``)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.vm(_vmid(vm))
            if info.power_state == state:
                return info
            if time.monotonic() > deadline:
                raise PowerStateTimeoutError(
                    f"VM {info.name!r} still {info.power_state} after {timeout:.0f}s, not {state}"
                )
            time.sleep(0.5)

    def power_on(self, vm: VmInfo | str, *, timeout: float = 600.0) -> VmInfo:
        """Power the VM on and wait until the host reports it on (no-op when it already is)."""
        info = self.vm(_vmid(vm))
        if info.power_state != "poweredOn":
            self._vm_change(
                f"power on VM {info.name!r}",
                lambda _: self._vm_mo(info.vmid).PowerOnVM_Task(),
                vimcmd.power(info.vmid, "on"),
                timeout,
                lambda text: vimcmd.check_power_output("on", text),
            )
        return self.wait_power_state(info, "poweredOn", timeout=timeout)

    def power_off(self, vm: VmInfo | str, *, timeout: float = 600.0) -> VmInfo:
        """Hard power-off (like pulling the plug); prefer :meth:`shutdown_guest`."""
        info = self.vm(_vmid(vm))
        if info.power_state != "poweredOff":
            self._vm_change(
                f"power off VM {info.name!r}",
                lambda _: self._vm_mo(info.vmid).PowerOffVM_Task(),
                vimcmd.power(info.vmid, "off"),
                timeout,
                lambda text: vimcmd.check_power_output("off", text),
            )
        return self.wait_power_state(info, "poweredOff", timeout=timeout)

    def shutdown_guest(self, vm: VmInfo | str, *, timeout: float = 600.0) -> VmInfo:
        """Ask the guest OS to shut down (VMware Tools) and wait up to ``timeout`` for power-off;
        raises :class:`EsxiError` when it does not stop in time (the VM is left running)."""
        info = self.vm(_vmid(vm))
        if info.power_state == "poweredOff":
            return info
        self._vm_change(
            f"guest shutdown of VM {info.name!r}",
            lambda _: self._vm_mo(info.vmid).ShutdownGuest(),
            vimcmd.power(info.vmid, "shutdown"),
            min(timeout, 120.0),
            lambda text: vimcmd.check_power_output("shutdown", text),
        )
        return self.wait_power_state(info, "poweredOff", timeout=timeout)

    def guest_heartbeat(self, vm: VmInfo | str) -> str:
        """The guest heartbeat colour the host reports: ``green`` (Tools answering), ``yellow``, ``red``,
        ``gray`` (no Tools / not running)."""
        mo = self._vm_mo(_vmid(vm))
        return str(self.api.call("guest heartbeat", lambda: mo.summary.quickStats.guestHeartbeatStatus))

    def register_vm(self, vmx_path: str, *, timeout: float = 300.0) -> VmInfo:
        """Register the VM whose ``.vmx`` is at datastore path ``vmx_path`` (``[ds] dir/x.vmx``) and
        return it; its display name is the one in the .vmx."""
        before = {v.vmid for v in self.list_vms()}

        def api(_: Any) -> Any:
            content = self.api.si.RetrieveContent()
            datacenter = content.rootFolder.childEntity[0]
            pool = content.rootFolder.childEntity[0].hostFolder.childEntity[0].resourcePool
            return datacenter.vmFolder.RegisterVM_Task(path=vmx_path, asTemplate=False, pool=pool)

        self._vm_change(f"register {vmx_path}", api, vimcmd.registervm(vmfs_path(vmx_path)), timeout)
        found = [v for v in self.list_vms() if v.vmid not in before and v.vmx_path == vmx_path]
        if len(found) != 1:
            raise EsxiError(f"registered {vmx_path} but found {len(found)} new VMs with that .vmx")
        return found[0]

    def unregister_vm(self, vm: VmInfo | str, *, timeout: float = 300.0) -> None:
        """Remove the VM from the inventory, keeping its files (it must be powered off)."""
        info = self.vm(_vmid(vm))
        self._vm_change(
            f"unregister VM {info.name!r}",
            lambda _: self._vm_mo(info.vmid).UnregisterVM(),
            vimcmd.unregister(info.vmid),
            timeout,
        )

    # -- CBT switching (minimal; the reconciler finishes it)

    def enable_cbt(self, vm: VmInfo | str, *, timeout: float = 600.0) -> None:
        """:meth:`set_cbt` on."""
        self.set_cbt(vm, True, timeout=timeout)

    def disable_cbt(self, vm: VmInfo | str, *, timeout: float = 600.0) -> None:
        """:meth:`set_cbt` off."""
        self.set_cbt(vm, False, timeout=timeout)

    def set_cbt(self, vm: VmInfo | str, enabled: bool, *, timeout: float = 600.0) -> None:
        """Switch CBT. Licensed: ReconfigVM, then a stun cycle (our snapshot created and removed) when the
        VM runs. Free: only with the VM powered off — the .vmx is edited over SSH (backup copy
        ``.vmx.esxi-reconciler.bak``, temp file, atomic ``mv``) and reloaded with ``vim-cmd vmsvc/reload``;
        tracking becomes active at the next power-on. Refused with snapshots present."""
        info = self.vm(vm)
        if info.snapshots:
            raise SnapshotError(f"VM {info.name!r}: CBT is switched only without snapshots")
        if self._use_api_for_changes():
            try:
                spec = vim.vm.ConfigSpec(changeTrackingEnabled=enabled)  # type: ignore[no-untyped-call]
                task = self.api.call("reconfigure", lambda: self._vm_mo(info.vmid).ReconfigVM_Task(spec))
                wait_task(task, timeout, f"CBT {'on' if enabled else 'off'} for VM {info.vmid}")
            except RestrictedByLicenseError:
                if self.shell is None:
                    raise
                self._api_restricted = True
            else:
                if info.power_state == "poweredOn":
                    with self.backup_snapshot(info, check_space=False):
                        pass
                return
        if info.power_state != "poweredOff":
            raise EsxiError(f"VM {info.name!r} must be powered off to switch CBT on a free host")
        vmx = self.read_vmx(info)
        vmx.set_cbt(enabled)
        path = vmfs_path(info.vmx_path)
        tmp = path + ".esxi-reconciler.tmp"
        shell = self._ssh()
        shell.run(["cp", "-p", path, path + ".esxi-reconciler.bak"], timeout=60)
        shell.run(["sh", "-c", 'cat > "$1"', "sh", tmp], stdin=vmx.dumps().encode("utf-8", "surrogateescape"))
        shell.run(["mv", "-f", tmp, path], timeout=60)
        shell.run(vimcmd.reload(info.vmid), timeout=timeout)

    # -- writing files and disks (restore): SSH when enabled, else the API + HTTPS ``/folder``
    #
    # Files go over SSH whenever it is enabled (free hosts always; it keeps thin disks thin, because
    # ``dd conv=notrunc`` skips the holes); a licensed host without SSH uses FileManager tasks and
    # HTTPS PUT, which writes every byte of a disk (holes as zeros: ``/folder`` has no ranged PUT).

    def _datacenter(self) -> Any:
        return self.api.content.rootFolder.childEntity[0]

    def _file_task(self, what: str, start: Callable[[], Any], timeout: float = 600.0) -> None:
        """Run a FileManager task and wait for it by reading only ``info.state``/``info.error`` (the
        lab's vcsim names the FileManager as the task's ``entity``, which pyvmomi refuses to
        deserialize; the two properties are all we need anyway)."""
        with mapped_faults(what):
            task = start()
        pc = self.api.content.propertyCollector
        q = vmodl.query.PropertyCollector
        spec = q.FilterSpec(  # type: ignore[no-untyped-call]
            objectSet=[q.ObjectSpec(obj=task)],  # type: ignore[no-untyped-call]
            propSet=[q.PropertySpec(type=vim.Task, pathSet=["info.state", "info.error"])],  # type: ignore[no-untyped-call]
        )
        deadline = time.monotonic() + timeout
        delay = 0.05
        with mapped_faults(what):
            while True:
                props = {p.name: p.val for obj in pc.RetrieveContents([spec]) for p in obj.propSet}
                state = props.get("info.state")
                if state == vim.TaskInfo.State.success:
                    return
                if state == vim.TaskInfo.State.error:
                    raise props["info.error"]
                if time.monotonic() > deadline:
                    raise TaskTimeoutError(f"{what}: task still {state} after {timeout} s", task)
                time.sleep(delay)
                delay = min(delay * 1.5, 1.0)

    def make_directory(self, ds_path: str) -> None:
        """Create the folder ``[ds] dir``; raises :class:`EsxiError` if it already exists (so a caller
        that created it may later delete it as its own)."""
        if self.shell is not None:
            try:
                self._ssh().run(["mkdir", vmfs_path(ds_path)], timeout=60, retry=False)
            except CommandError as exc:
                raise EsxiError(f"cannot create folder {ds_path}: {exc.stderr.strip() or exc}") from exc
            return
        fm = self.api.content.fileManager
        with mapped_faults(f"create folder {ds_path}"):
            fm.MakeDirectory(name=ds_path, datacenter=self._datacenter(), createParentDirectories=False)

    def delete_path(self, ds_path: str) -> None:
        """Delete a file or a whole folder (no error when it does not exist)."""
        if self.shell is not None:
            self._ssh().run(["rm", "-rf", vmfs_path(ds_path)], timeout=600)
            return
        if not self.file_exists(ds_path) and not self.folder_exists(ds_path):
            return
        fm = self.api.content.fileManager
        self._file_task(
            f"delete {ds_path}",
            lambda: fm.DeleteDatastoreFile_Task(name=ds_path, datacenter=self._datacenter()),
        )

    def folder_exists(self, ds_path: str) -> bool:
        """Whether the folder ``[ds] dir`` exists (SSH ``test -d``; else the datastore browser)."""
        if self.shell is not None:
            return (
                self._ssh().run(["test", "-d", vmfs_path(ds_path)], check=False, timeout=60).exit_status == 0
            )
        ds, rel = split_ds_path(ds_path)
        parent, name = posixpath.split(rel.rstrip("/"))

        def search() -> bool:
            content = self.api.content
            view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datastore], True)
            try:
                store = next((d for d in view.view if d.summary.name == ds), None)
            finally:
                view.Destroy()
            if store is None:
                return False
            spec = vim.host.DatastoreBrowser.SearchSpec(matchPattern=[name])  # type: ignore[no-untyped-call]
            try:
                task = store.browser.SearchDatastore_Task(datastorePath=f"[{ds}] {parent}", searchSpec=spec)
                result = wait_task(task, 120, f"search {ds_path}")
            except (ApiError, vim.fault.FileNotFound):
                return False
            return any(f.path == name for f in (result.file or []))

        return self.api.call(f"folder {ds_path}", search)

    def list_folder(self, folder: str, pattern: str = "*") -> list[str]:
        """Names of the files in ``[ds] dir`` matching the glob ``pattern`` (not recursive): ``find
        -print0`` over SSH (NUL-separated, so names holding a line break come out whole), else the
        datastore browser."""
        if self.shell is not None:
            res = self._ssh().run(
                ["find", vmfs_path(folder), "-maxdepth", "1", "-type", "f", "-name", pattern, "-print0"],
                timeout=120,
            )
            paths = res.stdout.decode("utf-8", "surrogateescape").split("\0")
            return sorted(posixpath.basename(path) for path in paths if path)

        def search() -> list[str]:
            ds = split_ds_path(folder)[0]
            content = self.api.content
            view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datastore], True)
            try:
                store = next((d for d in view.view if d.summary.name == ds), None)
            finally:
                view.Destroy()
            if store is None:
                raise EsxiError(f"host {self.name} has no datastore {ds!r}")
            spec = vim.host.DatastoreBrowser.SearchSpec(matchPattern=[pattern])  # type: ignore[no-untyped-call]
            task = store.browser.SearchDatastore_Task(datastorePath=folder, searchSpec=spec)
            result = wait_task(task, 120, f"list {folder}")
            return sorted(str(f.path) for f in (result.file or []))

        return self.api.call(f"list {folder}", search)

    def move_file(self, src: str, dst: str) -> None:
        """Rename a datastore file (replacing ``dst``): ``mv -f`` over SSH, else MoveDatastoreFile."""
        if self.shell is not None:
            self._ssh().run(["mv", "-f", vmfs_path(src), vmfs_path(dst)], timeout=600, retry=False)
            return
        fm = self.api.content.fileManager
        dc = self._datacenter()
        self._file_task(
            f"move {src}",
            lambda: fm.MoveDatastoreFile_Task(
                sourceName=src, sourceDatacenter=dc, destinationName=dst, destinationDatacenter=dc, force=True
            ),
        )

    def write_file(self, ds_path: str, data: bytes) -> None:
        """Write a small file (.vmx, .nvram, descriptor) atomically: a temporary file next to it, then
        renamed over it, so a reader or a crash never sees half a .vmx."""
        tmp = ds_path + ".esxi-reconciler.tmp"
        if self.shell is not None:
            self._ssh().run(["sh", "-c", 'cat > "$1"', "sh", vmfs_path(tmp)], stdin=data, timeout=120)
        else:
            reader = self._https_reader(streams=1)
            try:
                reader.put_file(tmp, [data], len(data))
            finally:
                reader.close()
        self.move_file(tmp, ds_path)

    def create_disk(
        self,
        descriptor: str,
        capacity: int,
        *,
        thin: bool = True,
        adapter: str = "lsilogic",
        hw_version: str = "14",
    ) -> str:
        """Create an empty flat disk ``[ds] dir/name.vmdk`` of exactly ``capacity`` bytes and return the
        datastore path of its raw extent (``name-flat.vmdk``). SSH: ``vmkfstools -c <KiB>k`` (thin or
        zeroedthick; a size that is no whole KiB gets a written descriptor and a sparse extent). API: the
        descriptor is uploaded; the extent is created by :meth:`write_disk`."""
        if capacity % 512:
            raise ValueError(f"disk capacity {capacity} is not a multiple of 512")
        stem = posixpath.basename(split_ds_path(descriptor)[1])
        if not stem.lower().endswith(".vmdk"):
            raise ValueError(f"not a .vmdk name: {descriptor!r}")
        flat_name = stem[:-5] + "-flat.vmdk"
        if self.shell is not None and capacity % 1024 == 0:
            argv = vimcmd.vmkfstools_create(vmfs_path(descriptor), capacity, thin=thin)
            try:
                self._ssh().run(argv, timeout=3600, retry=False)
            except CommandError as exc:
                why = vimcmd.vmkfstools_failure(f"{exc.stdout}\n{exc.stderr}") or str(exc)
                raise EsxiError(f"creating disk {descriptor}: {why}") from exc
            desc = self.read_descriptor(descriptor)
            extent = desc.flat_extent
            if extent is None or extent.file_name is None or desc.capacity != capacity:
                raise EsxiError(f"vmkfstools made {descriptor} with {desc.capacity} bytes, not {capacity}")
            return _ds_join(_dir_of(descriptor), extent.file_name)
        # No vmkfstools (or a size that is no whole KiB, which ``vmkfstools -c`` cannot express): the
        # descriptor is written here; over SSH the raw extent is made at its exact size at once (a sparse
        # file, thin on VMFS), through the API it is created by :meth:`write_disk`.
        text = vmfs_descriptor(flat_name, capacity, thin=thin, adapter=adapter, hw_version=hw_version)
        flat = _ds_join(_dir_of(descriptor), flat_name)
        if self.shell is not None:
            sectors = capacity // 512
            argv = ["dd", "if=/dev/zero", f"of={vmfs_path(flat)}", "bs=512", "count=0", f"seek={sectors}"]
            self._ssh().run(argv, timeout=600, retry=False)
        self.write_file(descriptor, text.encode("utf-8"))
        return flat

    def delete_disk(self, descriptor: str) -> None:
        """Delete a base disk: descriptor, extents and change-tracking file."""
        try:
            desc = self.read_descriptor(descriptor)
        except EsxiError:
            desc = None
        files = [descriptor]
        if desc is not None:
            names = [e.file_name for e in desc.extents if e.file_name]
            if desc.change_track_path:
                names.append(desc.change_track_path)
            files += [_ds_join(_dir_of(descriptor), n) for n in names]
        for f in files:
            self.delete_path(f)

    def write_disk(
        self,
        data_file: str,
        capacity: int,
        pieces: Iterable[tuple[int, bytes]],
        on_written: Callable[[int, int], None] | None = None,
    ) -> None:
        """Write ``(offset, bytes)`` pieces (ascending; what is not given stays zero) into the raw extent
        made by :meth:`create_disk`: ``dd`` over SSH (holes skipped), else one HTTPS PUT of the whole
        file (holes sent as zeros)."""
        if self.shell is not None:
            writer = SshDdWriter(self._ssh().new_connection)
            try:
                writer.write(vmfs_path(data_file), pieces, on_written)
            finally:
                writer.close()
            return
        reader = self._https_reader(streams=1)
        try:
            reader.put_file(data_file, _with_zeros(pieces, capacity, on_written), capacity)
        finally:
            reader.close()

    def file_sha256(self, ds_path: str, *, timeout: float = 3600.0) -> str:
        """SHA-256 (hex) of a datastore file. Over SSH it is computed on the host (``sha256sum``, else
        the host's Python): only 64 bytes cross the network instead of the whole disk. Without SSH the
        file is read back over HTTPS and hashed here."""
        if self.shell is not None:
            path = vmfs_path(ds_path)
            # The file on stdin: sha256sum then prints no name (GNU's escapes a name holding a line break).
            res = self._ssh().run(["sh", "-c", 'sha256sum < "$1"', "sh", path], timeout=timeout, check=False)
            if res.exit_status != 0:
                res = self._ssh().run(["python", "-c", _SHA256_PROGRAM, path], timeout=timeout)
            digest = res.text.split(maxsplit=1)[0] if res.text.strip() else ""
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ProtocolError(f"unexpected digest output for {ds_path}: {res.text[:120]!r}")
            return digest
        reader = self._https_reader(streams=4)
        try:
            size = reader.size(ds_path)
            h = hashlib.sha256()
            for _, data in reader.read(ds_path, [(0, size)]):
                h.update(data)
            return h.hexdigest()
        finally:
            reader.close()

    def reload_vm(self, vm: VmInfo | str, *, timeout: float = 300.0) -> VmInfo:
        """Make the host re-read the VM's .vmx after an edit (VM powered off) and return the VM:
        ``vim-cmd vmsvc/reload`` over SSH; without SSH the VM is unregistered and registered again from
        the same .vmx (the API's ``Reload`` refreshes only hostd's view and the lab does not implement
        ``ReloadVirtualMachineFromPath``), which keeps its identity (the .vmx holds the UUIDs) but gives
        it a new vmid."""
        info = self.vm(_vmid(vm))
        if self.shell is not None:
            self._ssh().run(vimcmd.reload(info.vmid), timeout=timeout, retry=False)
            return self.vm(info.vmid)
        if info.power_state != "poweredOff":
            raise EsxiError(f"VM {info.name!r} must be powered off to reload its .vmx")
        self.unregister_vm(info, timeout=timeout)
        return self.register_vm(info.vmx_path, timeout=timeout)


_SHA256_PROGRAM = (
    "import hashlib,sys\n"
    "h=hashlib.sha256()\n"
    "f=open(sys.argv[1],'rb')\n"
    "for b in iter(lambda:f.read(1<<20),b''):h.update(b)\n"
    "print(h.hexdigest())\n"
)


def _with_zeros(
    pieces: Iterable[tuple[int, bytes]], capacity: int, on_written: Callable[[int, int], None] | None
) -> Iterator[bytes]:
    """The whole file as a byte stream: the pieces with zeros in between and up to ``capacity``."""
    zero = bytes(1 << 20)
    pos = 0

    def gap(end: int) -> Iterator[bytes]:
        nonlocal pos
        while pos < end:
            n = min(len(zero), end - pos)
            yield zero[:n]
            pos += n

    for off, data in pieces:
        if off < pos:
            raise ValueError(f"pieces out of order at {off}")
        yield from gap(off)
        yield data
        pos += len(data)
        if on_written is not None:
            on_written(off, len(data))
    if pos > capacity:
        raise ValueError(f"data past the end of the disk ({pos} > {capacity})")
    yield from gap(capacity)
