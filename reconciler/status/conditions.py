"""Conditions: per object (config, host, VM, policy, repository) one of Ready / Reconciling / Stalled.

Derived in one place, :func:`derive_conditions`, from what one daemon cycle knew: the desired state, the
observed state, the plan, the outcomes applied so far and the run history. Pure: no I/O, so every rule
is tested with plain values, and ``status`` shows exactly what the daemon concluded.

Meaning (as Flux uses them): **Ready** nothing to do; **Reconciling** work is due or running and will
finish by itself; **Stalled** it will not progress without a person or a retry later (host unreachable,
a backup failed, an invalid config), with the reason and when it is tried again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from reconciler.config.errors import ConfigIssue
from reconciler.config.model import BackupPolicy, DesiredState
from reconciler.planning.actions import Action, Notice, Outcome, Plan, RunCopy
from reconciler.planning.observed import ObservedState, RunRecord, backup_key, verify_key
from reconciler.rules import schedule

ConditionStatus = Literal["Ready", "Reconciling", "Stalled"]
ObjectKind = Literal["source", "config", "host", "vm", "policy", "repository"]
KIND_ORDER: tuple[ObjectKind, ...] = ("source", "config", "host", "repository", "policy", "vm")
DAEMON_KINDS: tuple[ObjectKind, ...] = ("source", "config")
"""Conditions the daemon's loop sets itself (the git source, the config); a cycle replacing the others
keeps them."""
CONFIG_NAME = "config"
"""The name of the single ``config`` object."""


@dataclass(frozen=True)
class Condition:
    """The state of one object. VM names are ``<host>/<vm>``."""

    kind: ObjectKind
    name: str
    status: ConditionStatus
    reason: str
    message: str
    last_success: datetime | None = None
    next_due: datetime | None = None
    revision: str | None = None
    updated: datetime | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.name)

    def to_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "kind": self.kind,
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "last_success": iso(self.last_success),
            "next_due": iso(self.next_due),
            "revision": self.revision,
            "updated": iso(self.updated),
        }


OVERWRITE_UNFINISHED = "OverwriteUnfinished"
"""A ``restore --overwrite`` of the VM was killed: the VM is powered off until it is run again or
given up (``--abort``); the message says both commands."""

# Reasons, by action kind: (while due or running, after a failure).
_REASONS: dict[str, tuple[str, str]] = {
    "backup": ("BackupDue", "BackupFailed"),
    "copy": ("CopyDue", "CopyFailed"),
    "cbt": ("CbtChange", "CbtFailed"),
    "remove-snapshot": ("SnapshotCleanup", "SnapshotCleanupFailed"),
    "prune": ("Pruning", "PruneFailed"),
    "gc": ("CollectingGarbage", "GarbageCollectionFailed"),
    "verify": ("VerifyDue", "VerifyFailed"),
    "test-restore": ("TestRestoreDue", "TestRestoreFailed"),
}


def config_condition(
    now: datetime,
    *,
    revision: str | None = None,
    issues: Sequence[ConfigIssue] = (),
    desired: DesiredState | None = None,
) -> Condition:
    """Ready with the loaded revision (and what ``desired`` declares), or Stalled ``InvalidConfig`` naming
    the first problem (``file:line:column field: message``) and how many more there are."""
    if issues:
        more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
        return Condition(
            "config",
            CONFIG_NAME,
            "Stalled",
            "InvalidConfig",
            f"{issues[0]}{more}",
            revision=revision,
            updated=now,
        )
    return Condition(
        "config", CONFIG_NAME, "Ready", "Loaded", _declares(desired), revision=revision, updated=now
    )


def _declares(desired: DesiredState | None) -> str:
    if desired is None:
        return "loaded"
    counts: tuple[tuple[int, str, str], ...] = (
        (len(desired.hosts), "host", "hosts"),
        (len(desired.repositories), "repository", "repositories"),
        (len(desired.policies), "backup policy", "backup policies"),
        (len(desired.verify_policies), "verify policy", "verify policies"),
    )
    if desired.copy_policies:
        counts += ((len(desired.copy_policies), "copy policy", "copy policies"),)
    return ", ".join(_count(n, one, many) for n, one, many in counts)


def _owner(action: Action) -> tuple[ObjectKind, str]:
    """The object an action's progress and failure show on."""
    vm = getattr(action, "vm", None)
    host = getattr(action, "host_name", None)
    if action.kind in ("backup", "cbt", "remove-snapshot") and host and vm:
        return ("vm", f"{host}/{vm}")
    if isinstance(action, RunCopy):
        return ("repository", action.destination)
    return ("repository", str(getattr(action, "repository", action.subject)))


def _latest(values: Iterable[datetime | None]) -> datetime | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _earliest(values: Iterable[datetime | None]) -> datetime | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _failure_text(record: RunRecord) -> str:
    retry = f"; retry after {record.retry_after:%Y-%m-%d %H:%M}Z" if record.retry_after else ""
    return f"{record.last_error or 'failed'}{retry}"


class _Deriver:
    """The state of one derivation (kept in an object so the rules below stay short)."""

    def __init__(
        self,
        desired: DesiredState,
        observed: ObservedState,
        plan: Plan | None,
        outcomes: Sequence[Outcome] | None,
        history: Mapping[str, RunRecord],
    ) -> None:
        self.desired = desired
        self.observed = observed
        self.now = observed.time
        self.history = history
        self.revision = desired.revision.id
        done = {o.action for o in outcomes or ()}
        self.succeeded = [o for o in outcomes or () if o.ok]
        self.failed: dict[tuple[str, str], list[Outcome]] = {}
        for outcome in outcomes or ():
            if outcome.status == "failed":
                self.failed.setdefault(_owner(outcome.action), []).append(outcome)
        self.pending: dict[tuple[str, str], list[Action]] = {}
        self.pending_policies: set[str] = set()
        for action in plan.actions if plan else ():
            if action in done:
                continue
            self.pending.setdefault(_owner(action), []).append(action)
            policy = getattr(action, "policy", None)
            if action.kind == "backup" and policy:
                self.pending_policies.add(str(policy))
        self.notices: dict[str, list[Notice]] = {}
        for notice in plan.notices if plan else ():
            self.notices.setdefault(notice.subject, []).append(notice)

    def make(
        self,
        kind: ObjectKind,
        name: str,
        status: ConditionStatus,
        reason: str,
        message: str,
        last_success: datetime | None = None,
        next_due: datetime | None = None,
    ) -> Condition:
        return Condition(kind, name, status, reason, message, last_success, next_due, self.revision, self.now)

    def activity(self, kind: ObjectKind, name: str, base: Condition, subject: str | None = None) -> Condition:
        """``base`` overridden by failed outcomes (Stalled), due actions (Reconciling) or notices."""
        failed = self.failed.get((kind, name))
        if failed:
            first = failed[0]
            reason = _REASONS.get(first.action.kind, ("", "ActionFailed"))[1]
            return replace(base, status="Stalled", reason=reason, message=first.error or "failed")
        if base.status == "Stalled":
            return base
        pending = self.pending.get((kind, name))
        if pending:
            reason = _REASONS.get(pending[0].kind, ("Reconciling", ""))[0]
            more = f" (+{len(pending) - 1} more)" if len(pending) > 1 else ""
            return replace(base, status="Reconciling", reason=reason, message=pending[0].reason + more)
        for notice in self.notices.get(subject or name, ()):
            if notice.level == "warning":
                return replace(base, status="Stalled", reason="NeedsAttention", message=notice.message)
            if notice.level == "pending":
                return replace(base, status="Reconciling", reason="Pending", message=notice.message)
        return base

    # -- objects ---------------------------------------------------------------------------------

    def hosts(self) -> list[Condition]:
        out = []
        for name in self.desired.hosts:
            seen = self.observed.hosts.get(name)
            if seen is None:
                out.append(self.make("host", name, "Reconciling", "NotObserved", "not observed yet"))
            elif not seen.reachable:
                out.append(self.make("host", name, "Stalled", "HostUnreachable", seen.error or "unreachable"))
            else:
                licence = {"free": "free licence", "licensed": "licensed"}.get(
                    seen.license or "", "licence unknown"
                )
                message = f"{_count(len(seen.vms), 'VM', 'VMs')}, {licence}"
                out.append(
                    self.activity("host", name, self.make("host", name, "Ready", "Reachable", message))
                )
        return out

    def vm_names(self, host: str) -> list[str]:
        """VMs of ``host`` protected by some policy: from the inventory, else from the run history."""
        seen = self.observed.hosts.get(host)
        names: list[str] = []
        if seen is not None and seen.reachable:
            names = [vm.name for vm in seen.vms if self.desired.policies_for_vm(host, vm.name)]
        else:
            for key in self.history:
                parts = key.split("/", 3)
                if len(parts) == 4 and parts[0] == "backup" and parts[2] == host and parts[3] not in names:
                    names.append(parts[3])
        return names

    def policy_next_due(self, policy: BackupPolicy, vm: str, record: RunRecord) -> datetime | None:
        if policy.suspend:
            return None
        upstream = {
            name: when
            for name in self.desired.policies
            if (
                when := _latest(
                    r.last_succeeded for k, r in self.history.items() if k.startswith(f"backup/{name}/")
                )
            )
        }
        repo = self.observed.repositories.get(policy.repository)
        points = repo.points if repo is not None else ()
        last_started = _latest(
            [
                record.last_started,
                *(
                    p.started
                    for p in points
                    if p.policy == policy.name and p.vm.host == policy.host and p.vm.name == vm
                ),
            ]
        )
        try:
            due = schedule.next_due(
                policy.schedule, self.now, last_started, upstream, jitter_key=f"{policy.name}/{vm}"
            )
        except ValueError:
            return None
        if due is not None and record.retry_after is not None and record.consecutive_failures:
            return max(due, record.retry_after)
        return due

    def vms(self) -> list[Condition]:
        out = []
        for host in self.desired.hosts:
            seen = self.observed.hosts.get(host)
            overwrites = dict(seen.unfinished_overwrites) if seen is not None and seen.reachable else {}
            protected = self.vm_names(host)
            for vm in protected:
                name = f"{host}/{vm}"
                policies = self.desired.policies_for_vm(host, vm)
                records = {
                    p.name: self.history.get(backup_key(p.name, host, vm)) or RunRecord() for p in policies
                }
                last_success = _latest(r.last_succeeded for r in records.values())
                next_due = _earliest(self.policy_next_due(p, vm, records[p.name]) for p in policies)
                if vm in overwrites:
                    base = self.make(
                        "vm", name, "Stalled", OVERWRITE_UNFINISHED, overwrites[vm], last_success, next_due
                    )
                elif seen is not None and not seen.reachable:
                    base = self.make(
                        "vm",
                        name,
                        "Stalled",
                        "HostUnreachable",
                        f"host {host}: {seen.error}",
                        last_success,
                        next_due,
                    )
                else:
                    failing = [(n, r) for n, r in records.items() if r.consecutive_failures]
                    if failing:
                        failed_policy, record = failing[0]
                        base = self.make(
                            "vm",
                            name,
                            "Stalled",
                            "BackupFailed",
                            f"{failed_policy}: {_failure_text(record)}",
                            last_success,
                            next_due,
                        )
                    else:
                        message = (
                            f"backed up under {', '.join(records)}" if last_success else "not backed up yet"
                        )
                        base = self.make("vm", name, "Ready", "UpToDate", message, last_success, next_due)
                out.append(self.activity("vm", name, base))
            for vm, notice in overwrites.items():
                if vm not in protected:  # restored over by hand: no policy names it, the host has it
                    out.append(self.make("vm", f"{host}/{vm}", "Stalled", OVERWRITE_UNFINISHED, notice))
            if seen is not None and seen.reachable:
                present = {vm.name for vm in seen.vms}
                for policy in self.desired.policies.values():
                    if policy.host != host:
                        continue
                    for vm in policy.vms.names:
                        if vm not in present:
                            out.append(
                                self.make(
                                    "vm",
                                    f"{host}/{vm}",
                                    "Stalled",
                                    "VmNotFound",
                                    f"policy {policy.name} names it; not in the host's inventory",
                                )
                            )
        return out

    def policies(self) -> list[Condition]:
        out = []
        for policy in self.desired.policies.values():
            prefix = f"backup/{policy.name}/{policy.host}/"
            records = {k[len(prefix) :]: r for k, r in self.history.items() if k.startswith(prefix)}
            last_success = _latest(r.last_succeeded for r in records.values())
            failing = sorted(vm for vm, r in records.items() if r.consecutive_failures)
            if policy.suspend:
                base = self.make("policy", policy.name, "Ready", "Suspended", "suspended", last_success)
            elif failing:
                record = records[failing[0]]
                message = f"{len(failing)} VM(s) failing: {policy.host}/{failing[0]}: {_failure_text(record)}"
                base = self.make(
                    "policy",
                    policy.name,
                    "Stalled",
                    "BackupFailed",
                    message,
                    last_success,
                    record.retry_after,
                )
            elif policy.name in self.pending_policies:
                base = self.make(
                    "policy", policy.name, "Reconciling", "BackupDue", "backups due or running", last_success
                )
            else:
                base = self.make(
                    "policy",
                    policy.name,
                    "Ready",
                    "UpToDate",
                    schedule.describe(policy.schedule),
                    last_success,
                )
            out.append(self.activity("policy", policy.name, base, f"policy {policy.name}"))
        for verify in self.desired.verify_policies.values():
            record = self.history.get(verify_key(verify.name)) or RunRecord()
            if verify.suspend:
                base = self.make(
                    "policy", verify.name, "Ready", "Suspended", "suspended", record.last_succeeded
                )
            elif record.consecutive_failures:
                base = self.make(
                    "policy",
                    verify.name,
                    "Stalled",
                    "VerifyFailed",
                    _failure_text(record),
                    record.last_succeeded,
                    record.retry_after,
                )
            else:
                base = self.make(
                    "policy",
                    verify.name,
                    "Ready",
                    "UpToDate",
                    f"verifies {verify.repository}: {schedule.describe(verify.schedule)}",
                    record.last_succeeded,
                )
            out.append(self.activity("policy", verify.name, base, f"verify {verify.name}"))
        return out

    def repositories(self) -> list[Condition]:
        out = []
        for name in self.desired.repositories:
            seen = self.observed.repositories.get(name)
            if seen is None:
                base = self.make("repository", name, "Ready", "NotUsed", "no policy reads or writes it")
            elif not seen.reachable:
                base = self.make(
                    "repository", name, "Stalled", "RepositoryUnreachable", seen.error or "unreachable"
                )
            else:
                # The observation predates this cycle's backups: count those written since.
                new = [o for o in self.succeeded if getattr(o.action, "repository", None) == name]
                new = [o for o in new if o.action.kind == "backup"]
                latest = _latest([*(p.finished for p in seen.points), *(o.finished for o in new)])
                message = _count(len(seen.points) + len(new), "restore point", "restore points")
                base = self.make("repository", name, "Ready", "Reachable", message, latest)
            out.append(self.activity("repository", name, base))
        return out


def derive_conditions(
    desired: DesiredState,
    observed: ObservedState,
    *,
    plan: Plan | None = None,
    outcomes: Sequence[Outcome] | None = None,
    history: Mapping[str, RunRecord] | None = None,
) -> list[Condition]:
    """Every object's condition after observing (``outcomes`` None: the plan's actions are still due,
    so they show as Reconciling) or after applying (``outcomes``: what became of each action; actions
    without an outcome were not reached and stay Reconciling). ``history`` should already include the
    outcomes (the store records them first); default: the observed history. Sorted by kind, then name.
    The ``config`` condition is not included (see :func:`config_condition`)."""
    deriver = _Deriver(desired, observed, plan, outcomes, observed.history if history is None else history)
    conditions = [*deriver.hosts(), *deriver.repositories(), *deriver.policies(), *deriver.vms()]
    return sort_conditions(conditions)


def sort_conditions(conditions: Iterable[Condition]) -> list[Condition]:
    """By kind (source, config, host, repository, policy, vm), then name."""
    return sorted(conditions, key=lambda c: (KIND_ORDER.index(c.kind), c.name))
