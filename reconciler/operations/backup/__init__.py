"""Backing up VMs: one snapshot per VM, read only what changed, store a restore point.

Modules by job:

* :mod:`.policy`: a policy's VMs in parallel within the host's ``concurrent_backups`` and
  ``concurrent_backups_per_datastore`` limits, under a shared repository lock
  (:func:`backup_policy`, the entry point of the ``backup`` verb and of ``apply``).
* :mod:`.vm`: one VM: lock, hooks, snapshot (refused when a foreign snapshot exists, removed on every
  way out), its configuration files and selected disks, the restore point written last
  (:func:`backup_vm`).
* :mod:`.disk`: one disk: the facts for the mode choice, the choice tried (with its run-time
  fallbacks), the read (CBT areas, HTTPS Range reads, the host digest program), the index.
* :mod:`.assembler`: pieces of disk data into whole chunks, patched from the previous point.
* :mod:`.context`: :class:`BackupOptions`, the per-VM :class:`BackupContext` (host, repository,
  policy, options, encode pool, cancel event, repository lock, log) handed down instead of long
  parameter lists, the results and errors.

The per-disk mode (full / CBT incremental / digest-compare incremental) and its reasons are decided by
the pure :func:`reconciler.planning.backup_mode.choose_disk_mode` and recorded in each disk's record
of the point. A repository is opened by :func:`reconciler.operations.repositories.open_repository`.

A failed VM writes no manifest and leaves only garbage for GC. Its staged (unflushed) chunks are dropped
when the policy's run ends, and a run first removes the staged files killed runs left in ``tmp/`` (the
repository's lock rules say whose writer is gone), so a full volume, once space is freed, needs no
cleaning by hand. A volume that refuses writes (full, quota, read-only, permission) fails the VM with
one line naming the repository, the cause and the fix (:class:`~reconciler.repository.StorageError`).
"""

from reconciler.operations.backup.context import (
    BackupContext,
    BackupError,
    BackupOptions,
    Cancelled,
    DiskResult,
    VmResult,
)
from reconciler.operations.backup.policy import backup_policy
from reconciler.operations.backup.vm import backup_vm, previous_point

__all__ = [
    "BackupContext",
    "BackupError",
    "BackupOptions",
    "Cancelled",
    "DiskResult",
    "VmResult",
    "backup_policy",
    "backup_vm",
    "previous_point",
]
