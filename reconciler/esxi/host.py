"""``EsxiHost``: the one interface the operations use to talk to a standalone ESXi host.

A facade over the parts, one module per concern, all sharing one :class:`~.connection.HostConnection`
(the API and SSH sessions, the name, the licence routing of :mod:`.licence`):

================  ====================================================================================
part              what
================  ====================================================================================
:mod:`.inventory`   VMs, disks, snapshot trees (API reads: they work on free hosts too)
:mod:`.datastores`  capacity, free space, the free-space floor
:mod:`.files`       small files, folders, renames, deletes, SHA-256 (SSH if enabled, else API + HTTPS)
:mod:`.disks`       disk data: readers, on-host digests and allocation, creating and writing disks
:mod:`.snapshots`   ours only, always removed: the backup snapshot and its frozen disks
:mod:`.cbt`         changed areas (licensed hosts), switching CBT
:mod:`.power`       power, guest shutdown, register, unregister, reload
================  ====================================================================================

The implementation picks the vSphere API or SSH per operation and per licence; the operations never
ask:

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

Errors: every method raises :class:`~.errors.EsxiError` only (library errors translated at their
boundary, a last net here), with :attr:`~.errors.EsxiError.host` set to this host's name and
:attr:`~.errors.EsxiError.transient` saying whether a retry may help; bad arguments (a name where a
vmid is expected, a disk size that is no whole sector) are ``ValueError``. The operations do not
depend on this class but on the Protocols of :mod:`reconciler.operations.ports`, which it satisfies.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Concatenate, ParamSpec, TypeVar

from reconciler.esxi.api import ApiSession
from reconciler.esxi.cbt import Cbt
from reconciler.esxi.connection import HostConnection
from reconciler.esxi.datastores import Datastores
from reconciler.esxi.disks import Disks
from reconciler.esxi.files import Files
from reconciler.esxi.hostdigest import BLOCK_SIZE, Allocation, DigestResult
from reconciler.esxi.inventory import Inventory
from reconciler.esxi.power import Power
from reconciler.esxi.shell import ShellSession
from reconciler.esxi.snapshots import Snapshots
from reconciler.esxi.transport import DiskReader, HttpsRangeReader
from reconciler.esxi.vmdk import Descriptor
from reconciler.esxi.vmx import VmxFile
from reconciler.facts.inventory import (
    SNAPSHOT_PREFIX,
    BackupSnapshot,
    DatastoreInfo,
    DiskInfo,
    FrozenDisk,
    HostLimits,
    License,
    SnapshotInfo,
    VmInfo,
)

P = ParamSpec("P")
R = TypeVar("R")


def _boundary(method: Callable[Concatenate[EsxiHost, P], R]) -> Callable[Concatenate[EsxiHost, P], R]:
    """The way out of the host layer: library errors the parts did not translate become
    :class:`~.errors.EsxiError` (:func:`.api.mapped_faults`), and every EsxiError names this host."""

    @functools.wraps(method)
    def wrapper(self: EsxiHost, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._conn.faults(method.__name__.replace("_", " ")):
            return method(self, *args, **kwargs)

    return wrapper


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
        self.name = name or api.address
        self.prefix = snapshot_prefix
        self.limits = limits
        self._conn = HostConnection(
            api, shell, name=self.name, license=license, api_user=api_user, api_password=api_password
        )
        self._inventory = Inventory(self._conn)
        self._datastores = Datastores(self._conn, limits)
        self._files = Files(self._conn, self._inventory)
        self._disks = Disks(self._conn, self._files)
        self._snapshots = Snapshots(
            self._conn, self._inventory, self._files, self._datastores, snapshot_prefix
        )
        self._cbt = Cbt(self._conn, self._inventory, self._files, self._snapshots)
        self._power = Power(self._conn, self._inventory)

    @property
    def identity(self) -> str:
        """``address:port`` of the API: what tells hosts apart (per-VM locks), whatever their names in
        the config."""
        return f"{self.api.address}:{self.api.port}"

    @property
    def ssh_enabled(self) -> bool:
        """Whether SSH is configured: free hosts' writes and the on-host digest programs need it."""
        return self.shell is not None

    def close(self) -> None:
        self._disks.close()
        self.api.close()
        if self.shell is not None:
            self.shell.close()

    def __enter__(self) -> EsxiHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- licence (:mod:`.licence`)

    @property
    def license(self) -> str:
        """``free`` or ``licensed``: as configured, or detected once."""
        with self._conn.faults("licence"):
            return self._conn.licence.kind

    # -- inventory and datastores

    @_boundary
    def list_vms(self) -> list[VmInfo]:
        """Every registered VM."""
        return self._inventory.list_vms()

    @_boundary
    def vm(self, ref: VmInfo | str) -> VmInfo:
        """Fresh information about one VM, by VmInfo or vmid (names: :meth:`find_vm`; a name is never
        taken for an id, so a VM called ``"12"`` cannot be confused with vmid 12)."""
        return self._inventory.vm(ref)

    @_boundary
    def find_vm(self, name: str) -> VmInfo:
        """The VM whose display name is exactly ``name``."""
        return self._inventory.find_vm(name)

    @_boundary
    def datastores(self) -> list[DatastoreInfo]:
        """Capacity and free space of every datastore."""
        return self._datastores.datastores()

    # -- snapshots

    def is_ours(self, snapshot: SnapshotInfo) -> bool:
        return self._snapshots.is_ours(snapshot)

    @_boundary
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
        return self._snapshots.create_snapshot(
            vm, name, description=description, quiesce=quiesce, timeout=timeout
        )

    @_boundary
    def remove_snapshot(self, vm: VmInfo | str, snapshot_id: str, *, timeout: float = 3600.0) -> None:
        """Remove one snapshot, ours only (by id; children are kept; never ``removeall``)."""
        self._snapshots.remove_snapshot(vm, snapshot_id, timeout=timeout)

    def backup_snapshot(
        self,
        vm: VmInfo | str,
        *,
        quiesce: bool = False,
        timeout: float = 1800.0,
        remove_timeout: float = 3600.0,
        check_space: bool = True,
    ) -> contextlib.AbstractContextManager[BackupSnapshot]:
        """Snapshot the VM for one backup, yield what to read, and always remove the snapshot
        (:mod:`.snapshots`); its errors name this host, what the block raises passes unchanged."""
        return self._snapshots.backup_snapshot(
            vm, quiesce=quiesce, timeout=timeout, remove_timeout=remove_timeout, check_space=check_space
        )

    # -- changed block tracking

    @_boundary
    def changed_areas(
        self, vm: VmInfo | str, snapshot: SnapshotInfo, disk: FrozenDisk | DiskInfo, change_id: str | None
    ) -> list[tuple[int, int]]:
        """Byte ranges changed since ``change_id`` (``"*"``: all allocated); raises
        :class:`~.errors.FullBackupNeededError` when CBT cannot answer."""
        return self._cbt.changed_areas(vm, snapshot, disk, change_id)

    @_boundary
    def set_cbt(self, vm: VmInfo | str, enabled: bool, *, timeout: float = 600.0) -> None:
        """Switch CBT (see :meth:`.cbt.Cbt.set_cbt` for how, per licence)."""
        self._cbt.set_cbt(vm, enabled, timeout=timeout)

    # -- power and registration

    @_boundary
    def power_on(self, vm: VmInfo | str, *, timeout: float = 600.0) -> VmInfo:
        """Power the VM on and wait until the host reports it on (no-op when it already is)."""
        return self._power.power_on(vm, timeout=timeout)

    @_boundary
    def power_off(self, vm: VmInfo | str, *, timeout: float = 600.0) -> VmInfo:
        """Hard power-off (like pulling the plug); prefer :meth:`shutdown_guest`."""
        return self._power.power_off(vm, timeout=timeout)

    @_boundary
    def shutdown_guest(self, vm: VmInfo | str, *, timeout: float = 600.0) -> VmInfo:
        """Ask the guest OS to shut down and wait up to ``timeout`` for power-off
        (:class:`~.errors.PowerStateTimeoutError` if it does not stop; the VM is left running)."""
        return self._power.shutdown_guest(vm, timeout=timeout)

    @_boundary
    def guest_heartbeat(self, vm: VmInfo | str) -> str:
        """The guest heartbeat colour: ``green``, ``yellow``, ``red`` or ``gray``."""
        return self._power.guest_heartbeat(vm)

    @_boundary
    def register_vm(self, vmx_path: str, *, timeout: float = 300.0) -> VmInfo:
        """Register the VM whose ``.vmx`` is at ``vmx_path`` and return it."""
        return self._power.register_vm(vmx_path, timeout=timeout)

    @_boundary
    def unregister_vm(self, vm: VmInfo | str, *, timeout: float = 300.0) -> None:
        """Remove the VM from the inventory, keeping its files (it must be powered off)."""
        self._power.unregister_vm(vm, timeout=timeout)

    @_boundary
    def reload_vm(self, vm: VmInfo | str, *, timeout: float = 300.0) -> VmInfo:
        """Make the host re-read the VM's .vmx after an edit (VM powered off); without SSH the VM is
        registered again (same identity, new vmid)."""
        return self._power.reload_vm(vm, timeout=timeout)

    # -- files

    @_boundary
    def read_file(self, ds_path: str, max_size: int = 16 << 20) -> bytes:
        """A small datastore file (.vmx, descriptor)."""
        return self._files.read_file(ds_path, max_size)

    @_boundary
    def file_exists(self, ds_path: str) -> bool:
        return self._files.file_exists(ds_path)

    @_boundary
    def read_vmx(self, vm: VmInfo | str) -> VmxFile:
        return self._files.read_vmx(vm)

    @_boundary
    def read_descriptor(self, ds_path: str) -> Descriptor:
        return self._files.read_descriptor(ds_path)

    @_boundary
    def file_sha256(self, ds_path: str, *, timeout: float = 3600.0) -> str:
        """SHA-256 (hex) of a datastore file (computed on the host when SSH is enabled)."""
        return self._files.file_sha256(ds_path, timeout=timeout)

    @_boundary
    def folder_exists(self, ds_path: str) -> bool:
        return self._files.folder_exists(ds_path)

    @_boundary
    def list_folder(self, folder: str, pattern: str = "*") -> list[str]:
        """Names of the files in ``[ds] dir`` matching the glob ``pattern`` (not recursive)."""
        return self._files.list_folder(folder, pattern)

    @_boundary
    def find_in_vm_folders(self, datastores: Sequence[str], pattern: str, depth: int = 1) -> list[str]:
        """Files matching ``pattern`` in the folders of ``datastores`` down to ``depth`` (datastore paths)."""
        return self._files.find_in_vm_folders(datastores, pattern, depth)

    @_boundary
    def make_directory(self, ds_path: str) -> None:
        """Create the folder ``[ds] dir``; an error if it already exists."""
        self._files.make_directory(ds_path)

    @_boundary
    def delete_path(self, ds_path: str) -> None:
        """Delete a file or a whole folder (no error when it does not exist)."""
        self._files.delete_path(ds_path)

    @_boundary
    def move_file(self, src: str, dst: str) -> None:
        """Rename a datastore file (replacing ``dst``)."""
        self._files.move_file(src, dst)

    @_boundary
    def write_file(self, ds_path: str, data: bytes) -> None:
        """Write a small file atomically (a temporary file renamed over it)."""
        self._files.write_file(ds_path, data)

    # -- disk data

    @_boundary
    def https_reader(self, streams: int = 4) -> HttpsRangeReader:
        """A pinned HTTPS ``/folder`` Range reader; the caller closes it."""
        return self._disks.https_reader(streams)

    @_boundary
    def disk_reader(self, transport: str = "auto", streams: int = 4) -> DiskReader:
        """A reader for frozen disk files: ``https``, ``ssh`` or ``auto``; the caller closes it."""
        return self._disks.disk_reader(transport, streams)

    @_boundary
    def digest_compare(
        self,
        disk: FrozenDisk,
        previous: bytes | None,
        on_block: Callable[[int, bytes], None],
        *,
        algorithm: str | None = None,
        block_size: int = BLOCK_SIZE,
        timeout: float = 600.0,
        first_block: int = 0,
        block_count: int | None = None,
    ) -> DigestResult:
        """Compare block digests on the host (:mod:`.hostdigest`) with ``algorithm`` (the previous map's;
        None: the host's faster one); ``on_block`` gets the changed blocks."""
        return self._disks.digest_compare(
            disk,
            previous,
            on_block,
            algorithm=algorithm,
            block_size=block_size,
            timeout=timeout,
            first_block=first_block,
            block_count=block_count,
        )

    @_boundary
    def allocation(
        self, disk: FrozenDisk, *, block_size: int = BLOCK_SIZE, timeout: float = 120.0
    ) -> Allocation:
        """The frozen disk file's size and data ranges, listed on the host."""
        return self._disks.allocation(disk, block_size=block_size, timeout=timeout)

    @_boundary
    def create_disk(
        self,
        descriptor: str,
        capacity: int,
        *,
        thin: bool = True,
        adapter: str = "lsilogic",
        hw_version: str = "14",
    ) -> str:
        """Create an empty flat disk of exactly ``capacity`` bytes; returns its raw extent's path."""
        return self._disks.create_disk(
            descriptor, capacity, thin=thin, adapter=adapter, hw_version=hw_version
        )

    @_boundary
    def delete_disk(self, descriptor: str) -> None:
        """Delete a base disk: descriptor, extents and change-tracking file."""
        self._disks.delete_disk(descriptor)

    @_boundary
    def checks_disk_writes(self) -> bool:
        """Whether :meth:`write_disk` checks on the host what it writes (:meth:`.Disks.checks_writes`)."""
        return self._disks.checks_writes()

    @_boundary
    def write_disk(
        self,
        data_file: str,
        capacity: int,
        pieces: Iterable[tuple[int, bytes]],
        on_written: Callable[[int, int], None] | None = None,
        *,
        streams: int = 4,
    ) -> bool:
        """Write ``(offset, bytes)`` pieces into a raw extent made by :meth:`create_disk`; whether the
        host checked what it wrote (:meth:`.disks.Disks.write_disk`)."""
        return self._disks.write_disk(data_file, capacity, pieces, on_written, streams=streams)
