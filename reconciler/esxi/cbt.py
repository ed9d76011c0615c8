"""Changed block tracking: the areas of a disk changed since a changeId (licensed hosts), and switching
CBT on or off.

QueryChangedDiskAreas is refused on free hosts: :meth:`Cbt.changed_areas` then raises
:class:`FullBackupNeededError` (the backup compares block digests on the host instead). Switching:
ReconfigVM and a stun cycle on a licensed host; on a free host the ``.vmx`` is edited over SSH with the
VM powered off and reloaded.
"""

from __future__ import annotations

from pyVmomi import vim, vmodl

from reconciler.esxi import vimcmd
from reconciler.esxi.api import wait_task
from reconciler.esxi.connection import HostConnection
from reconciler.esxi.errors import (
    ApiError,
    EsxiError,
    FullBackupNeededError,
    RestrictedByLicenseError,
    SnapshotError,
)
from reconciler.esxi.files import Files
from reconciler.esxi.inventory import Inventory, vmid_of
from reconciler.esxi.snapshots import Snapshots
from reconciler.esxi.transport import vmfs_path
from reconciler.facts.inventory import DiskInfo, FrozenDisk, SnapshotInfo, VmInfo


class Cbt:
    """Changed block tracking of one host's VMs."""

    def __init__(
        self, conn: HostConnection, inventory: Inventory, files: Files, snapshots: Snapshots
    ) -> None:
        self.conn = conn
        self.inventory = inventory
        self.files = files
        self.snapshots = snapshots

    def changed_areas(
        self, vm: VmInfo | str, snapshot: SnapshotInfo, disk: FrozenDisk | DiskInfo, change_id: str | None
    ) -> list[tuple[int, int]]:
        """Byte ranges of ``disk`` changed since ``change_id`` up to ``snapshot`` (``"*"``: all allocated),
        per the loop of esxi-reference §5. Raises FullBackupNeededError when CBT cannot answer."""
        vmid = vmid_of(vm)
        if not change_id:
            raise FullBackupNeededError("no-change-id", f"no previous changeId for disk {disk.key}")
        if self.conn.licence.kind == "free" or self.conn.licence.api_restricted:
            raise FullBackupNeededError("restricted", "the host's licence refuses QueryChangedDiskAreas")
        mo = self.inventory.snapshot_mo(vmid, snapshot.id)
        vm_mo = self.conn.vm_mo(vmid)
        areas: list[tuple[int, int]] = []
        off = 0
        try:
            with self.conn.faults(f"QueryChangedDiskAreas disk {disk.key}"):
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

    def set_cbt(self, vm: VmInfo | str, enabled: bool, *, timeout: float = 600.0) -> None:
        """Switch CBT. Licensed: ReconfigVM, then a stun cycle (our snapshot created and removed) when the
        VM runs. Free: only with the VM powered off — the .vmx is edited over SSH (backup copy
        ``.vmx.esxi-reconciler.bak``, temp file, atomic ``mv``) and reloaded with ``vim-cmd vmsvc/reload``;
        tracking becomes active at the next power-on. Refused with snapshots present."""
        info = self.inventory.vm(vm)
        if info.snapshots:
            raise SnapshotError(f"VM {info.name!r}: CBT is switched only without snapshots")
        if self.conn.licence.use_api_for_changes():
            try:
                spec = vim.vm.ConfigSpec(changeTrackingEnabled=enabled)  # type: ignore[no-untyped-call]
                task = self.conn.api.call(
                    "reconfigure", lambda: self.conn.vm_mo(info.vmid).ReconfigVM_Task(spec)
                )
                wait_task(task, timeout, f"CBT {'on' if enabled else 'off'} for VM {info.vmid}")
            except RestrictedByLicenseError as exc:
                self.conn.licence.api_refused(exc)
            else:
                if info.power_state == "poweredOn":
                    with self.snapshots.backup_snapshot(info, check_space=False):
                        pass
                return
        if info.power_state != "poweredOff":
            raise EsxiError(f"VM {info.name!r} must be powered off to switch CBT on a free host")
        vmx = self.files.read_vmx(info)
        vmx.set_cbt(enabled)
        path = vmfs_path(info.vmx_path)
        tmp = path + ".esxi-reconciler.tmp"
        shell = self.conn.ssh()
        shell.run(["cp", "-p", path, path + ".esxi-reconciler.bak"], timeout=60)
        shell.run(["sh", "-c", 'cat > "$1"', "sh", tmp], stdin=vmx.dumps().encode("utf-8", "surrogateescape"))
        shell.run(["mv", "-f", tmp, path], timeout=60)
        shell.run(vimcmd.reload(info.vmid), timeout=timeout)
