"""What the operations need of a host, as small Protocols: the seam between doing and the host layer.

:class:`reconciler.esxi.host.EsxiHost` satisfies every one of them, and only
:mod:`reconciler.operations.hosts` builds it; the operations are written against these, so the test
fakes are checked by mypy against exactly what is used (a method an operation does not call is not
here, and a fake needs only what its operation uses). Signatures are the calls the operations make:
positional parameters are positional-only, so an implementation may name them as it likes.

* :class:`HostReader` — ``observe``: licence, inventory, datastores.
* :class:`DiskSource` — one disk's backup: CBT areas, readers, on-host digests and allocation.
* :class:`BackupHost` — one VM's backup: the VM, its snapshots, its configuration files, its disks.
* :class:`ApplyHost` — ``apply``: backups, orphaned snapshots, CBT, the power cycle that activates it.
* :class:`RestoreHost` — restores and test restores: files, disks, registration, power.

Errors: the methods raise :class:`reconciler.esxi.errors.EsxiError` (with ``host`` and ``transient``)
for everything the host or the connection says; :mod:`reconciler.operations.retry` reads those.

This module loads no host library (pyVmomi, paramiko, urllib3): the values are those of
:mod:`reconciler.facts.inventory` and the host layer's pure modules (:mod:`reconciler.esxi.vmx`,
:mod:`reconciler.esxi.hostdigest`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar

from reconciler.esxi.hostdigest import Allocation, DigestResult
from reconciler.esxi.vmx import VmxFile
from reconciler.facts.inventory import (
    BackupSnapshot,
    DatastoreInfo,
    FrozenDisk,
    HostLimits,
    SnapshotInfo,
    VmInfo,
)

_Session = TypeVar("_Session", bound="HostSession")


class DiskReader(Protocol):
    """Reads extents of a frozen disk file, in order (HTTPS Range or ``dd`` over SSH)."""

    def read(self, ds_path: str, extents: Iterable[tuple[int, int]], /) -> Iterator[tuple[int, bytes]]: ...

    def close(self) -> None: ...


class RangeReader(DiskReader, Protocol):
    """A :class:`DiskReader` that also tells a file's size (HTTPS ``/folder``)."""

    def size(self, ds_path: str, /) -> int: ...


class HostSession(Protocol):
    """One connection to a configured host: its name (for messages, locks by identity), closed after use."""

    @property
    def name(self) -> str: ...

    @property
    def identity(self) -> str:
        """``address:port``: what tells two hosts apart whatever their names (per-VM locks)."""
        ...

    def close(self) -> None: ...

    def __enter__(self: _Session) -> _Session: ...

    def __exit__(self, *exc: object) -> None: ...


class HostReader(Protocol):
    """What :func:`reconciler.operations.observe.observe` reads of a host."""

    @property
    def prefix(self) -> str:
        """The name prefix of our snapshots."""
        ...

    @property
    def license(self) -> str: ...

    def list_vms(self) -> list[VmInfo]: ...

    def datastores(self) -> list[DatastoreInfo]: ...

    def find_in_vm_folders(self, datastores: Sequence[str], pattern: str, depth: int = ..., /) -> list[str]:
        """Files matching ``pattern`` in the folders of ``datastores`` down to ``depth`` (1: top level)."""
        ...

    def read_file(self, ds_path: str, max_size: int = ..., /) -> bytes: ...

    def close(self) -> None: ...


class VmLookup(Protocol):
    """VMs by vmid (or :class:`VmInfo`, re-read fresh) and by exact display name."""

    def vm(self, ref: VmInfo | str, /) -> VmInfo: ...

    def find_vm(self, name: str, /) -> VmInfo: ...

    def list_vms(self) -> list[VmInfo]: ...


class VmFilesReader(Protocol):
    """A VM's small files: the .vmx, .nvram, a journal."""

    def read_file(self, ds_path: str, max_size: int = ..., /) -> bytes: ...

    def file_exists(self, ds_path: str, /) -> bool: ...

    def read_vmx(self, vm: VmInfo, /) -> VmxFile: ...


class GuestPower(Protocol):
    """Powering a VM on, and shutting its guest down (never a hard power-off)."""

    def power_on(self, vm: VmInfo | str, /, *, timeout: float = ...) -> VmInfo: ...

    def shutdown_guest(self, vm: VmInfo, /, *, timeout: float) -> VmInfo: ...


class DiskSource(Protocol):
    """What one disk's backup reads from the host (:class:`reconciler.operations.backup.disk.DiskJob`)."""

    @property
    def license(self) -> str: ...

    @property
    def ssh_enabled(self) -> bool: ...

    def changed_areas(
        self, vm: VmInfo, snapshot: SnapshotInfo, disk: FrozenDisk, change_id: str, /
    ) -> list[tuple[int, int]]: ...

    def disk_reader(self, transport: str, /, *, streams: int) -> DiskReader: ...

    def https_reader(self, streams: int, /) -> RangeReader: ...

    def allocation(self, disk: FrozenDisk, /) -> Allocation: ...

    def digest_compare(
        self,
        disk: FrozenDisk,
        previous: bytes | None,
        on_block: Callable[[int, bytes], None],
        /,
        *,
        algorithm: str | None = ...,
        first_block: int = ...,
        block_count: int | None = ...,
    ) -> DigestResult: ...


class BackupHost(HostSession, VmLookup, VmFilesReader, DiskSource, Protocol):
    """What one VM's backup needs (:func:`reconciler.operations.backup.backup_vm`)."""

    def is_ours(self, snapshot: SnapshotInfo, /) -> bool: ...

    def remove_snapshot(self, vm: VmInfo, snapshot_id: str, /) -> None: ...

    def backup_snapshot(
        self, vm: VmInfo, /, *, quiesce: bool, timeout: float
    ) -> AbstractContextManager[BackupSnapshot]: ...


class ApplyHost(BackupHost, GuestPower, Protocol):
    """What :func:`reconciler.operations.apply.apply` needs: backups, and switching CBT (with the power
    cycle that activates it on a free host)."""

    def set_cbt(self, vm: VmInfo, enabled: bool, /) -> None: ...


class RestoreHost(HostSession, VmLookup, VmFilesReader, GuestPower, Protocol):
    """What restores need (:mod:`reconciler.operations.restore`): free space, files and disks written
    and verified, VMs registered, reloaded and powered."""

    @property
    def limits(self) -> HostLimits | None: ...

    @property
    def ssh_enabled(self) -> bool: ...

    def datastores(self) -> list[DatastoreInfo]: ...

    def power_off(self, vm: VmInfo | str, /) -> VmInfo: ...

    def guest_heartbeat(self, vm: VmInfo | str, /) -> str: ...

    def register_vm(self, vmx_path: str, /) -> VmInfo: ...

    def unregister_vm(self, vm: VmInfo | str, /) -> None: ...

    def reload_vm(self, vm: VmInfo, /) -> VmInfo: ...

    def write_file(self, ds_path: str, data: bytes, /) -> None: ...

    def delete_path(self, ds_path: str, /) -> None: ...

    def make_directory(self, ds_path: str, /) -> None: ...

    def folder_exists(self, ds_path: str, /) -> bool: ...

    def list_folder(self, folder: str, pattern: str, /) -> list[str]: ...

    def create_disk(
        self, descriptor: str, capacity: int, /, *, thin: bool, adapter: str, hw_version: str
    ) -> str: ...

    def checks_disk_writes(self) -> bool:
        """Whether :meth:`write_disk` will check on the host what it writes."""
        ...

    def write_disk(
        self,
        data_file: str,
        capacity: int,
        pieces: Iterable[tuple[int, bytes]],
        on_written: Callable[[int, int], None] | None,
        /,
        *,
        streams: int,
    ) -> bool:
        """Whether the host checked what it wrote (else the caller reads it back: :meth:`file_sha256`)."""
        ...

    def delete_disk(self, descriptor: str, /) -> None: ...

    def file_sha256(self, ds_path: str, /, *, timeout: float) -> str: ...
