"""One VM's backup: lock, hooks, snapshot, its disks, then the restore point, written last.

1. The VM's lock on this machine (:mod:`reconciler.operations.vmlock`); a VM with **any** snapshot that
   is not ours is refused (a foreign snapshot means the frozen files are deltas, which this engine
   does not read, and it usually means a human is working on the VM; other VMs go on); a snapshot named
   as ours is an orphan of a killed run (we hold the lock) and is removed.
2. Pre hooks, then :meth:`~reconciler.esxi.host.EsxiHost.backup_snapshot` (checks the datastore
   free-space floor, creates our snapshot, removes it on every way out); the ``.vmx``/``.nvram`` as
   before the snapshot and every selected disk's descriptor are stored, then each selected disk is
   backed up by a :class:`~reconciler.operations.backup.disk.DiskJob` against the VM's previous point.
   Post hooks run once the snapshot is gone, also on failure.
3. The manifest is written last (status ``success``), with each disk's mode and reasons; a failed VM
   writes no manifest and leaves only garbage for GC.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone

from reconciler.config.model import BackupPolicy
from reconciler.esxi.errors import EsxiError
from reconciler.facts.inventory import FrozenDisk, VmInfo, split_ds_path
from reconciler.facts.points import DiskRecord, RestorePoint, StoredFile, VmRef, new_point_id
from reconciler.operations.backup.context import BackupContext, BackupError, Cancelled, VmResult
from reconciler.operations.backup.disk import DiskJob
from reconciler.operations.hooks import HookFailedError, VmHooks
from reconciler.operations.ports import BackupHost, VmFilesReader
from reconciler.operations.vmlock import VmBusyError, vm_lock
from reconciler.planning.backup_mode import per_disks, point_mode
from reconciler.repository import Repository, StorageError


def backup_vm(ctx: BackupContext[BackupHost], vm: VmInfo | str) -> VmResult:
    """Back up one VM (as listed, or by display name) to ``ctx.repo`` (the caller holds a shared
    repository lock). Never raises for a VM-level failure: the result says what went wrong; a failed VM
    leaves no restore point. With ``ctx.repo_lock``, the point is written only if the lock is still held."""
    vm_name = vm.name if isinstance(vm, VmInfo) else vm
    started_mono = time.monotonic()
    result = VmResult(vm=vm_name, host=ctx.host.name, policy=ctx.policy.name, ok=False)
    try:
        point = _backup_vm(ctx, vm, result)
    except Exception as exc:
        # Chunks already staged stay until the policy's run ends: other VMs share the repository handle
        # and may have deduplicated against them (backup_policy then discards what is still staged).
        expected = isinstance(exc, EsxiError | BackupError | Cancelled | StorageError)
        result.error = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        result.exception = exc
        if isinstance(exc, Cancelled) or ctx.cancel.is_set():
            # a clean stop (SIGTERM) is not an error: log-based alerts must not fire on it
            ctx.log.info("backup.vm_cancelled", reason=result.error)
        else:
            ctx.log.error("backup.vm_failed", error=result.error, exc_info=not expected)
    else:
        result.ok = result.error is None  # a failing post hook (on_failure: fail) fails the run
        result.point_id = point.id
        result.mode = point.mode
        result.fallback_reason = point.fallback_reason
    finally:
        result.seconds = time.monotonic() - started_mono
    return result


def previous_point(repo: Repository, policy: str, vm: VmInfo, host: str) -> RestorePoint | None:
    """The newest successful point of ``vm`` (same uuid, else same name) of ``policy``."""
    for point in reversed(repo.list_points(policy=policy)):
        if point.status != "success" or point.vm.host != host:
            continue
        if (vm.uuid and point.vm.uuid == vm.uuid) or (not vm.uuid and point.vm.name == vm.name):
            return point
    return None


def _backup_vm(ctx: BackupContext[BackupHost], ref: VmInfo | str, result: VmResult) -> RestorePoint:
    host = ctx.host
    vm = host.vm(ref) if isinstance(ref, VmInfo) else host.find_vm(ref)
    try:
        with vm_lock(host.identity, vm.vmid, ctx.options.lock_dir):
            vm = host.vm(vm)
            foreign = [s.name for s in vm.snapshots if not host.is_ours(s)]
            if foreign:
                raise BackupError(
                    f"VM {vm.name!r} has snapshots that are not ours ({', '.join(map(repr, foreign))}):"
                    " skipped; remove or consolidate them to back it up"
                )
            # we hold the VM's lock, so a snapshot named as ours is an orphan of a killed run
            orphans = [s for s in vm.snapshots if host.is_ours(s)]
            for snap in reversed(orphans):  # children first
                ctx.log.warning("backup.orphaned_snapshot_removed", snapshot=snap.name, snapshot_id=snap.id)
                host.remove_snapshot(vm, snap.id)
            if orphans:
                vm = host.vm(vm)
            # pre hooks before the snapshot, post hooks after it is gone (also on failure)
            hooks = VmHooks(ctx.policy.hooks, policy=ctx.policy.name, host=host.name, vm=vm.name)
            try:
                hooks.pre()
                point = _backup_locked(ctx, vm, result)
            except BaseException as exc:
                hooks.post(ok=False, point_id=None, error=str(exc) or type(exc).__name__)
                if isinstance(exc, HookFailedError):
                    raise BackupError(str(exc)) from None
                raise
            result.error = hooks.post(ok=True, point_id=point.id)  # set: the run failed, the point stays
            return point
    except VmBusyError:
        raise BackupError(f"VM {vm.name!r} is being backed up by another run of this machine") from None


def _backup_locked(ctx: BackupContext[BackupHost], vm: VmInfo, result: VmResult) -> RestorePoint:
    host, repo, policy = ctx.host, ctx.repo, ctx.policy
    started = datetime.now(timezone.utc)
    point_id = new_point_id(started)
    prev = previous_point(repo, policy.name, vm, host.name)
    ctx.log.debug(
        "backup.vm_start", point=point_id, previous=prev.id if prev else None, full=ctx.options.full
    )
    files = _config_files(host, vm)
    ctx.check_cancel()
    records: list[DiskRecord] = []
    with host.backup_snapshot(
        vm, quiesce=policy.quiesce, timeout=policy.snapshot_timeout.total_seconds()
    ) as bs:
        snapshot_time = bs.snapshot.created or datetime.now(timezone.utc)
        ctx.log.debug(
            "backup.snapshot", snapshot=bs.snapshot.name, snapshot_id=bs.snapshot.id, point=point_id
        )
        if ctx.options.on_snapshot is not None:
            ctx.options.on_snapshot(host, bs)
        stored = [repo.write_file(name, data) for name, data in files]
        for disk in bs.disks:
            if not _disk_selected(policy, disk):
                ctx.log.info("backup.disk_excluded", disk=disk.label, node=disk.node)
                continue
            name = posixpath.basename(split_ds_path(disk.descriptor)[1])
            stored.append(repo.write_file(name, disk.descriptor_text.encode("utf-8", "surrogateescape")))
            record, disk_result = DiskJob(ctx, bs, disk, prev).run()
            records.append(record)
            result.disks.append(disk_result)
            ctx.check_cancel()
    # the snapshot is gone and the chain verified: only now does the point become visible
    mode = point_mode(d.mode for d in result.disks)
    reasons = per_disks((d.label, d.fallback_reason) for d in result.disks if d.fallback_reason)
    point = RestorePoint(
        id=point_id,
        policy=policy.name,
        vm=VmRef(vm.name, vm.uuid or "", host.name, vm.vmid),
        started=started,
        snapshot_time=snapshot_time if snapshot_time.tzinfo else snapshot_time.replace(tzinfo=timezone.utc),
        finished=datetime.now(timezone.utc),
        status="success",
        mode=mode,
        config_revision=ctx.revision,
        fallback_reason="; ".join(reasons) or None,
        files=tuple(_dedupe_files(stored)),
        disks=tuple(records),
    )
    if ctx.repo_lock is not None:
        ctx.repo_lock.check()  # a lost lock (e.g. removed as stale) means: write nothing more
    repo.write_point(point)
    ctx.log.info(
        "backup.vm_done",
        point=point.id,
        mode=mode,
        bytes_read=result.bytes_read,
        bytes_sent=result.bytes_sent,
        bytes_stored=result.bytes_stored,
    )
    return point


def _disk_selected(policy: BackupPolicy, disk: FrozenDisk) -> bool:
    ids = [disk.label, posixpath.basename(split_ds_path(disk.descriptor)[1])]
    if disk.node:
        ids.append(disk.node)
    return policy.disks.matches(*ids)


def _config_files(host: VmFilesReader, vm: VmInfo) -> list[tuple[str, bytes]]:
    """The .vmx and .nvram as they are before the snapshot (the .vmx then names the base disks)."""
    files = [(posixpath.basename(split_ds_path(vm.vmx_path)[1]), host.read_file(vm.vmx_path))]
    vmx = host.read_vmx(vm)
    nvram = vmx.get("nvram")
    if nvram:
        ds, rel = split_ds_path(vm.vmx_path)
        path = nvram if nvram.startswith("/") else posixpath.join(posixpath.dirname(rel), nvram)
        ds_path = f"[{ds}] {path}" if not path.startswith("/") else None
        if ds_path is not None and host.file_exists(ds_path):
            files.append((posixpath.basename(path), host.read_file(ds_path)))
    return files


def _dedupe_files(files: Sequence[StoredFile]) -> Iterator[StoredFile]:
    seen = set()
    for f in files:
        if f.name not in seen:
            seen.add(f.name)
            yield f
