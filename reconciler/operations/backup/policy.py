"""A policy's backup: its VMs in parallel within the host's limits, under a shared repository lock.

VMs run at most ``concurrent_backups`` at once, and at most ``concurrent_backups_per_datastore`` on
any datastore a VM's files live on (:class:`DatastoreLimits`). Each VM gets its own host connection
and :class:`BackupContext`; the repository handle, the encode pool, the cancel event and the lock are
shared. A ``cancel`` event (set by the CLI on SIGTERM/SIGINT) makes every pipeline raise
:class:`Cancelled`, so snapshots are removed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Collection, Iterable, Iterator

import structlog

from reconciler.config.model import BackupPolicy, DesiredState, Host
from reconciler.facts.inventory import VmInfo, split_ds_path
from reconciler.operations.backup.context import (
    BackupContext,
    BackupError,
    BackupOptions,
    Cancelled,
    VmResult,
)
from reconciler.operations.backup.vm import backup_vm
from reconciler.operations.hosts import HostFactory, connect
from reconciler.operations.ports import BackupHost
from reconciler.operations.repositories import open_repository
from reconciler.repository import Repository

log = structlog.get_logger(__name__)


class DatastoreLimits:
    """Per-datastore semaphores of one host: a VM holds one slot on each datastore it lives on."""

    def __init__(self, per_datastore: int) -> None:
        self.per_datastore = max(1, per_datastore)
        self._sems: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, datastores: Iterable[str], cancel: threading.Event) -> Iterator[None]:
        with self._lock:
            sems = [
                self._sems.setdefault(ds, threading.BoundedSemaphore(self.per_datastore))
                for ds in sorted(set(datastores))
            ]
        taken: list[threading.BoundedSemaphore] = []
        try:
            for sem in sems:  # sorted order: no deadlock between VMs spanning datastores
                while not sem.acquire(timeout=0.5):
                    if cancel.is_set():
                        raise Cancelled("backup cancelled")
                taken.append(sem)
            yield
        finally:
            for sem in reversed(taken):
                sem.release()


def backup_policy(
    desired: DesiredState,
    policy_name: str,
    *,
    vm: str | None = None,
    vms: Collection[str] | None = None,
    options: BackupOptions | None = None,
    cancel: threading.Event | None = None,
    host_factory: HostFactory[BackupHost] = connect,
    on_result: Callable[[VmResult], None] | None = None,
) -> list[VmResult]:
    """Back up the VMs of a policy (or only ``vm``, or only those of ``vms`` the policy selects and the
    host has: the others are simply not in the results), several at once within the host's limits.

    Raises :class:`BackupError` for problems of the whole run (unknown policy or VM, repository);
    per-VM failures are in the results.
    """
    options = options or BackupOptions()
    cancel = cancel or threading.Event()
    try:
        policy = desired.policy(policy_name)
    except KeyError:
        raise BackupError(f"no backup policy named {policy_name!r}") from None
    host_cfg = desired.host(policy.host)
    # The repository's key derivation (Argon2id, CPU) runs while the host is logged in to and listed
    # (network): a small incremental's fixed cost is the longer of the two, not their sum.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="repo-open") as opener:
        opening = opener.submit(open_repository, desired.repository(policy.repository))
        try:
            inventory_host = host_factory(host_cfg)
            try:
                inventory = inventory_host.list_vms()
            except BaseException:
                inventory_host.close()
                raise
        except BaseException:
            opening.result()  # a repository error is the one to tell, as when it was opened first
            raise
        try:
            repo = opening.result()
        except BaseException:
            inventory_host.close()
            raise
    # The inventory's connection serves the first VM (one login fewer); the others get their own.
    spare: list[BackupHost] = [inventory_host]
    spare_lock = threading.Lock()

    def host_for_vm() -> BackupHost:
        with spare_lock:
            if spare:
                return spare.pop()
        return host_factory(host_cfg)

    try:
        return _backup_selected(
            desired, policy_name, policy, host_cfg, repo, inventory, host_for_vm,
            vm=vm, vms=vms, options=options, cancel=cancel, on_result=on_result,
        )  # fmt: skip
    finally:
        for unused in spare:
            unused.close()


def _backup_selected(  # noqa: PLR0913  called once, by backup_policy, with what it opened; it builds the BackupContext the VMs get
    desired: DesiredState,
    policy_name: str,
    policy: BackupPolicy,
    host_cfg: Host,
    repo: Repository,
    inventory: list[VmInfo],
    host_for_vm: Callable[[], BackupHost],
    *,
    vm: str | None,
    vms: Collection[str] | None,
    options: BackupOptions,
    cancel: threading.Event,
    on_result: Callable[[VmResult], None] | None,
) -> list[VmResult]:
    selected = [v for v in inventory if policy.vms.matches(v.name)]
    if vms is not None:
        wanted = set(vms)
        selected = [v for v in selected if v.name in wanted]
    if vm is not None:
        selected = [v for v in selected if v.name == vm]
        if not selected:
            known = vm in {v.name for v in inventory}
            raise BackupError(
                f"VM {vm!r} is not selected by policy {policy_name!r}"
                if known
                else f"no VM named {vm!r} on host {host_cfg.name}"
            )
    if not selected:
        log.warning("backup.no_vms", policy=policy_name)
        return []
    limits = DatastoreLimits(host_cfg.limits.concurrent_backups_per_datastore)
    results: list[VmResult] = []
    log.debug("backup.policy_start", policy=policy_name, vms=[v.name for v in selected])

    def one(info: VmInfo) -> VmResult:
        datastores = {info.datastore} | {split_ds_path(d.file)[0] for d in info.disks}
        try:
            with limits.hold(datastores, cancel), host_for_vm() as host:
                ctx = BackupContext(
                    host=host,
                    repo=repo,
                    policy=policy,
                    revision=desired.revision.id,
                    options=options,
                    pool=encode_pool,
                    cancel=cancel,
                    repo_lock=repo_lock,
                    log=log.bind(vm=info.name, host=host.name, policy=policy.name),
                )
                return backup_vm(ctx, info)
        except Cancelled as exc:
            return VmResult(info.name, host_cfg.name, policy.name, False, error=str(exc), exception=exc)
        except Exception as exc:  # noqa: BLE001  one VM's failure (login refused, host gone, a bug) is its result; the other VMs still run
            if cancel.is_set():
                log.info("backup.vm_cancelled", vm=info.name, reason=str(exc))
            else:
                log.error("backup.vm_failed", vm=info.name, error=str(exc))
            return VmResult(info.name, host_cfg.name, policy.name, False, error=str(exc), exception=exc)

    # what killed runs left in tmp/ goes first: on a full volume it is what makes room for the lock file
    stale = repo.remove_stale_staged()
    if stale:
        log.info(
            "backup.stale_staged_removed",
            repository=policy.repository,
            files=len(stale),
            bytes=sum(f.size for f in stale),
        )
    with (
        repo.lock(purpose=f"backup {policy_name}") as repo_lock,
        # exited after the pools: every point written flushed what was staged before it, so what is
        # still staged then belongs to failed VMs only, and goes rather than wait in tmp/ for GC
        repo.discard_pending_on_exit(),
        concurrent.futures.ThreadPoolExecutor(options.workers, thread_name_prefix="encode") as encode_pool,
        concurrent.futures.ThreadPoolExecutor(
            max(1, host_cfg.limits.concurrent_backups), thread_name_prefix="vm"
        ) as vm_pool,
    ):
        futures = [vm_pool.submit(one, v) for v in selected]
        try:
            for fut in concurrent.futures.as_completed(futures):
                res = fut.result()
                results.append(res)
                if on_result is not None:
                    on_result(res)
        except BaseException:
            cancel.set()  # SIGTERM/SIGINT in the main thread: every VM unwinds, snapshots are removed
            concurrent.futures.wait(futures)
            raise
    order = {v.name: i for i, v in enumerate(selected)}
    return sorted(results, key=lambda r: order.get(r.vm, 0))
