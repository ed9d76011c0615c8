"""The planner: desired state + observed state -> an ordered :class:`Plan`. Pure: no I/O, no clock.

``now`` is ``observed.time``; the same inputs always give the same plan, which is what makes a printed
plan reviewable and a saved plan re-checkable. The rules (the README's "What the plan does" is written
from them):

Hosts and repositories
  * A host that is unreachable (or was not observed): one warning per active policy of the host; no
    action touches the host. Other hosts are planned normally. A repository that is unreachable: a
    warning per active policy writing to it, and no backup, prune or verification of it.
  * A policy or verify policy with ``suspend: true`` plans nothing.

Snapshots
  * A snapshot named as ours (the host's snapshot prefix) on any VM is an orphan of an interrupted run:
    ``RemoveSnapshot``, first in the plan. (The executor takes the VM's lock first, so the snapshot of a
    backup running right now in another process on this machine is left alone.)
  * Any other (foreign) snapshot on a selected VM: a warning, and no backup and no CBT change of it.

CBT (per VM selected by an active policy whose ``cbt`` is not ``unmanaged``)
  * Two policies wanting different CBT states for one VM: a warning, no action.
  * Licensed host: ``reconfigure`` (VM off) or ``reconfigure+stun`` (VM running: ReconfigVM then a
    snapshot create + remove so the running VM picks it up).
  * Free host: the ``.vmx`` is edited over SSH, which needs SSH (else a warning) and the VM off:
    ``vmx-edit`` when it is off; when it runs, ``power-cycle`` if the policy allows it and its
    power-cycle window is open now, else a *pending* notice (applied as soon as the VM is seen off).
  * Free host with CBT desired on: an info notice that incrementals use the on-host digest compare,
    because the licence refuses the changed-block API.

Backups (per active policy, per selected VM present on the host)
  * Due by :func:`reconciler.rules.schedule.due` with ``last_started`` = the later of the run history
    and the newest restore point of (policy, VM) on that host; missed runs collapse into one; windows and
    jitter (key ``<policy>/<vm>``) are honoured; ``after`` chains use the upstream policy's newest
    successful point (or its recorded success).
  * A job with failures is held back until its ``retry_after`` (a warning says why), then retried even
    when the schedule alone would wait for the next fire time, but never outside its window.
  * A datastore of the VM below the host's free-space floor, or inaccessible: a warning, no backup.
  * A name in ``vms.names`` missing from the inventory: a warning; a policy selecting no VM: a warning.

Prune (per reachable repository)
  * Points are grouped by (policy, VM uuid); each group of an active policy that writes to this
    repository is evaluated with the policy's retention; expired points become ``PrunePoint``.
    Points of a policy no longer configured (or now writing elsewhere) are never pruned (info notice).
  * ``prune.enabled: false``: nothing is pruned, an info notice counts what would be.
  * More expired points in a repository than ``max_deletions_per_run``: none is pruned, a warning
    says so (the guard documented in docs/config.md: a mass deletion is more likely a retention
    mistake than intended; a person raises the limit or fixes the retention).
  * The newest successful point of a group is never pruned (retention keeps it; checked again here).

GC (per reachable repository): one ``CollectGarbage``, after the prunes, when points are pruned, when
  the repository says an earlier GC did not complete (its marker: killed or failed; reason "previous GC
  interrupted at <time>"), or when disk indexes no restore point references were seen (a failed or
  killed backup, or a prune whose GC never ran). The reasons are joined. Also with pruning disabled: GC
  frees only data no restore point uses.

Copy (per active copy policy whose source and destination are reachable; unreachable: a warning): due
  like a backup, history key ``copy/<name>``; ``after`` chains use the upstream backup policy's last
  success. When due, one ``RunCopy`` of the points :func:`reconciler.planning.copies.points_to_copy`
  picks (successful points of the source its filters select that the destination lacks and its
  retention would keep); none: an info notice. In the destination, a (policy, VM) group a copy policy
  brings there (:func:`~reconciler.planning.copies.governing_copy`) is pruned by that copy policy's
  retention, with the destination's ``prune`` settings, unless a backup policy writes there itself.

Verify (per active verify policy of a reachable repository): due like a backup, history key
``verify/<name>``; ``after`` chains use the upstream backup policy's last success -> ``RunVerify``.
With a ``test_restore`` block, also one ``RunTestRestore`` per VM it names (every VM with points when it
names none) of that VM's newest successful point in the repository, on the block's host (unreachable:
a warning; no successful point: a warning). A job not due still gets a ``RunTestRestore`` for each VM
whose temporary VM (``<vm>-testrestore``) is registered on that host: a killed test restore left it, and
the test restore run again removes it first (not while the job's backoff holds it back).

``next_due``: the earliest time a job becomes due again — a job due now counts from this run — or a
power-cycle window opens.
Order: remove-snapshot, cbt, backup, copy, prune, gc, verify; within a kind by host/VM/policy/time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

from reconciler.config.model import (
    BackupPolicy,
    CbtMode,
    CopyPolicy,
    DesiredState,
    VerifyPolicy,
    after_policy,
)
from reconciler.facts.inventory import VmInfo, split_ds_path
from reconciler.facts.points import RestorePoint, temporary_vm_name
from reconciler.planning.actions import (
    Action,
    CbtMethod,
    CollectGarbage,
    Notice,
    NoticeLevel,
    Plan,
    PrunePoint,
    RemoveSnapshot,
    RunBackup,
    RunCopy,
    RunTestRestore,
    RunVerify,
    SetCbt,
)
from reconciler.planning.copies import governing_copy, points_to_copy
from reconciler.planning.fingerprint import fingerprint
from reconciler.planning.observed import (
    HostObservation,
    ObservedState,
    RepositoryObservation,
    RunRecord,
    backup_key,
    copy_key,
    verify_key,
)
from reconciler.rules.retention import evaluate
from reconciler.rules.schedule import (
    DAY_NAMES,
    Due,
    Manual,
    NotDue,
    Schedule,
    due,
    in_window,
    next_window_open,
)

UTC = timezone.utc
_KIND_ORDER = ("remove-snapshot", "cbt", "backup", "copy", "prune", "gc", "verify", "test-restore")


@dataclass
class _Builder:
    """Collects the plan's pieces while the rules run."""

    now: datetime
    actions: list[Action] = field(default_factory=list)
    notices: dict[Notice, None] = field(default_factory=dict)
    """Insertion-ordered set: the same notice from two rules is shown once."""
    next_times: list[datetime] = field(default_factory=list)

    def notice(self, level: NoticeLevel, subject: str, message: str) -> None:
        self.notices.setdefault(Notice(level, subject, message), None)

    def later(self, when: datetime | None) -> None:
        if when is not None and when > self.now:
            self.next_times.append(when)


@dataclass(frozen=True)
class _Facts:
    """Lookups computed once per plan (planning 5000 VMs must not rescan every point per VM)."""

    successes: Mapping[str, datetime]
    """Backup policy -> its latest success (for ``after`` chains)."""
    starts: Mapping[tuple[str, str, str, str], datetime]
    """(repository, policy, host, VM) -> start of the newest restore point."""


def _fmt(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _vm_subject(host: str, vm: str) -> str:
    return f"{host}/{vm}"


def _newest(times: Iterable[datetime | None]) -> datetime | None:
    present = [t for t in times if t is not None]
    return max(present) if present else None


# -- upstream successes (after-chains) --------------------------------------------------------------


def _policy_successes(observed: ObservedState) -> dict[str, datetime]:
    """Policy name -> its latest success: newest successful point's finish, or a recorded success."""
    best: dict[str, datetime] = {}

    def offer(policy: str, when: datetime | None) -> None:
        if when is not None and (policy not in best or when > best[policy]):
            best[policy] = when

    for repo in observed.repositories.values():
        for point in repo.points:
            if point.status == "success":
                offer(point.policy, point.finished)
    for key, record in observed.history.items():
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == "backup":
            offer(parts[1], record.last_succeeded)
    return best


def _upstream(schedule: Schedule, successes: Mapping[str, datetime]) -> dict[str, datetime]:
    name = after_policy(schedule)
    if name is None or name not in successes:
        return {}
    return {name: successes[name]}


# -- scheduling with retry -------------------------------------------------------------------------


def _schedule_job(
    b: _Builder,
    schedule: Schedule,
    record: RunRecord,
    last_started: datetime | None,
    upstream: Mapping[str, datetime],
    jitter_key: str,
    subject: str,
) -> Due | None:
    """Whether a job runs now (its :class:`Due`), taking failures and their backoff into account."""
    now = b.now
    result = due(schedule, now, last_started, upstream, jitter_key=jitter_key)
    if record.consecutive_failures > 0 and not isinstance(schedule.spec, Manual):
        failures = _count(record.consecutive_failures, "failure")
        last_error = f": {record.last_error}" if record.last_error else ""
        if record.retry_after is not None and record.retry_after > now:
            b.notice(
                "warning", subject, f"retrying after {_fmt(record.retry_after)} ({failures}{last_error})"
            )
            b.later(next_window_open(schedule, record.retry_after))
            return None
        if isinstance(result, NotDue):
            # The failed attempt counted as a start; the retry is due now that the backoff has passed.
            if in_window(schedule, now):
                return Due(now, now, 1, f"retry after {failures}{last_error}")
            opens = next_window_open(schedule, now)
            b.notice("pending", subject, f"retry after {failures} waits for the window to open")
            b.later(opens)
            return None
    if isinstance(result, NotDue):
        b.later(result.next_due)
        return None
    following = due(schedule, now, now, upstream, jitter_key=jitter_key)  # as if it ran now
    if isinstance(following, NotDue):
        b.later(following.next_due)
    return result


# -- hosts: snapshots, CBT, backups ----------------------------------------------------------------


def _active_policies(desired: DesiredState, host: str) -> list[BackupPolicy]:
    return [p for p in desired.policies_for_host(host) if not p.suspend]


def _plan_orphans(b: _Builder, host: HostObservation) -> None:
    for vm in host.vms:
        for snap in vm.snapshots:
            if host.is_ours(snap):
                b.actions.append(
                    RemoveSnapshot(
                        reason="left behind by an interrupted run",
                        host_name=host.name,
                        vm=vm.name,
                        vmid=vm.vmid,
                        snapshot_id=snap.id,
                        snapshot_name=snap.name,
                    )
                )


def _blocked_by_foreign(b: _Builder, host: HostObservation, vm: VmInfo) -> bool:
    foreign = [s for s in vm.snapshots if not host.is_ours(s)]
    for snap in foreign:
        b.notice(
            "warning",
            _vm_subject(host.name, vm.name),
            f"foreign snapshot '{snap.name}' blocks backup and CBT change",
        )
    return bool(foreign)


def _selected(policy: BackupPolicy, host: HostObservation) -> list[VmInfo]:
    return [vm for vm in host.vms if policy.vms.matches(vm.name)]


def _plan_cbt(b: _Builder, host: HostObservation, policies: list[BackupPolicy]) -> None:
    wanted: dict[str, list[BackupPolicy]] = defaultdict(list)
    vms: dict[str, VmInfo] = {}
    for policy in policies:
        if policy.cbt is CbtMode.UNMANAGED:
            continue
        if host.license == "free" and policy.cbt is CbtMode.ENABLED:
            b.notice(
                "info",
                f"policy {policy.name}",
                f"host {host.name} has a free licence, which refuses the changed-block (CBT) API: "
                "incrementals compare block digests on the host instead",
            )
        for vm in _selected(policy, host):
            wanted[vm.name].append(policy)
            vms[vm.name] = vm
    for name in sorted(wanted):
        vm, voters = vms[name], wanted[name]
        subject = _vm_subject(host.name, name)
        states = {p.cbt for p in voters}
        if len(states) > 1:
            sides = ", ".join(f"{p.name} ({p.cbt.value})" for p in voters)
            b.notice("warning", subject, f"policies disagree on CBT ({sides}); CBT left as it is")
            continue
        enabled = voters[0].cbt is CbtMode.ENABLED
        if vm.cbt_enabled == enabled or _blocked_by_foreign(b, host, vm):
            continue
        _plan_cbt_change(b, host, vm, voters, enabled)


def _power_cycle_schedule(policy: BackupPolicy) -> Schedule:
    """The power-cycle window as a schedule (window None = any time), in the policy's time zone."""
    return Schedule(Manual(), timezone=policy.schedule.timezone, window=policy.cbt_power_cycle.window)


def _plan_cbt_change(
    b: _Builder, host: HostObservation, vm: VmInfo, voters: list[BackupPolicy], enabled: bool
) -> None:
    subject = _vm_subject(host.name, vm.name)
    verb = "enable" if enabled else "disable"
    off = vm.power_state == "poweredOff"
    policy = voters[0]
    method: CbtMethod
    if host.license != "free":
        method, reason = (
            ("reconfigure", "VM is off") if off else ("reconfigure+stun", "stun cycle: VM is running")
        )
    else:
        if not host.ssh_enabled:
            b.notice(
                "warning",
                subject,
                f"cannot {verb} CBT: host {host.name} has a free licence and SSH is disabled in its config,"
                " so the .vmx cannot be edited",
            )
            return
        if off:
            method, reason = "vmx-edit", ".vmx edit: VM is off"
        elif vm.power_state != "poweredOn":
            b.notice(
                "pending",
                subject,
                f"CBT {verb} pending until the VM is powered off (it is {vm.power_state}; free licence: the"
                " .vmx is edited only while the VM is off)",
            )
            return
        else:
            allowed = [p for p in voters if p.cbt_power_cycle.allowed]
            open_now = [p for p in allowed if in_window(_power_cycle_schedule(p), b.now)]
            if not open_now:
                message = (
                    f"CBT {verb} pending until the VM is powered off (free licence: the .vmx is edited only"
                    " while the VM is off)"
                )
                opens = _first_window_open(b, allowed)
                if opens is not None:
                    message += f"; the power-cycle window opens at {_fmt(opens)}"
                b.notice("pending", subject, message)
                return
            policy = open_now[0]
            method = "power-cycle"
            reason = "power cycle: guest shutdown, .vmx edit, power on" + _window_note(policy)
    b.actions.append(
        SetCbt(
            reason=reason,
            host_name=host.name,
            vm=vm.name,
            vmid=vm.vmid,
            enabled=enabled,
            method=method,
            policy=policy.name,
            shutdown_timeout_seconds=policy.cbt_power_cycle.shutdown_timeout.total_seconds(),
        )
    )


def _window_note(policy: BackupPolicy) -> str:
    """`` (window Sun 04:00-05:00 Asia/Tokyo)`` for the power-cycle reason, or "" without a window."""
    window = policy.cbt_power_cycle.window
    if window is None:
        return ""
    days = f"{', '.join(DAY_NAMES[d] for d in sorted(window.days))} " if window.days is not None else ""
    return f" (window {days}{window.start:%H:%M}-{window.end:%H:%M} {policy.schedule.timezone})"


def _first_window_open(b: _Builder, allowed: list[BackupPolicy]) -> datetime | None:
    """The earliest opening of an allowed power-cycle window (registered as a wake-up time)."""
    opens = [next_window_open(_power_cycle_schedule(p), b.now) for p in allowed]
    present = [o for o in opens if o is not None]
    if not present:
        return None
    first = min(present)
    b.later(first)
    return first


def _last_starts(observed: ObservedState) -> dict[tuple[str, str, str, str], datetime]:
    """(repository, policy, host, VM name) -> start of its newest restore point (one pass over all)."""
    out: dict[tuple[str, str, str, str], datetime] = {}
    for repo in observed.repositories.values():
        for point in repo.points:
            key = (repo.name, point.policy, point.vm.host, point.vm.name)
            if key not in out or point.started > out[key]:
                out[key] = point.started
    return out


def _datastore_problem(host: HostObservation, vm: VmInfo, desired: DesiredState) -> str | None:
    limits = desired.host(host.name).limits
    names = {vm.datastore}
    for disk in vm.disks:
        try:
            names.add(split_ds_path(disk.file)[0])
        except ValueError:
            continue
    for name in sorted(names):
        ds = host.datastore(name)
        if ds is None:
            continue
        if not ds.accessible:
            return f"datastore {name} is not accessible; no backup"
        if not limits.datastore_has_room(ds.capacity, ds.free):
            return (
                f"datastore {name} is too full for a snapshot ({_gib(ds.free)} of {_gib(ds.capacity)} free;"
                f" host {host.name} keeps {_gib(limits.min_datastore_free_bytes)} and"
                f" {limits.min_datastore_free_percent:g} % free): no backup"
            )
    return None


def _plan_backups(
    b: _Builder,
    desired: DesiredState,
    observed: ObservedState,
    host: HostObservation,
    policies: list[BackupPolicy],
    facts: _Facts,
) -> None:
    for policy in policies:
        subject = f"policy {policy.name}"
        repo = observed.repositories.get(policy.repository)
        for name in policy.vms.names:
            if host.vm(name) is None:
                b.notice("warning", subject, f"VM '{name}' not found on host {host.name}")
        selected = _selected(policy, host)
        if not selected:
            b.notice("warning", subject, f"selects no VM on host {host.name}")
            continue
        if repo is None or not repo.reachable:
            error = repo.error if repo is not None and repo.error else "not observed"
            b.notice(
                "warning", subject, f"repository {policy.repository} is unreachable ({error}): no backups"
            )
            continue
        upstream = _upstream(policy.schedule, facts.successes)
        for vm in sorted(selected, key=lambda v: v.name):
            vm_subject = _vm_subject(host.name, vm.name)
            if _blocked_by_foreign(b, host, vm):
                continue
            record = observed.record(backup_key(policy.name, host.name, vm.name))
            last = _newest(
                (record.last_started, facts.starts.get((policy.repository, policy.name, host.name, vm.name)))
            )
            result = _schedule_job(
                b, policy.schedule, record, last, upstream, f"{policy.name}/{vm.name}", vm_subject
            )
            if result is None:
                continue
            problem = _datastore_problem(host, vm, desired)
            if problem is not None:
                b.notice("warning", vm_subject, problem)
                continue
            b.actions.append(
                RunBackup(
                    reason=result.reason,
                    policy=policy.name,
                    host_name=host.name,
                    vm=vm.name,
                    vmid=vm.vmid,
                    repository=policy.repository,
                    due_since=result.due_since,
                )
            )


def _plan_host(b: _Builder, desired: DesiredState, observed: ObservedState, name: str, facts: _Facts) -> None:
    policies = _active_policies(desired, name)
    host = observed.hosts.get(name)
    if host is None or not host.reachable:
        error = host.error if host is not None and host.error else "not observed"
        for policy in policies:
            b.notice(
                "warning",
                f"policy {policy.name}",
                f"host {name} is unreachable ({error}): no backups or CBT changes for its VMs",
            )
        return
    _plan_orphans(b, host)
    for vm, notice in host.unfinished_overwrites:  # powered off until a person finishes or aborts it
        b.notice("warning", _vm_subject(name, vm), notice)
    _plan_cbt(b, host, policies)
    _plan_backups(b, desired, observed, host, policies, facts)


# -- repositories: prune and gc --------------------------------------------------------------------


def expired_points(
    desired: DesiredState, repo: RepositoryObservation
) -> tuple[list[tuple[RestorePoint, str]], dict[str, int]]:
    """The points of ``repo`` the retention of their (active) policy no longer keeps, with the reason,
    and per policy that no longer writes to ``repo`` the number of its points there (never pruned).

    Before the per-run guard and ``prune.enabled``: the planner applies those, and the approval check of
    a proposed config (:mod:`reconciler.planning.approval`) counts with the same rule.
    """
    groups: dict[tuple[str, str], list[RestorePoint]] = defaultdict(list)
    for point in repo.points:
        groups[point.group].append(point)
    expired: list[tuple[RestorePoint, str]] = []
    unmanaged: dict[str, int] = defaultdict(int)
    for (policy_name, _uuid), points in sorted(groups.items()):
        policy = desired.policies.get(policy_name)
        governing: BackupPolicy | CopyPolicy | None = policy
        if policy is None or policy.repository != repo.name:
            newest = max(points, key=lambda p: (p.time.astimezone(UTC), p.id))
            governing = governing_copy(desired, repo.name, newest)
        if governing is None:
            unmanaged[policy_name] += len(points)
            continue
        if governing.suspend:
            continue
        decisions = evaluate(points, governing.retention)
        newest_success = next((d.point for d in decisions if d.point.status == "success"), None)
        for decision in decisions:
            if decision.keep:
                continue
            if newest_success is not None and decision.point.id == newest_success.id:
                raise AssertionError(f"retention would prune the newest successful point {decision.point.id}")
            expired.append((decision.point, decision.reason))
    return expired, dict(unmanaged)


def _plan_prune(b: _Builder, desired: DesiredState, repo: RepositoryObservation) -> int:
    """Plan the prunes of ``repo``; returns how many points are planned to go."""
    config = desired.repository(repo.name)
    expired, unmanaged = expired_points(desired, repo)
    for policy_name, count in sorted(unmanaged.items()):
        b.notice(
            "info",
            repo.name,
            f"{_count(count, 'point')} of policy '{policy_name}', which no longer writes to"
            " this repository: never pruned automatically",
        )
    if not expired:
        return 0
    if not config.prune.enabled:
        b.notice(
            "info",
            repo.name,
            f"{_count(len(expired), 'expired point')} kept: pruning is disabled for repository {repo.name}",
        )
        return 0
    limit = config.prune.max_deletions_per_run
    if len(expired) > limit:
        # The documented guard (docs/config.md): too many at once looks like a retention mistake, so
        # nothing is deleted until a person raises the limit or fixes the retention.
        b.notice(
            "warning",
            repo.name,
            f"{_count(len(expired), 'expired point')} exceed max_deletions_per_run {limit}: none pruned"
            " (check the retention, or raise the limit to let them go)",
        )
        return 0
    expired.sort(key=lambda item: (item[0].time.astimezone(UTC), item[0].id))
    for point, reason in expired:
        b.actions.append(
            PrunePoint(
                reason=f"retention: {reason}",
                repository=repo.name,
                point_id=point.id,
                policy=point.policy,
                vm=point.vm.name,
                time=point.time,
            )
        )
    return len(expired)


def _plan_gc(b: _Builder, repo: RepositoryObservation, pruned: int) -> None:
    """One GC of ``repo`` when there is garbage to free: pruned points, an interrupted GC, orphaned
    indexes (see the module doc)."""
    reasons = []
    if pruned:
        reasons.append(f"free the data of {_count(pruned, 'pruned point')}")
    if repo.gc_interrupted is not None:
        reasons.append(f"previous GC interrupted at {_fmt(repo.gc_interrupted)}")
    if repo.unreferenced_indexes:
        n = repo.unreferenced_indexes
        reasons.append(
            f"{n} disk {'index' if n == 1 else 'indexes'} no restore point references"
            ", left by a failed backup or deleted points"
        )
    if reasons:
        b.actions.append(CollectGarbage(reason="; ".join(reasons), repository=repo.name))


# -- copies ----------------------------------------------------------------------------------------


def _plan_copy(
    b: _Builder, observed: ObservedState, policy: CopyPolicy, successes: Mapping[str, datetime]
) -> None:
    subject = f"copy {policy.name}"
    ends = []
    for name in (policy.source, policy.destination):
        repo = observed.repositories.get(name)
        if repo is None or not repo.reachable:
            error = repo.error if repo is not None and repo.error else "not observed"
            b.notice("warning", subject, f"repository {name} is unreachable ({error}): no copy")
            return
        ends.append(repo)
    source, destination = ends
    record = observed.record(copy_key(policy.name))
    upstream = _upstream(policy.schedule, successes)
    result = _schedule_job(b, policy.schedule, record, record.last_started, upstream, policy.name, subject)
    if result is None:
        return
    wanted = points_to_copy(policy, source.points, destination.points, b.now)
    if not wanted:
        b.notice(
            "info",
            subject,
            f"due ({result.reason}); nothing to copy: {policy.destination} has every point this policy sends",
        )
        return
    vms = len({p.vm.uuid for p in wanted})
    b.actions.append(
        RunCopy(
            reason=f"{result.reason}; {_count(len(wanted), 'point')} of {_count(vms, 'VM')}"
            f" missing in {policy.destination}",
            copy_policy=policy.name,
            source=policy.source,
            destination=policy.destination,
            point_ids=tuple(p.id for p in wanted),
        )
    )


# -- verify ----------------------------------------------------------------------------------------


def _plan_verify(
    b: _Builder, observed: ObservedState, policy: VerifyPolicy, successes: Mapping[str, datetime]
) -> None:
    subject = f"verify {policy.name}"
    repo = observed.repositories.get(policy.repository)
    if repo is None or not repo.reachable:
        error = repo.error if repo is not None and repo.error else "not observed"
        b.notice(
            "warning", subject, f"repository {policy.repository} is unreachable ({error}): no verification"
        )
        return
    record = observed.record(verify_key(policy.name))
    upstream = _upstream(policy.schedule, successes)
    result = _schedule_job(b, policy.schedule, record, record.last_started, upstream, policy.name, subject)
    if result is None:
        if policy.test_restore is not None and (record.retry_after is None or record.retry_after <= b.now):
            _plan_unfinished_test_restores(b, observed, policy, repo.points)
        return
    b.actions.append(
        RunVerify(
            reason=result.reason,
            verify_policy=policy.name,
            repository=policy.repository,
            read_data_percent=policy.read_data_percent,
        )
    )
    if policy.test_restore is not None:
        _plan_test_restores(b, observed, policy, repo.points, result.reason)


def _newest_points(points: Iterable[RestorePoint]) -> dict[str, RestorePoint]:
    """The newest successful point of each VM name."""
    newest: dict[str, RestorePoint] = {}
    for point in points:
        if point.status == "success" and (
            point.vm.name not in newest or point.time > newest[point.vm.name].time
        ):
            newest[point.vm.name] = point
    return newest


def _plan_unfinished_test_restores(
    b: _Builder, observed: ObservedState, policy: VerifyPolicy, points: Iterable[RestorePoint]
) -> None:
    """A test restore again for each VM whose temporary VM a killed test restore left on the host."""
    test = policy.test_restore
    assert test is not None
    host = observed.hosts.get(test.host)
    if host is None or not host.reachable:
        return
    registered = {vm.name for vm in host.vms}
    newest = _newest_points(points)
    left = [vm for vm in test.vms or tuple(sorted(newest)) if temporary_vm_name(vm) in registered]
    for vm in left:
        reason = (
            f"the last test restore of {vm} did not finish: its temporary VM {temporary_vm_name(vm)!r} is"
            f" still on {test.host}"
        )
        _plan_test_restores(b, observed, policy, points, reason, only=(vm,))


def _plan_test_restores(
    b: _Builder,
    observed: ObservedState,
    policy: VerifyPolicy,
    points: Iterable[RestorePoint],
    reason: str,
    only: tuple[str, ...] | None = None,
) -> None:
    """One ``RunTestRestore`` per VM of the test-restore block (all VMs with points when it names none;
    ``only``: these), of the VM's newest successful point in the repository, whatever policy made it."""
    test = policy.test_restore
    assert test is not None
    subject = f"test-restore {policy.name}"
    host = observed.hosts.get(test.host)
    if host is None or not host.reachable:
        error = host.error if host is not None and host.error else "not observed"
        b.notice("warning", subject, f"host {test.host} is unreachable ({error}): no test restore")
        return
    newest = _newest_points(points)
    for vm in only or test.vms or tuple(sorted(newest)):
        found = newest.get(vm)
        if found is None:
            b.notice("warning", subject, f"VM {vm!r} has no successful restore point in {policy.repository}")
            continue
        b.actions.append(
            RunTestRestore(
                reason=(
                    f"{reason}; newest point of {vm} from {found.vm.host}"
                    f" ({found.time.astimezone(UTC):%Y-%m-%dT%H:%MZ})"
                ),
                verify_policy=policy.name,
                repository=policy.repository,
                vm=vm,
                point_id=found.id,
                host_name=test.host,
                datastore=test.datastore,
            )
        )


# -- the plan --------------------------------------------------------------------------------------


def _sort_key(action: Action) -> tuple[object, ...]:
    rank = _KIND_ORDER.index(action.kind) if action.kind in _KIND_ORDER else len(_KIND_ORDER)
    if isinstance(action, RemoveSnapshot):
        return (rank, action.host_name, action.vm, action.snapshot_id)
    if isinstance(action, SetCbt):
        return (rank, action.host_name, action.vm)
    if isinstance(action, RunBackup):
        return (rank, action.host_name, action.vm, action.policy)
    if isinstance(action, RunCopy):
        return (rank, action.source, action.destination, action.copy_policy)
    if isinstance(action, PrunePoint):
        return (rank, action.repository, action.time.astimezone(UTC).isoformat(), action.point_id)
    if isinstance(action, CollectGarbage):
        return (rank, action.repository)
    if isinstance(action, RunVerify):
        return (rank, action.repository, action.verify_policy)
    return (rank, action.subject)


_LEVEL_ORDER = {"warning": 0, "pending": 1, "info": 2}


def plan(desired: DesiredState, observed: ObservedState) -> Plan:
    """The ordered actions that bring reality to ``desired``, with notices for what is not done and why."""
    b = _Builder(now=observed.time.astimezone(UTC))
    facts = _Facts(successes=_policy_successes(observed), starts=_last_starts(observed))
    for name in desired.hosts:
        _plan_host(b, desired, observed, name, facts)
    for copy in desired.copy_policies.values():
        if not copy.suspend:
            _plan_copy(b, observed, copy, facts.successes)
    for name in desired.repositories:
        repo = observed.repositories.get(name)
        if repo is not None and repo.reachable:
            _plan_gc(b, repo, _plan_prune(b, desired, repo))
    for verify in desired.verify_policies.values():
        if not verify.suspend:
            _plan_verify(b, observed, verify, facts.successes)
    # Python's sort is stable: rule order breaks ties within a key.
    actions = sorted(b.actions, key=_sort_key)
    notices = sorted(b.notices, key=lambda n: (_LEVEL_ORDER[n.level], n.subject, n.message))
    return Plan(
        created=b.now,
        revision=desired.revision.id,
        observed_fingerprint=fingerprint(desired, observed),
        actions=tuple(actions),
        notices=tuple(notices),
        next_due=min(b.next_times) if b.next_times else None,
    )
