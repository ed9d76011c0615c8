"""What a backup works with and what it returns: options, the per-VM context, results, errors."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import structlog

from reconciler.config.model import BackupPolicy
from reconciler.esxi.hostdigest import check_algorithm
from reconciler.facts.inventory import BackupSnapshot, FrozenDisk
from reconciler.facts.points import BackupMode
from reconciler.operations.ports import BackupHost, DiskSource
from reconciler.operations.progress import Progress
from reconciler.repository import Repository, RepositoryLock

OnSnapshot = Callable[[BackupHost, BackupSnapshot], None]
OnData = Callable[[FrozenDisk, int, int], None]


class Cancelled(Exception):
    """The run was asked to stop (SIGTERM/SIGINT); the snapshot is removed on the way out."""


class BackupError(Exception):
    """A VM could not be backed up for a reason worth a clear message (not a bug)."""


@dataclass(frozen=True)
class BackupOptions:
    """How to run; the defaults suit production. ``on_snapshot`` and ``on_data`` are test seams."""

    full: bool = False
    transport: str = "auto"
    streams: int = 4
    digest_streams: int = 2
    """Parallel on-host digest programs (block ranges, one SSH connection each) for a large disk: one
    program is bound by one host core; bench/backup.py measured the free-host incremental 1.7x faster
    with 2 than with 1 (2-core machine), and the full read slightly faster."""
    workers: int = max(2, os.cpu_count() or 2)
    progress: Progress | None = None
    on_snapshot: OnSnapshot | None = None
    """Called with the host and the snapshot once it exists, before any disk is read."""
    on_data: OnData | None = None
    """Called for every piece of disk data received: (disk, offset, length)."""
    lock_dir: Path | None = None
    """Where the per-VM locks live (default: :func:`reconciler.operations.vmlock.default_lock_dir`)."""
    digest_algorithm: str | None = None
    """The digest algorithm of a new digest chain (a full read on a free host), one of
    :data:`reconciler.esxi.hostdigest.ALGORITHMS`; None: the host measures which it computes faster.
    An incremental always continues with its previous map's algorithm."""

    def __post_init__(self) -> None:
        if self.digest_algorithm is not None:
            check_algorithm(self.digest_algorithm)


HostT_co = TypeVar("HostT_co", bound=DiskSource, covariant=True)
"""What the backup needs of the host: a :class:`BackupHost` for a VM, a :class:`DiskSource` for a disk."""


@dataclass(frozen=True)
class BackupContext(Generic[HostT_co]):
    """Everything one VM's backup works with, handed down (VM → disk) instead of long parameter lists.

    The policy's run builds one per VM (:func:`reconciler.operations.backup.policy.backup_policy`):
    the VM's own host connection, the shared repository, encode pool, cancel event and lock. A VM's
    backup takes a ``BackupContext[BackupHost]``, one disk's a ``BackupContext[DiskSource]``."""

    host: HostT_co
    repo: Repository
    policy: BackupPolicy
    revision: str
    """The config revision recorded in the point."""
    options: BackupOptions
    pool: concurrent.futures.Executor
    """Hashes, compresses, encrypts and stores chunks (shared by the policy's VMs)."""
    cancel: threading.Event
    """Set on SIGTERM/SIGINT: every pipeline raises :class:`Cancelled`, so snapshots are removed."""
    repo_lock: RepositoryLock | None = None
    """The shared repository lock: the point is written only if it is still held."""
    log: structlog.typing.FilteringBoundLogger = field(
        default_factory=lambda: structlog.get_logger("reconciler.operations.backup")
    )

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("backup cancelled")


@dataclass
class DiskResult:
    key: int
    label: str
    mode: BackupMode
    fallback_reason: str | None
    capacity: int
    bytes_read: int
    """Bytes the host read from its disk (the digest program reads every allocated block)."""
    bytes_sent: int
    """Bytes that crossed the network (data plus protocol; for the digest path both directions)."""
    bytes_stored: int
    """Bytes newly added to the repository (after dedup, compression, encryption)."""
    seconds: float
    reasons: tuple[str, ...] = ()
    """Why this mode (:func:`reconciler.planning.backup_mode.choose_disk_mode`)."""


@dataclass
class VmResult:
    """The outcome of one VM's backup (``point_id`` is None when it failed)."""

    vm: str
    host: str
    policy: str
    ok: bool
    point_id: str | None = None
    mode: BackupMode | None = None
    fallback_reason: str | None = None
    error: str | None = None
    seconds: float = 0.0
    disks: list[DiskResult] = field(default_factory=list)
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    """What made it fail, for callers that classify failures (retry: transient or terminal)."""

    @property
    def bytes_read(self) -> int:
        return sum(d.bytes_read for d in self.disks)

    @property
    def bytes_sent(self) -> int:
        return sum(d.bytes_sent for d in self.disks)

    @property
    def bytes_stored(self) -> int:
        return sum(d.bytes_stored for d in self.disks)
