"""What a host holds, as plain values: VMs, their disks and snapshots, datastores; datastore paths;
what a backup snapshot froze (:class:`BackupSnapshot`, :class:`FrozenDisk`); and the two host settings
the host layer is given (:class:`License`, :class:`HostLimits`).

:class:`reconciler.esxi.host.EsxiHost` reads them from a host; the planner, the status conditions and
the operations read them without loading the host layer (pyVmomi, paramiko). The config model holds
:class:`License` and :class:`HostLimits` as they are, so the host layer takes them without importing
the config. Standard library only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

SNAPSHOT_PREFIX = "esxi-reconciler-"
"""Our snapshots are named ``<prefix><UTC time>-<random>``; any other snapshot is foreign."""


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot of a VM (the tree flattened, parents first)."""

    id: str
    """The snapshot id (``vim-cmd`` SnapshotId = the API tree's ``id``)."""
    name: str
    description: str
    created: datetime | None
    parent_id: str | None
    quiesced: bool


@dataclass(frozen=True)
class DiskInfo:
    """A virtual disk as the VM currently sees it."""

    key: int
    label: str
    node: str | None
    """``scsi0:0`` …"""
    file: str
    """Datastore path of the current top of the chain (a delta while snapshots exist)."""
    chain: tuple[str, ...]
    """Top first, base last."""
    capacity: int
    change_id: str | None
    uuid: str | None
    mode: str | None
    thin: bool | None

    @property
    def base(self) -> str:
        return self.chain[-1]

    @property
    def independent(self) -> bool:
        return (self.mode or "").startswith("independent")


@dataclass(frozen=True)
class VmInfo:
    vmid: str
    """The managed object id = the ``vim-cmd`` Vmid."""
    name: str
    uuid: str | None
    instance_uuid: str | None
    power_state: str
    vmx_path: str
    datastore: str
    disks: tuple[DiskInfo, ...]
    snapshots: tuple[SnapshotInfo, ...]
    cbt_enabled: bool
    hw_version: str | None


@dataclass(frozen=True)
class DatastoreInfo:
    name: str
    capacity: int
    free: int
    accessible: bool
    type: str


# -- what a backup reads ----------------------------------------------------------------------------


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
    """What :meth:`reconciler.esxi.host.EsxiHost.backup_snapshot` yields."""

    vm: VmInfo
    """The VM as it was just before the snapshot."""
    snapshot: SnapshotInfo
    disks: tuple[FrozenDisk, ...]
    deltas: tuple[str, ...] = field(default=())
    """Delta descriptors our snapshot created (checked gone afterwards)."""


def split_ds_path(ds_path: str) -> tuple[str, str]:
    """``[datastore1] a b/c.vmdk`` → ``("datastore1", "a b/c.vmdk")``. Only the one space after ``]`` is
    dropped: a folder named after a VM may begin or end with a space or a line break."""
    if not ds_path.startswith("[") or "]" not in ds_path:
        raise ValueError(f"not a datastore path: {ds_path!r}")
    ds, _, rel = ds_path[1:].partition("]")
    return ds, rel.removeprefix(" ")


# -- host settings the host layer is given -----------------------------------------------------------


class License(str, enum.Enum):
    """How the host is licensed, as declared (``AUTO`` = detect on connection)."""

    AUTO = "auto"
    FREE = "free"
    LICENSED = "licensed"


@dataclass(frozen=True)
class HostLimits:
    """Concurrency limits and the datastore free-space floor (0 = no check)."""

    concurrent_backups: int
    concurrent_backups_per_datastore: int
    min_datastore_free_bytes: int
    min_datastore_free_percent: float

    def datastore_has_room(self, capacity: int, free: int) -> bool:
        """Whether a datastore with this capacity and free space (bytes) is above both floors."""
        if free < self.min_datastore_free_bytes:
            return False
        return capacity <= 0 or free * 100 >= capacity * self.min_datastore_free_percent
