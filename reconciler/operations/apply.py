"""Executing a plan: every action once, in plan order, each with exactly one :class:`Outcome`.

Phases follow the plan (the planner emits them in this order): orphaned snapshots removed, CBT switched,
backups, points pruned, garbage collected, repositories verified, test restores. Consecutive backups
run together: per host in parallel, per policy through :func:`~reconciler.operations.backup.backup_policy`
(which keeps the host's ``concurrent_backups`` and per-datastore limits and the shared repository lock).
Consecutive prunes of one repository are one :func:`~reconciler.operations.prune.prune` call, so its
``max_deletions_per_run`` guard covers the whole run.

Failure handling: transient failures are retried within the apply (:mod:`reconciler.operations.retry`),
terminal ones are not. One failing action never stops unrelated ones, but a host that failed with a
transient error (unreachable, connection lost) after its retries is not asked again in this apply: its
remaining actions are skipped with the reason. A set ``cancel`` event (SIGTERM) makes running backups
unwind (their snapshots removed) and every remaining action is skipped.

Every action is re-checked against reality right before it runs (the plan may be old): a VM in another
power state than planned, a snapshot that appeared, a backup holding the VM — the action is skipped
with the reason rather than done blindly.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import structlog

from reconciler.config.model import DesiredState
from reconciler.esxi.errors import EsxiError, PowerStateTimeoutError
from reconciler.facts.inventory import VmInfo
from reconciler.operations.backup import BackupOptions, Cancelled, VmResult, backup_policy
from reconciler.operations.hosts import HostFactory, connect
from reconciler.operations.ports import ApplyHost, HostSession, VmLookup
from reconciler.operations.prune import PruneResult, collect, prune
from reconciler.operations.repositories import open_repository
from reconciler.operations.retry import Attempted, RetryPolicy, classify
from reconciler.operations.vmlock import VmBusyError, vm_lock
from reconciler.planning.actions import (
    Action,
    CollectGarbage,
    Outcome,
    OutcomeStatus,
    Plan,
    PrunePoint,
    RemoveSnapshot,
    RunBackup,
    RunTestRestore,
    RunVerify,
    SetCbt,
)
from reconciler.repository.errors import LockedError
from reconciler.repository.repo import Repository
from reconciler.rules.schedule import Manual, Schedule, in_window

log = structlog.get_logger(__name__)

OnOutcome = Callable[[Outcome], None]

EXPECTED_POWER = {
    "reconfigure": "poweredOff",
    "reconfigure+stun": "poweredOn",
    "vmx-edit": "poweredOff",
    "power-cycle": "poweredOn",
}
"""The power state each CBT method was planned for; another one at execution time means: re-plan."""


class Skip(Exception):
    """An action's guard said no: the outcome is ``skipped`` with this message."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _host_fault(exc: BaseException | None) -> bool:
    """A transient failure that says the host itself is not answering (not a busy lock)."""
    return exc is not None and not isinstance(exc, LockedError | VmBusyError) and classify(exc) == "transient"


class _Run:
    """The state of one apply: outcomes so far, hosts given up on, open connections, repositories."""

    def __init__(
        self,
        desired: DesiredState,
        cancel: threading.Event,
        on_outcome: OnOutcome | None,
        host_factory: HostFactory[ApplyHost],
        retry: RetryPolicy,
        backup_options: BackupOptions,
        gc_wait_seconds: float,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.desired = desired
        self.clock = clock
        self.cancel = cancel
        self.on_outcome = on_outcome
        self.host_factory = host_factory
        self.retry = retry
        self.backup_options = backup_options
        self.gc_wait_seconds = gc_wait_seconds
        self.outcomes: dict[int, Outcome] = {}
        self.down: dict[str, str] = {}
        self._hosts: dict[str, ApplyHost] = {}
        self._repos: dict[str, Repository] = {}
        self._lock = threading.Lock()

    # -- bookkeeping

    def emit(
        self,
        index: int,
        action: Action,
        status: OutcomeStatus,
        started: datetime,
        *,
        attempts: int = 1,
        error: str | None = None,
        transient: bool = False,
        detail: dict[str, Any] | None = None,
    ) -> None:
        outcome = Outcome(action, status, started, self.clock(), attempts, error, transient, detail or {})
        with self._lock:
            if index in self.outcomes:
                return  # one outcome per action, whatever happens
            self.outcomes[index] = outcome
        log.info(
            "apply.outcome",
            kind=action.kind,
            subject=action.subject,
            status=status,
            attempts=attempts,
            error=error,
            transient=transient,
        )
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception as exc:  # noqa: BLE001  e.g. the status store; the next actions must still run
                log.error("apply.on_outcome_failed", kind=action.kind, subject=action.subject, error=str(exc))

    def skip_reason(self, action: Action) -> str | None:
        """Why ``action`` must not start now (cancelled, its host given up on), or None."""
        if self.cancel.is_set():
            return "cancelled before it started"
        host = action.host
        if host is not None and host in self.down:
            return f"host {host} failed earlier in this run ({self.down[host]}); not retried now"
        return None

    def mark_down(self, host: str | None, exc: BaseException | None, message: str) -> None:
        if host is not None and _host_fault(exc):
            with self._lock:
                self.down.setdefault(host, message)

    def host(self, name: str) -> ApplyHost:
        """A connection to the configured host ``name`` (one per apply, for the sequential phases)."""
        with self._lock:
            if name not in self._hosts:
                try:
                    cfg = self.desired.host(name)
                except KeyError:
                    raise Skip(f"host {name} is not in the configuration any more") from None
                self._hosts[name] = self.host_factory(cfg)
            return self._hosts[name]

    def repository(self, name: str) -> Repository:
        with self._lock:
            if name not in self._repos:
                try:
                    cfg = self.desired.repository(name)
                except KeyError:
                    raise Skip(f"repository {name} is not in the configuration any more") from None
                self._repos[name] = open_repository(cfg)
            return self._repos[name]

    def forget_host(self, name: str) -> None:
        """Drop the connection to ``name`` after a transient failure: a retry connects afresh."""
        with self._lock:
            host = self._hosts.pop(name, None)
        if host is not None:
            _close(host)

    def close(self) -> None:
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            _close(host)

    # -- one action with retries

    def attempt(
        self,
        index: int,
        action: Action,
        fn: Callable[[], dict[str, Any]],
        *,
        attempts: int | None = None,
    ) -> None:
        """Run ``fn`` (returning the outcome's detail) with retries and emit its outcome."""
        started = self.clock()
        reason = self.skip_reason(action)
        if reason is not None:
            self.emit(index, action, "skipped", started, attempts=0, error=reason)
            return

        def once() -> dict[str, Any]:
            try:
                return fn()
            except Exception as exc:
                if action.host is not None and classify(exc) == "transient":
                    self.forget_host(action.host)
                raise

        result: Attempted[dict[str, Any]] = self.retry.call(
            once, cancel=self.cancel, what=f"{action.kind} {action.subject}", attempts=attempts
        )
        if result.error is None:
            self.emit(index, action, "ok", started, attempts=result.attempts, detail=result.value)
        elif isinstance(result.error, Skip):
            self.emit(index, action, "skipped", started, attempts=result.attempts, error=str(result.error))
        else:
            error = _message(result.error)
            self.emit(
                index, action, "failed", started, attempts=result.attempts, error=error,
                transient=result.transient,
            )  # fmt: skip
            self.mark_down(action.host, result.error, error)


def _close(host: HostSession) -> None:
    try:
        host.close()
    except Exception as exc:  # noqa: BLE001  closing a dead connection must not hide the outcomes
        log.debug("apply.close_failed", host=host.name, error=str(exc))


def _message(exc: BaseException) -> str:
    text = str(exc)
    return text if isinstance(exc, EsxiError | Skip | OSError) and text else f"{type(exc).__name__}: {text}"


@contextlib.contextmanager
def _vm_guard(host: HostSession, vmid: str, options: BackupOptions) -> Iterator[None]:
    """Hold a VM's lock for a CBT switch or snapshot removal (a backup holds it for its whole run)."""
    try:
        guard = vm_lock(host.identity, vmid, options.lock_dir)
        guard.__enter__()
    except VmBusyError:
        raise Skip("a backup of this VM is running; try again after it") from None
    try:
        yield
    finally:
        guard.__exit__(None, None, None)


def _current_vm(host: VmLookup, vmid: str, name: str) -> VmInfo:
    """The VM as it is now: by id, checked by name (an id can be reused after re-registration)."""
    try:
        vm = host.vm(vmid)
    except EsxiError:
        vm = None
    if vm is None or vm.name != name:
        try:
            vm = host.find_vm(name)
        except EsxiError:
            raise Skip(f"VM {name!r} is no longer in the host's inventory") from None
    return vm


# -- remove snapshot ---------------------------------------------------------------------------------


def _remove_snapshot(run: _Run, a: RemoveSnapshot) -> dict[str, Any]:
    host = run.host(a.host_name)
    vm = _current_vm(host, a.vmid, a.vm)
    with _vm_guard(host, vm.vmid, run.backup_options):
        vm = host.vm(vm.vmid)
        snap = next((s for s in vm.snapshots if s.id == a.snapshot_id), None)
        if snap is None:
            raise Skip("snapshot no longer exists")
        if not host.is_ours(snap):
            raise Skip(f"snapshot {snap.name!r} is not ours; left alone")
        host.remove_snapshot(vm, snap.id)
    return {"snapshot": a.snapshot_name}


# -- CBT ---------------------------------------------------------------------------------------------


def _set_cbt(run: _Run, a: SetCbt) -> dict[str, Any]:
    host = run.host(a.host_name)
    vm = _current_vm(host, a.vmid, a.vm)
    state = "enabled" if a.enabled else "disabled"
    with _vm_guard(host, vm.vmid, run.backup_options):
        vm = host.vm(vm.vmid)
        if vm.snapshots:
            raise Skip("the VM has snapshots now; CBT is switched only without snapshots")
        if vm.cbt_enabled == a.enabled:
            raise Skip(f"CBT is already {state}")
        expected = EXPECTED_POWER[a.method]
        if vm.power_state != expected:
            raise Skip(f"the VM is {vm.power_state} now, the plan expected {expected}; re-plan")
        if a.method == "power-cycle":
            _power_cycle_allowed(run.desired, a, run.clock())
            _power_cycle(host, vm, a)
        else:
            host.set_cbt(vm, a.enabled)
    return {"cbt": state, "method": a.method}


def _power_cycle_allowed(desired: DesiredState, a: SetCbt, now: datetime) -> None:
    """A saved plan may be applied hours later: the policy must still allow the power cycle, now."""
    policy = desired.policies.get(a.policy)
    if policy is None or not policy.cbt_power_cycle.allowed:
        raise Skip(f"policy {a.policy} does not allow power-cycling VMs (any more)")
    window = Schedule(Manual(), timezone=policy.schedule.timezone, window=policy.cbt_power_cycle.window)
    if not in_window(window, now):
        raise Skip(f"outside the power-cycle window of policy {a.policy}")


def _power_cycle(host: ApplyHost, vm: VmInfo, a: SetCbt) -> None:
    """Guest shutdown (never a forced power-off), switch, and power on again — also when the switch
    fails: the VM must not be left off by us."""
    seconds = a.shutdown_timeout_seconds
    try:
        host.shutdown_guest(vm, timeout=seconds)
    except PowerStateTimeoutError:
        raise EsxiError(f"guest did not shut down in {seconds:.0f}s; CBT unchanged") from None
    except EsxiError as exc:
        if host.vm(vm.vmid).power_state != "poweredOff":
            raise EsxiError(f"guest shutdown refused ({exc}); CBT unchanged") from exc
    failure: BaseException | None = None
    try:
        host.set_cbt(vm, a.enabled)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        try:
            host.power_on(vm, timeout=max(60.0, seconds))
        except Exception as exc:
            if failure is None:
                raise EsxiError(f"CBT switched but powering the VM on again failed: {exc}") from exc
            log.error("apply.power_on_failed", vm=vm.name, error=str(exc))


# -- backups -----------------------------------------------------------------------------------------


def _backups(run: _Run, items: list[tuple[int, RunBackup]]) -> None:
    by_host: dict[str, list[tuple[int, RunBackup]]] = {}
    for index, action in items:
        by_host.setdefault(action.host_name, []).append((index, action))
    if len(by_host) == 1:
        (only,) = by_host.values()
        _host_backups(run, only)
        return
    with concurrent.futures.ThreadPoolExecutor(len(by_host), thread_name_prefix="apply-host") as pool:
        futures = [pool.submit(_host_backups, run, group) for group in by_host.values()]
        try:
            for fut in futures:
                fut.result()
        except BaseException:
            run.cancel.set()  # SIGTERM/SIGINT in the main thread: every host's backups unwind first
            concurrent.futures.wait(futures)
            raise


def _host_backups(run: _Run, items: list[tuple[int, RunBackup]]) -> None:
    groups: dict[tuple[str, bool], list[tuple[int, RunBackup]]] = {}
    for index, action in items:
        groups.setdefault((action.policy, action.full), []).append((index, action))
    for (policy, full), group in groups.items():
        _policy_backups(run, policy, full, group)


class _BackupRound:
    """One call of backup_policy for the VMs still pending: emits outcomes as results arrive and
    collects the VMs whose transient failure earns another try."""

    def __init__(self, run: _Run, pending: dict[str, tuple[int, RunBackup]], tries: int) -> None:
        self.run = run
        self.pending = pending
        self.tries = tries
        self.again: dict[str, tuple[int, RunBackup]] = {}

    def __call__(self, res: VmResult) -> None:
        run, tries = self.run, self.tries
        entry = self.pending.get(res.vm)
        if entry is None:
            return
        index, action = entry
        began = run.clock() - timedelta(seconds=res.seconds)
        if res.ok:
            run.emit(index, action, "ok", began, attempts=tries, detail=_backup_detail(res))
            return
        exc = res.exception
        if isinstance(exc, Cancelled) or (exc is None and run.cancel.is_set()):
            error = "cancelled; the snapshot was removed, no restore point written"
            run.emit(index, action, "skipped", began, attempts=tries, error=error)
            return
        transient = exc is not None and classify(exc) == "transient"
        if transient and tries < run.retry.attempts and not run.cancel.is_set():
            log.warning("apply.retry", what=f"backup {action.subject}", attempt=tries, error=res.error)
            self.again[res.vm] = entry
            return
        detail = {"point_id": res.point_id} if res.point_id else {}
        run.emit(
            index,
            action,
            "failed",
            began,
            attempts=tries,
            error=res.error,
            transient=transient,
            detail=detail,
        )


def _policy_backups(run: _Run, policy: str, full: bool, items: list[tuple[int, RunBackup]]) -> None:
    """Back up the VMs of one policy; VMs failing transiently are tried again (only them)."""
    started = run.clock()
    pending = {a.vm: (i, a) for i, a in items}
    tries = 0
    while pending:
        any_action = next(iter(pending.values()))[1]
        reason = run.skip_reason(any_action)
        if reason is not None:
            for i, a in pending.values():
                run.emit(i, a, "skipped", started, attempts=tries, error=reason)
            return
        tries += 1
        round_ = _BackupRound(run, pending, tries)
        options = replace(run.backup_options, full=full or run.backup_options.full)
        try:
            results = backup_policy(
                run.desired, policy, vms=set(pending), options=options, cancel=run.cancel,
                host_factory=run.host_factory, on_result=round_,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001  the whole run: host unreachable, repository locked or unreadable, ...
            transient = classify(exc) == "transient"
            if transient and tries < run.retry.attempts and not run.cancel.is_set():
                log.warning("apply.retry", what=f"backup policy {policy}", attempt=tries, error=str(exc))
                run.retry.wait(tries, run.cancel)
                continue
            error = _message(exc)
            for i, a in pending.values():
                run.emit(i, a, "failed", started, attempts=tries, error=error, transient=transient)
            run.mark_down(any_action.host, exc, error)
            return
        seen = {r.vm for r in results}
        for name, (i, a) in pending.items():
            if name not in seen:
                run.emit(
                    i, a, "failed", started, attempts=tries,
                    error=f"VM {name!r} is not on host {a.host_name} or not selected by policy {policy}",
                )  # fmt: skip
        faults = [r for r in results if _host_fault(r.exception)]
        if results and len(faults) == len(results) and not round_.again:
            run.mark_down(any_action.host, faults[0].exception, faults[0].error or "")
        pending = round_.again
        if pending:
            run.retry.wait(tries, run.cancel)


def _backup_detail(res: VmResult) -> dict[str, Any]:
    return {
        "point_id": res.point_id,
        "mode": res.mode,
        "bytes_read": res.bytes_read,
        "bytes_sent": res.bytes_sent,
        "bytes_stored": res.bytes_stored,
        "seconds": round(res.seconds, 3),
        "fallback_reason": res.fallback_reason,
        "disks": [
            {
                "label": d.label,
                "mode": d.mode,
                "reasons": list(d.reasons),
                "fallback_reason": d.fallback_reason,
                "capacity": d.capacity,
                "bytes_read": d.bytes_read,
                "bytes_sent": d.bytes_sent,
                "bytes_stored": d.bytes_stored,
                "seconds": round(d.seconds, 3),
            }
            for d in res.disks
        ],
    }


# -- prune and GC ------------------------------------------------------------------------------------


def _prunes(run: _Run, items: list[tuple[int, PrunePoint]]) -> None:
    by_repo: dict[str, list[tuple[int, PrunePoint]]] = {}
    for index, action in items:
        by_repo.setdefault(action.repository, []).append((index, action))
    for name, group in by_repo.items():
        started = run.clock()
        reason = run.skip_reason(group[0][1])
        if reason is None:
            cfg = run.desired.repositories.get(name)
            if cfg is None:
                reason = f"repository {name} is not in the configuration any more"
            elif not cfg.prune.enabled:
                reason = f"pruning is not enabled for repository {name}"
        if reason is not None:
            for i, a in group:
                run.emit(i, a, "skipped", started, attempts=0, error=reason)
            continue
        assert cfg is not None
        max_deletions = cfg.prune.max_deletions_per_run
        ids = [a.point_id for _, a in group]
        result = run.retry.call(
            functools.partial(_prune_repo, run, name, ids, max_deletions),
            cancel=run.cancel,
            what=f"prune {name}",
        )
        if result.error is not None or result.value is None:
            error = _message(result.error) if result.error else "no result"
            status: OutcomeStatus = "skipped" if isinstance(result.error, Skip) else "failed"
            for i, a in group:
                run.emit(
                    i, a, status, started, attempts=result.attempts, error=error, transient=result.transient
                )
            continue
        for (i, a), res in zip(group, result.value, strict=True):
            if res.decision == "deleted":
                run.emit(i, a, "ok", started, attempts=result.attempts, detail={"point_id": a.point_id})
            else:
                run.emit(i, a, "skipped", started, attempts=result.attempts, error=res.reason)


def _prune_repo(run: _Run, name: str, ids: list[str], max_deletions: int) -> list[PruneResult]:
    return prune(run.repository(name), ids, max_deletions=max_deletions)


def _gc(run: _Run, a: CollectGarbage) -> dict[str, Any]:
    result = collect(run.repository(a.repository), wait_seconds=run.gc_wait_seconds, cancel=run.cancel)
    if result.report is None:
        raise Skip(result.deferred or "GC deferred")
    report = result.report
    return {
        "chunks_freed": report.unreferenced_chunks,
        "bytes_freed": report.unreferenced_bytes,
        "indexes_freed": report.unreferenced_indexes,
        "digest_maps_freed": report.unreferenced_digest_maps,
        "tmp_files_freed": report.tmp_files,
        "tmp_bytes_freed": report.tmp_bytes,
        "points": report.points,
        "completed_interrupted_gc": report.interrupted_at.isoformat() if report.interrupted_at else None,
    }


# -- verify and test restore ------------------------------------------------------------------------


class VerifyFailed(Exception):
    """A verification or test restore found problems (terminal: data does not heal by retrying)."""


def _verify(run: _Run, a: RunVerify) -> dict[str, Any]:
    try:
        from reconciler.repository.verify import verify_repository
    except ImportError:  # pragma: no cover - a build without the verify module
        raise Skip("repository verification is not available in this version") from None
    report = verify_repository(
        run.repository(a.repository),
        read_data_percent=a.read_data_percent,
        cancel=run.cancel,
        quarantine=True,
    )
    if report.cancelled:
        raise Skip("cancelled while verifying")
    if not report.ok:
        shown = "; ".join(str(p) for p in report.problems[:5])
        more = f" (+{len(report.problems) - 5} more)" if len(report.problems) > 5 else ""
        raise VerifyFailed(f"repository {a.repository}: {len(report.problems)} problems: {shown}{more}")
    return {
        "points": report.points,
        "chunks": report.chunks,
        "chunks_read": report.chunks_read,
        "bytes_read": report.bytes_read,
    }


def _test_restore(run: _Run, a: RunTestRestore) -> dict[str, Any]:
    try:
        from reconciler.operations.restore import test_restore
    except ImportError:  # pragma: no cover - a build without the restore module
        raise Skip("test restore is not available in this version") from None
    result = test_restore(run.desired, a.repository, a.vm, a.point_id, a.host_name, a.datastore)
    if not result.ok:
        raise VerifyFailed(result.message)
    return {
        "point_id": result.point_id,
        "power_state": result.power_state,
        "heartbeat": result.heartbeat,
        "seconds": round(result.seconds, 1),
    }


# -- the whole plan ----------------------------------------------------------------------------------


def _segments(actions: tuple[Action, ...]) -> Iterator[tuple[str, list[tuple[int, Action]]]]:
    """Runs of consecutive actions of one kind, with their plan indexes."""
    current: list[tuple[int, Action]] = []
    for index, action in enumerate(actions):
        if current and current[-1][1].kind != action.kind:
            yield current[0][1].kind, current
            current = []
        current.append((index, action))
    if current:
        yield current[0][1].kind, current


def apply(  # noqa: PLR0913  the entry point: the plan plus keyword-only hooks (cancel, on_outcome, host factory, retry) the callers set
    plan: Plan,
    desired: DesiredState,
    *,
    cancel: threading.Event,
    on_outcome: OnOutcome | None = None,
    host_factory: HostFactory[ApplyHost] = connect,
    retry: RetryPolicy | None = None,
    backup_options: BackupOptions | None = None,
    gc_wait_seconds: float = 300.0,
    clock: Callable[[], datetime] = _now,
) -> list[Outcome]:
    """Execute ``plan`` against reality as configured in ``desired``; one outcome per action, in plan
    order (``on_outcome`` gets each as soon as it is known). Never raises for an action's failure;
    :class:`KeyboardInterrupt` sets ``cancel`` and, once running backups have unwound, propagates.

    ``clock`` is the time schedules live in: outcome times (which become the run history the next plan
    reads) and the power-cycle window check use it; the daemon passes its own clock."""
    run = _Run(
        desired, cancel, on_outcome, host_factory, retry or RetryPolicy(), backup_options or BackupOptions(),
        gc_wait_seconds, clock,
    )  # fmt: skip
    log.debug(
        "apply.start", actions=len(plan.actions), revision=plan.revision
    )  # each apply.outcome says more
    running: set[int] = set()
    try:
        for kind, items in _segments(plan.actions):
            if kind == RunBackup.kind:
                _backups(run, [(i, a) for i, a in items if isinstance(a, RunBackup)])
            elif kind == PrunePoint.kind:
                _prunes(run, [(i, a) for i, a in items if isinstance(a, PrunePoint)])
            else:
                for index, action in items:
                    running.add(index)
                    _one(run, index, action)
                    running.discard(index)
    except BaseException:
        cancel.set()
        raise
    finally:
        run.close()
        for index, action in enumerate(plan.actions):  # every action gets its outcome, also on the way out
            if index not in run.outcomes:
                why = "interrupted while running" if index in running else "cancelled before it started"
                run.emit(index, action, "skipped", run.clock(), attempts=0, error=why)
    outcomes = [run.outcomes[i] for i in range(len(plan.actions))]
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("ok", "failed", "skipped")}
    log.debug("apply.done", **counts)  # the caller's summary (cycle.done, apply's last line) says it
    return outcomes


def _one(run: _Run, index: int, action: Action) -> None:
    if isinstance(action, RemoveSnapshot):
        run.attempt(index, action, lambda: _remove_snapshot(run, action))
    elif isinstance(action, SetCbt):
        # a power cycle is not repeated automatically: one guest shutdown per apply is disruptive enough
        once = 1 if action.method == "power-cycle" else None
        run.attempt(index, action, lambda: _set_cbt(run, action), attempts=once)
    elif isinstance(action, CollectGarbage):
        run.attempt(index, action, lambda: _gc(run, action), attempts=1)
    elif isinstance(action, RunVerify):
        run.attempt(index, action, lambda: _verify(run, action))
    elif isinstance(action, RunTestRestore):
        run.attempt(index, action, lambda: _test_restore(run, action))
    else:
        run.emit(
            index, action, "skipped", run.clock(), attempts=0, error=f"unknown action kind {action.kind!r}"
        )
