"""A host's datastores: capacity and free space, and the free-space floor a snapshot must not cross
(:class:`~reconciler.facts.inventory.HostLimits`)."""

from __future__ import annotations

from pyVmomi import vim

from reconciler.esxi.connection import HostConnection
from reconciler.esxi.errors import InsufficientSpaceError
from reconciler.facts.inventory import DatastoreInfo, HostLimits, VmInfo, split_ds_path


class Datastores:
    """The datastores of one host, and its configured limits."""

    def __init__(self, conn: HostConnection, limits: HostLimits | None) -> None:
        self.conn = conn
        self.limits = limits

    def datastores(self) -> list[DatastoreInfo]:
        """Capacity and free space of every datastore."""

        def read() -> list[DatastoreInfo]:
            content = self.conn.api.content
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

        return self.conn.api.call("datastores", read)

    def check_space(self, vm: VmInfo, limits: HostLimits | None = None) -> None:
        """Raise :class:`InsufficientSpaceError` if a datastore holding the VM's files is below the host's
        free-space floor (``limits`` default: the configured ones; no limits → no check)."""
        limits = limits or self.limits
        if limits is None:
            return
        names = {vm.datastore} | {split_ds_path(d.file)[0] for d in vm.disks}
        for ds in self.datastores():
            if ds.name in names and not limits.datastore_has_room(ds.capacity, ds.free):
                raise InsufficientSpaceError(
                    f"datastore {ds.name} on {self.conn.name} has {ds.free} of {ds.capacity} bytes free,"
                    f" below the limit (min {limits.min_datastore_free_bytes} bytes /"
                    f" {limits.min_datastore_free_percent} %); no snapshot taken"
                )
