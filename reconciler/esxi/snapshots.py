"""Snapshots: ours only, identified by id, never ``removeall``.

Ours are named ``<prefix><UTC time>-<random>`` (prefix ``esxi-reconciler-``).
:meth:`Snapshots.backup_snapshot` is the context manager for one backup: it refuses VMs with foreign
snapshots, creates ours, finds the frozen disks, and **always** removes ours on the way out — on
exceptions, timeouts, ``KeyboardInterrupt`` and, if the process turns SIGTERM into an exception
(:func:`.signals.sigterm_raises` in the main thread), on SIGTERM. SIGINT/SIGTERM arriving *during* the
removal are deferred until it is done. It then verifies the chain (backings back at the pre-backup
files, our delta files gone) and raises :class:`ChainNotCleanError` if not. SIGKILL cannot be caught:
the next backup of the VM removes the leftover under the VM's lock, and the planner lists it as an
orphan to remove.

Licensed hosts: API tasks; free hosts (or a licensed one whose API refuses): ``vim-cmd`` over SSH,
confirmed through the API.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Iterator
from datetime import datetime, timezone

from reconciler.esxi import vimcmd
from reconciler.esxi.api import wait_task
from reconciler.esxi.connection import HostConnection
from reconciler.esxi.datastores import Datastores
from reconciler.esxi.errors import (
    ApiError,
    ChainNotCleanError,
    CommandError,
    EsxiError,
    ForeignSnapshotError,
    RestrictedByLicenseError,
    ShellError,
    SnapshotError,
    SnapshotTimeoutError,
    TaskTimeoutError,
    UnsupportedDiskError,
)
from reconciler.esxi.files import Files, dir_of, ds_join, same_file
from reconciler.esxi.inventory import Inventory, disks_of, vmid_of
from reconciler.esxi.signals import deferred_signals
from reconciler.esxi.vmdk import Descriptor
from reconciler.facts.inventory import BackupSnapshot, FrozenDisk, SnapshotInfo, VmInfo

log = logging.getLogger(__name__)


def snapshot_name(prefix: str) -> str:
    """A new name for our snapshot: ``<prefix><UTC time>-<random>``."""
    return f"{prefix}{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(4)}"


class Snapshots:
    """The snapshots of one host's VMs."""

    def __init__(
        self, conn: HostConnection, inventory: Inventory, files: Files, datastores: Datastores, prefix: str
    ) -> None:
        self.conn = conn
        self.inventory = inventory
        self.files = files
        self.datastores = datastores
        self.prefix = prefix

    def is_ours(self, snapshot: SnapshotInfo) -> bool:
        return snapshot.name.startswith(self.prefix)

    # -- create and remove

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
        vmid = vmid_of(vm)
        vimcmd.check_arg(name)
        vimcmd.check_arg(description)
        if self.conn.licence.use_api_for_changes():
            try:
                vm_mo = self.conn.vm_mo(vmid)
                with self.conn.faults("create snapshot"):  # not api.call: a retry could make two snapshots
                    task = vm_mo.CreateSnapshot_Task(name, description, False, quiesce)
                wait_task(task, timeout, f"snapshot {name!r} of VM {vmid}")
            except RestrictedByLicenseError as exc:
                self.conn.licence.api_refused(exc)
            except TaskTimeoutError as exc:
                with contextlib.suppress(Exception):
                    exc.task.CancelTask()  # type: ignore[attr-defined]
                raise SnapshotTimeoutError(f"creating snapshot {name!r} of VM {vmid}: {exc}") from exc
            except ApiError as exc:
                raise SnapshotError(f"creating snapshot {name!r} of VM {vmid}: {exc}") from exc
            else:
                return self._confirm_snapshot(vmid, name)
        try:
            self.conn.ssh().run(
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
            text = self.conn.ssh().run(vimcmd.snapshot_get(vmid), timeout=120).text
            ids = [r.id for r in vimcmd.parse_snapshot_get(text) if r.name == name]
            if len(ids) != 1:
                raise SnapshotError(f"VM {vmid}: {len(ids)} snapshots named {name!r} after snapshot.create")
        deadline = time.monotonic() + wait
        while True:
            found = [s for s in self.inventory.vm(vmid).snapshots if s.name == name]
            if len(found) == 1 and (not via_ssh or found[0].id == ids[0]):
                return found[0]
            if time.monotonic() > deadline:
                raise SnapshotError(f"VM {vmid}: snapshot {name!r} not confirmed through the API")
            time.sleep(0.5)

    def remove_snapshot(self, vm: VmInfo | str, snapshot_id: str, *, timeout: float = 3600.0) -> None:
        """Remove one snapshot, ours only (by id; children are kept; never ``removeall``)."""
        vmid = vmid_of(vm)
        current = {s.id: s for s in self.inventory.vm(vmid).snapshots}
        snap = current.get(snapshot_id)
        if snap is None:
            raise SnapshotError(f"VM {vmid} has no snapshot {snapshot_id}")
        if not self.is_ours(snap):
            raise SnapshotError(f"refusing to remove snapshot {snap.name!r} of VM {vmid}: not ours")
        if self.conn.licence.use_api_for_changes():
            try:
                mo = self.inventory.snapshot_mo(vmid, snapshot_id)
                task = self.conn.api.call(
                    "remove snapshot", lambda: mo.RemoveSnapshot_Task(removeChildren=False)
                )
                wait_task(task, timeout, f"remove snapshot {snapshot_id} of VM {vmid}")
            except RestrictedByLicenseError as exc:
                self.conn.licence.api_refused(exc)
            except ApiError as exc:
                raise SnapshotError(f"removing snapshot {snapshot_id} of VM {vmid}: {exc}") from exc
            else:
                self._confirm_removed(vmid, snapshot_id)
                return
        try:
            self.conn.ssh().run(vimcmd.snapshot_remove(vmid, snapshot_id), timeout=timeout, retry=False)
        except ShellError as exc:
            if snapshot_id in {s.id for s in self.inventory.vm(vmid).snapshots}:
                raise SnapshotError(f"removing snapshot {snapshot_id} of VM {vmid} over SSH: {exc}") from exc
        self._confirm_removed(vmid, snapshot_id)

    def _confirm_removed(self, vmid: str, snapshot_id: str, wait: float = 30.0) -> None:
        deadline = time.monotonic() + wait
        while snapshot_id in {s.id for s in self.inventory.vm(vmid).snapshots}:
            if time.monotonic() > deadline:
                raise SnapshotError(f"VM {vmid}: snapshot {snapshot_id} still listed after removal")
            time.sleep(0.5)

    # -- the backup snapshot

    def frozen_disks(
        self, vm: VmInfo, snapshot: SnapshotInfo
    ) -> tuple[tuple[FrozenDisk, ...], tuple[str, ...]]:
        """The disks frozen by ``snapshot`` (from the snapshot's device backings, cross-checked with the
        top delta descriptor's ``parentFileNameHint``) and the delta descriptors on top of them."""
        mo = self.inventory.snapshot_mo(vm.vmid, snapshot.id)
        if mo is None:
            raise SnapshotError(f"VM {vm.vmid}: snapshot {snapshot.id} vanished")
        devices = self.conn.api.call("snapshot config", lambda: disks_of(mo.config.hardware.device))
        snap_disks = {d.key: d for d in devices}
        now = {d.key: d for d in self.inventory.vm(vm.vmid).disks}
        out = []
        deltas = []
        for before in vm.disks:
            if before.independent:
                continue
            frozen = snap_disks.get(before.key)
            top = now.get(before.key)
            if frozen is None or top is None:
                raise SnapshotError(f"VM {vm.vmid}: disk {before.key} not found in snapshot {snapshot.id}")
            top_desc = self.files.read_descriptor(top.file)
            hint = top_desc.parent_file_name_hint
            if hint is None or not same_file(ds_join(dir_of(top.file), hint), frozen.file):
                raise SnapshotError(
                    f"VM {vm.vmid} disk {before.key}: top {top.file} has parent hint {hint!r}, the snapshot"
                    f" froze {frozen.file}"
                )
            deltas.append(top.file)
            text = self.files.read_file(frozen.file, 1 << 20).decode("utf-8", "surrogateescape")
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
                    data_file=ds_join(dir_of(frozen.file), extent.file_name),
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
        remove those first). Errors of creating and removing name the host; what the block raises
        passes unchanged."""
        with self.conn.faults("backup snapshot"):
            info = self.inventory.vm(vm)
            if info.snapshots:
                foreign = [s.name for s in info.snapshots if not self.is_ours(s)]
                raise ForeignSnapshotError(
                    f"VM {info.name!r} has snapshots {foreign or [s.name for s in info.snapshots]}"
                    + ("" if foreign else " left by an earlier run: remove orphaned snapshots first")
                )
            if check_space:
                self.datastores.check_space(info)
            name = snapshot_name(self.prefix)
            try:
                snap = self.create_snapshot(
                    info, name, description="esxi-reconciler backup", quiesce=quiesce, timeout=timeout
                )
            except BaseException as exc:
                # after a timeout or an interruption the snapshot may still appear: watch for it a while
                failed = isinstance(exc, SnapshotError) and not isinstance(exc, SnapshotTimeoutError)
                with deferred_signals():
                    self._cleanup_by_name(info.vmid, name, remove_timeout, 0.0 if failed else 60.0)
                raise
        deltas: tuple[str, ...] = ()
        try:
            with self.conn.faults("backup snapshot"):
                disks, deltas = self.frozen_disks(info, snap)
            yield BackupSnapshot(vm=info, snapshot=snap, disks=disks, deltas=deltas)
        finally:
            with deferred_signals(), self.conn.faults("remove backup snapshot"):
                self.remove_snapshot(info.vmid, snap.id, timeout=remove_timeout)
                self.verify_chain(info, deltas)

    def _cleanup_by_name(self, vmid: str, name: str, timeout: float, grace: float = 0.0) -> None:
        """After a failed or interrupted create: remove the snapshot called ``name`` if it exists, watching
        for it up to ``grace`` seconds (a timed-out create may still complete on the host)."""
        deadline = time.monotonic() + grace
        try:
            while True:
                for s in self.inventory.vm(vmid).snapshots:
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
        now = {d.key: d for d in self.inventory.vm(before.vmid).disks}
        problems = []
        for d in before.disks:
            cur = now.get(d.key)
            if cur is None or cur.chain != d.chain:
                problems.append(f"disk {d.key}: chain {cur.chain if cur else None} != {d.chain}")
        for delta in deltas:
            if delta not in {f for d in before.disks for f in d.chain} and self.files.file_exists(delta):
                problems.append(f"leftover delta {delta}")
        if problems:
            raise ChainNotCleanError(
                f"VM {before.name!r}: after removing our snapshot: {'; '.join(problems)}"
                " (consolidation needed)"
            )
