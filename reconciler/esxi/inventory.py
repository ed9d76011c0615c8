"""Reading what a host holds through the API (reads work on free hosts too): VMs with their disks,
snapshot trees and CBT state, as the values of :mod:`reconciler.facts.inventory`.

A VM is named by its vmid (the API's managed object id, which equals the ``vim-cmd`` Vmid on a
standalone host) or looked up by its exact display name (:meth:`Inventory.find_vm`); a name is never
taken for an id, so a VM called ``"12"`` cannot be confused with vmid 12.
"""

from __future__ import annotations

from typing import Any

from pyVmomi import vim, vmodl

from reconciler.esxi.connection import HostConnection
from reconciler.esxi.errors import ApiError, EsxiError
from reconciler.facts.inventory import DiskInfo, SnapshotInfo, VmInfo, split_ds_path


def vmid_of(ref: VmInfo | str) -> str:
    """The vmid of a VM given as :class:`VmInfo` or vmid (ValueError for anything else: a name)."""
    if isinstance(ref, VmInfo):
        return ref.vmid
    if not ref.isdigit():
        raise ValueError(f"not a vmid: {ref!r} (look VMs up by name with find_vm)")
    return ref


def snapshot_tree(root: Any) -> list[tuple[SnapshotInfo, Any]]:
    """The snapshot tree under ``root`` (a VM's ``snapshot`` property, or None), flattened parents
    first, with each snapshot's API object."""
    out: list[tuple[SnapshotInfo, Any]] = []
    if root is not None:
        _walk_tree(root.rootSnapshotList, None, out)
    return out


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


def _controllers(devices: Any) -> dict[int, str]:
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


def disks_of(devices: Any) -> tuple[DiskInfo, ...]:
    """The virtual disks among a VM's (or a snapshot's) devices."""
    controllers = _controllers(devices)
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


class Inventory:
    """The VMs of one host."""

    def __init__(self, conn: HostConnection) -> None:
        self.conn = conn

    def _vm_info(self, mo: Any) -> VmInfo:
        def read() -> VmInfo:
            config = mo.config
            vmx = str(config.files.vmPathName)
            return VmInfo(
                vmid=str(mo._moId),
                name=str(config.name),
                uuid=config.uuid,
                instance_uuid=config.instanceUuid,
                power_state=str(mo.runtime.powerState),
                vmx_path=vmx,
                datastore=split_ds_path(vmx)[0],
                disks=disks_of(config.hardware.device),
                snapshots=tuple(info for info, _ in snapshot_tree(mo.snapshot)),
                cbt_enabled=bool(config.changeTrackingEnabled),
                hw_version=config.version,
            )

        return self.conn.api.call(f"inventory of VM {mo._moId}", read)

    def list_vms(self) -> list[VmInfo]:
        """Every registered VM."""

        def ids() -> list[Any]:
            content = self.conn.api.content
            view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
            try:
                return list(view.view)
            finally:
                view.Destroy()

        out = []
        for mo in self.conn.api.call("list VMs", ids):
            try:
                out.append(self._vm_info(mo))
            except ApiError as exc:
                if isinstance(exc.__cause__, vmodl.fault.ManagedObjectNotFound):
                    continue  # unregistered meanwhile
                raise
        return out

    def vm(self, ref: VmInfo | str) -> VmInfo:
        """Fresh information about one VM, by VmInfo or vmid (see the module doc)."""
        return self._vm_info(self.conn.vm_mo(vmid_of(ref)))

    def find_vm(self, name: str) -> VmInfo:
        """The VM whose display name is exactly ``name``."""
        found = [vm for vm in self.list_vms() if vm.name == name]
        if len(found) != 1:
            raise EsxiError(f"host {self.conn.name}: {len(found)} VMs named {name!r}")
        return found[0]

    def snapshot_mo(self, vmid: str, snapshot_id: str) -> Any:
        """The API's snapshot object of VM ``vmid`` with id ``snapshot_id`` (None if there is none)."""

        def find() -> Any:
            for info, mo in snapshot_tree(self.conn.vm_mo(vmid).snapshot):
                if info.id == snapshot_id:
                    return mo
            return None

        return self.conn.api.call(f"snapshot {snapshot_id} of VM {vmid}", find)
