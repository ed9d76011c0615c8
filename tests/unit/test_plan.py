"""The pure planner: every action kind and notice, and the tricky cases (DST, missed runs, windows,
jitter, chains, hosts down, foreign snapshots, retention boundaries, the deletion guard)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from reconciler.config import DesiredState
from reconciler.facts.inventory import VmInfo
from reconciler.facts.points import RestorePoint
from reconciler.planning.actions import (
    CollectGarbage,
    Notice,
    Plan,
    PrunePoint,
    RemoveSnapshot,
    RunBackup,
    RunTestRestore,
    RunVerify,
    SetCbt,
)
from reconciler.planning.fingerprint import fingerprint
from reconciler.planning.observed import RepositoryObservation, RunRecord, backup_key, verify_key
from reconciler.planning.plan import plan
from reconciler.rules.schedule import jitter_offset
from tests.unit.planfixtures import (
    GiB,
    at,
    down,
    host,
    load_desired,
    observed,
    ours,
    point,
    policy_doc,
    repo_doc,
    snapshot,
    verify_doc,
    vm,
)

NOW = at("2026-11-26 03:00")  # a Thursday


def kinds(result: Plan) -> list[str]:
    return [a.kind for a in result.actions]


def backups(result: Plan) -> list[RunBackup]:
    return [a for a in result.actions if isinstance(a, RunBackup)]


def messages(result: Plan, level: str | None = None) -> list[str]:
    return [f"{n.subject}: {n.message}" for n in result.notices if level is None or n.level == level]


def web_policy(tmp_path: Path, **kwargs: str) -> DesiredState:
    return load_desired(tmp_path, policy_doc("web", "esxi1", ["web01"], **kwargs))


# -- backups and schedules ------------------------------------------------------------------------


def test_first_backup_is_due_with_the_schedule_as_reason(tmp_path: Path) -> None:
    desired = web_policy(tmp_path)
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")]), host("esxi2", [])]))
    (backup,) = backups(result)
    assert (backup.policy, backup.host_name, backup.vm, backup.repository) == ("web", "esxi1", "web01", "nas")
    assert backup.vmid == vm("web01").vmid
    assert backup.due_since == at("2026-11-26 02:00")
    assert "due since 2026-11-26 02:00 UTC (daily at 02:00)" in backup.reason
    assert result.next_due == at("2026-11-27 02:00")  # the only job: its run after this one


def test_backup_done_after_the_fire_time_is_not_repeated(tmp_path: Path) -> None:
    desired = web_policy(tmp_path)
    points = [point("web", "web01", at("2026-11-26 02:00"))]
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")]), host("esxi2", [])], points))
    assert result.actions == ()
    assert result.next_due == at("2026-11-27 02:00")


def test_history_start_counts_even_without_a_point(tmp_path: Path) -> None:
    """A failed attempt (no point written) still counts as the start of this fire time."""
    desired = web_policy(tmp_path)
    history = {backup_key("web", "esxi1", "web01"): RunRecord(last_started=at("2026-11-26 02:01"))}
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")])], history=history))
    assert backups(result) == []


def test_points_of_another_host_or_policy_do_not_count(tmp_path: Path) -> None:
    desired = web_policy(tmp_path)
    points = [
        point("web", "web01", at("2026-11-26 02:00"), host_name="esxi2"),
        point("other", "web01", at("2026-11-26 02:00")),
    ]
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")])], points))
    assert len(backups(result)) == 1


def test_missed_runs_during_downtime_collapse_into_one(tmp_path: Path) -> None:
    desired = web_policy(tmp_path)
    points = [point("web", "web01", at("2026-11-22 02:00"))]
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")])], points))
    (backup,) = backups(result)
    assert backup.due_since == at("2026-11-23 02:00")
    assert "4 missed runs collapse into one" in backup.reason


def test_dst_fall_back_runs_once_at_the_first_occurrence(tmp_path: Path) -> None:
    """Europe/Berlin, 25 October 2026: 02:30 happens twice (CEST, then CET); the backup runs once."""
    desired = web_policy(tmp_path, schedule='{daily: {at: "02:30"}, timezone: Europe/Berlin}')
    first = at("2026-10-25 00:30")  # 02:30 CEST
    hosts = [host("esxi1", [vm("web01")])]
    assert len(backups(plan(desired, observed(first, hosts)))) == 1
    points = [point("web", "web01", first)]
    second = at("2026-10-25 01:45")  # 02:45 CET: the repeated hour
    result = plan(desired, observed(second, hosts, points))
    assert backups(result) == []
    assert result.next_due == at("2026-10-26 01:30")  # 02:30 CET the next day


def test_dst_spring_forward_runs_at_the_end_of_the_gap(tmp_path: Path) -> None:
    desired = web_policy(tmp_path, schedule='{daily: {at: "02:30"}, timezone: Europe/Berlin}')
    hosts = [host("esxi1", [vm("web01")])]
    points = [point("web", "web01", at("2026-03-28 01:30"))]
    before = plan(desired, observed(at("2026-03-29 00:59"), hosts, points))
    assert backups(before) == []
    assert before.next_due == at("2026-03-29 01:00")  # 03:00 CEST, where 02:30 would have been
    assert len(backups(plan(desired, observed(at("2026-03-29 01:00"), hosts, points)))) == 1


WINDOW = '{daily: {at: "22:00"}, window: {start: "22:00", end: "06:00"}}'


@pytest.mark.parametrize(
    ("now", "runs"),
    [
        ("2026-11-26 05:59", True),
        ("2026-11-26 06:00", False),
        ("2026-11-26 21:59", False),
        ("2026-11-26 22:00", True),
    ],
)
def test_window_edges(tmp_path: Path, now: str, runs: bool) -> None:
    """The window's start is inclusive, its end exclusive; a missed run waits for the window."""
    desired = web_policy(tmp_path, schedule=WINDOW)
    points = [point("web", "web01", at("2026-11-23 22:00"))]
    result = plan(desired, observed(at(now), [host("esxi1", [vm("web01")])], points))
    assert (len(backups(result)) == 1) is runs
    if not runs:
        assert result.next_due == at("2026-11-26 22:00")


def test_jitter_delays_each_vm_by_its_own_stable_offset(tmp_path: Path) -> None:
    desired = web_policy(tmp_path, schedule='{daily: {at: "02:00"}, jitter: 1h}')
    offset = jitter_offset(desired.policy("web").schedule, "web/web01")
    assert timedelta(0) < offset < timedelta(hours=1)
    hosts = [host("esxi1", [vm("web01")])]
    points = [point("web", "web01", at("2026-11-25 02:30"))]
    fire = at("2026-11-26 02:00") + offset
    early = plan(desired, observed(fire - timedelta(seconds=1), hosts, points))
    assert backups(early) == []
    assert early.next_due == fire
    assert len(backups(plan(desired, observed(fire, hosts, points)))) == 1


def test_after_chain_runs_once_per_upstream_success(tmp_path: Path) -> None:
    desired = load_desired(
        tmp_path,
        policy_doc("web", "esxi1", ["web01"]),
        policy_doc("copy", "esxi1", ["db01"], schedule="{after: web}"),
    )
    hosts = [host("esxi1", [vm("web01"), vm("db01")])]
    done = point("web", "web01", at("2026-11-26 02:00"))  # finished 02:10
    result = plan(desired, observed(NOW, hosts, [done]))
    (backup,) = backups(result)
    assert (backup.policy, backup.vm, backup.due_since) == ("copy", "db01", at("2026-11-26 02:10"))
    copied = point("copy", "db01", at("2026-11-26 02:15"))
    assert backups(plan(desired, observed(NOW, hosts, [done, copied]))) == []
    # Nothing from web yet: the chain waits (and sets no timer).
    waiting = plan(desired, observed(at("2026-11-26 01:00"), hosts))
    assert [b.policy for b in backups(waiting)] == ["web"]


def test_after_chain_uses_recorded_success_of_the_upstream(tmp_path: Path) -> None:
    desired = load_desired(
        tmp_path,
        policy_doc("web", "esxi1", ["web01"]),
        policy_doc("copy", "esxi1", ["db01"], schedule="{after: web}"),
    )
    history = {
        backup_key("web", "esxi1", "web01"): RunRecord(
            last_started=at("2026-11-26 02:00"), last_succeeded=at("2026-11-26 02:20")
        )
    }
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01"), vm("db01")])], history=history))
    assert [(b.policy, b.due_since) for b in backups(result)] == [("copy", at("2026-11-26 02:20"))]


def test_failed_job_waits_for_retry_after_then_retries(tmp_path: Path) -> None:
    desired = web_policy(tmp_path)
    hosts = [host("esxi1", [vm("web01")])]
    record = RunRecord(
        last_started=at("2026-11-26 02:00"),
        consecutive_failures=2,
        retry_after=at("2026-11-26 03:30"),
        last_error="snapshot timed out",
    )
    history = {backup_key("web", "esxi1", "web01"): record}
    held = plan(desired, observed(NOW, hosts, history=history))
    assert backups(held) == []
    assert messages(held, "warning") == [
        "esxi1/web01: retrying after 2026-11-26 03:30 UTC (2 failures: snapshot timed out)"
    ]
    assert held.next_due == at("2026-11-26 03:30")
    retried = plan(desired, observed(at("2026-11-26 03:30"), hosts, history=history))
    (backup,) = backups(retried)
    assert backup.reason == "retry after 2 failures: snapshot timed out"


def test_manual_schedule_is_never_planned(tmp_path: Path) -> None:
    desired = web_policy(tmp_path, schedule="{manual: true}")
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")])]))
    assert result.actions == ()
    assert result.next_due is None


def test_suspended_policy_plans_nothing(tmp_path: Path) -> None:
    desired = web_policy(tmp_path, cbt="enabled", extra="suspend: true")
    points = [point("web", "web01", at(f"2026-11-{d:02d} 02:00")) for d in range(10, 20)]
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01", power="poweredOff")])], points))
    assert result.actions == ()


def test_datastore_below_the_floor_blocks_the_backup(tmp_path: Path) -> None:
    desired = web_policy(tmp_path)
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")], free=50 * GiB, capacity=1000 * GiB)]))
    assert backups(result) == []
    (warning,) = messages(result, "warning")
    assert warning.startswith("esxi1/web01: datastore ds1 is too full for a snapshot (50.0 GiB of 1000.0 GiB")


def test_missing_vm_and_policy_without_vms_are_warnings(tmp_path: Path) -> None:
    desired = load_desired(
        tmp_path,
        policy_doc("web", "esxi1", ["web01", "gone"]),
        policy_doc("empty", "esxi1", ["nothing"]),
    )
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")])]))
    assert [b.vm for b in backups(result)] == ["web01"]
    assert messages(result, "warning") == [
        "policy empty: VM 'nothing' not found on host esxi1",
        "policy empty: selects no VM on host esxi1",
        "policy web: VM 'gone' not found on host esxi1",
    ]


def test_hostile_vm_names_are_carried_verbatim(tmp_path: Path) -> None:
    name = 'ファイル鯖 "q" $(x)'
    desired = load_desired(tmp_path, policy_doc("odd", "esxi1", [name]))
    (backup,) = backups(plan(desired, observed(NOW, [host("esxi1", [vm(name)])])))
    assert backup.vm == name
    assert backup.subject == f"esxi1/{name}"


# -- hosts and repositories that cannot be read ------------------------------------------------------


def test_unreachable_host_warns_per_policy_and_other_hosts_are_planned(tmp_path: Path) -> None:
    desired = load_desired(
        tmp_path,
        policy_doc("web", "esxi1", ["web01"], cbt="enabled"),
        policy_doc("db", "esxi1", ["db01"]),
        policy_doc("apps", "esxi2", ["app201"]),
    )
    result = plan(desired, observed(NOW, [down("esxi1"), host("esxi2", [vm("app201")])]))
    assert [(b.host_name, b.vm) for b in backups(result)] == [("esxi2", "app201")]
    assert messages(result, "warning") == [
        f"policy {p}: host esxi1 is unreachable (ConnectionRefusedError: [Errno 111] Connection refused):"
        " no backups or CBT changes for its VMs"
        for p in ("db", "web")
    ]


def test_host_missing_from_the_observation_counts_as_unreachable(tmp_path: Path) -> None:
    desired = web_policy(tmp_path)
    result = plan(desired, observed(NOW, []))
    assert result.actions == ()
    assert messages(result, "warning") == [
        "policy web: host esxi1 is unreachable (not observed): no backups or CBT changes for its VMs"
    ]


def test_unreachable_repository_stops_its_backups_and_prunes(tmp_path: Path) -> None:
    desired = web_policy(tmp_path)
    repos = {"nas": RepositoryObservation("nas", reachable=False, error="LockedError: exclusive lock by gc")}
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")])], repositories=repos))
    assert result.actions == ()
    assert messages(result, "warning") == [
        "policy web: repository nas is unreachable (LockedError: exclusive lock by gc): no backups"
    ]


# -- snapshots ---------------------------------------------------------------------------------------


def test_orphaned_snapshot_is_removed_first(tmp_path: Path) -> None:
    desired = web_policy(tmp_path)
    leftover = ours()
    other = vm("other", snapshots=[ours("x")])  # ours on a VM no policy selects: still an orphan
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01", snapshots=[leftover]), other])]))
    assert kinds(result) == ["remove-snapshot", "remove-snapshot", "backup"]
    first = result.actions[0]
    assert isinstance(first, RemoveSnapshot)
    assert (first.vm, first.snapshot_id, first.snapshot_name) == (
        "other",
        other.snapshots[0].id,
        other.snapshots[0].name,
    )
    assert isinstance(result.actions[1], RemoveSnapshot) and result.actions[1].snapshot_id == leftover.id


def test_foreign_snapshot_blocks_backup_and_cbt_of_that_vm_only(tmp_path: Path) -> None:
    desired = load_desired(tmp_path, policy_doc("web", "esxi1", ["web01", "web02"], cbt="enabled"))
    vms = [
        vm("web01", power="poweredOff", snapshots=[snapshot("before upgrade")]),
        vm("web02", power="poweredOff"),
    ]
    result = plan(desired, observed(NOW, [host("esxi1", vms)]))
    assert [a.subject for a in result.actions] == ["esxi1/web02", "esxi1/web02"]
    assert kinds(result) == ["cbt", "backup"]
    assert messages(result, "warning") == [
        "esxi1/web01: foreign snapshot 'before upgrade' blocks backup and CBT change"
    ]


# -- CBT ---------------------------------------------------------------------------------------------


def cbt_plan(tmp_path: Path, vm_on_host: VmInfo, *, host_name: str = "esxi1", extra: str = "") -> Plan:
    desired = load_desired(tmp_path, policy_doc("web", host_name, ["web01"], cbt="enabled", extra=extra))
    return plan(desired, observed(NOW, [host(host_name, [vm_on_host])]))


def cbt_actions(result: Plan) -> list[SetCbt]:
    return [a for a in result.actions if isinstance(a, SetCbt)]


@pytest.mark.parametrize(
    ("power", "method", "reason"),
    [
        ("poweredOff", "reconfigure", "VM is off"),
        ("poweredOn", "reconfigure+stun", "stun cycle: VM is running"),
    ],
)
def test_cbt_on_a_licensed_host(tmp_path: Path, power: str, method: str, reason: str) -> None:
    result = cbt_plan(tmp_path, vm("web01", power=power), host_name="esxi2")
    (change,) = cbt_actions(result)
    assert (change.enabled, change.method, change.reason, change.policy) == (True, method, reason, "web")
    assert kinds(result) == ["cbt", "backup"]
    assert messages(result, "info") == []


def test_cbt_disable_and_unmanaged(tmp_path: Path) -> None:
    desired = load_desired(
        tmp_path,
        policy_doc("off", "esxi2", ["app201"], cbt="disabled"),
        policy_doc("free", "esxi2", ["app202"], cbt="unmanaged"),
    )
    vms = [vm("app201", cbt=True, power="poweredOff"), vm("app202", cbt=True)]
    (change,) = cbt_actions(plan(desired, observed(NOW, [host("esxi2", vms)])))
    assert (change.vm, change.enabled, change.method) == ("app201", False, "reconfigure")


def test_cbt_already_right_plans_nothing(tmp_path: Path) -> None:
    assert cbt_actions(cbt_plan(tmp_path, vm("web01", cbt=True), host_name="esxi2")) == []


def test_cbt_on_a_free_host_edits_the_vmx_of_a_powered_off_vm(tmp_path: Path) -> None:
    result = cbt_plan(tmp_path, vm("web01", power="poweredOff"))
    (change,) = cbt_actions(result)
    assert (change.method, change.reason) == ("vmx-edit", ".vmx edit: VM is off")
    assert messages(result, "info") == [
        "policy web: host esxi1 has a free licence, which refuses the changed-block (CBT) API: incrementals"
        " compare block digests on the host instead"
    ]


def test_cbt_on_a_free_host_is_pending_while_the_vm_runs(tmp_path: Path) -> None:
    result = cbt_plan(tmp_path, vm("web01"))
    assert cbt_actions(result) == []
    assert messages(result, "pending") == [
        "esxi1/web01: CBT enable pending until the VM is powered off (free licence: the .vmx is edited only"
        " while the VM is off)"
    ]
    assert kinds(result) == ["backup"]  # the backup does not wait for CBT


POWER_CYCLE = """\
cbt_power_cycle:
  allowed: true
  window: {start: "02:00", end: "04:00", days: [thu]}
  shutdown_timeout: 5m
"""


def test_cbt_power_cycle_inside_its_window(tmp_path: Path) -> None:
    result = cbt_plan(tmp_path, vm("web01"), extra=POWER_CYCLE)
    (change,) = cbt_actions(result)
    assert change.method == "power-cycle"
    assert change.shutdown_timeout_seconds == 300
    assert change.reason == "power cycle: guest shutdown, .vmx edit, power on (window Thu 02:00-04:00 UTC)"


def test_cbt_power_cycle_outside_its_window_is_pending_until_it_opens(tmp_path: Path) -> None:
    desired = load_desired(tmp_path, policy_doc("web", "esxi1", ["web01"], cbt="enabled", extra=POWER_CYCLE))
    points = [point("web", "web01", at("2026-11-26 02:00"))]
    result = plan(desired, observed(at("2026-11-26 04:00"), [host("esxi1", [vm("web01")])], points))
    assert result.actions == ()
    assert messages(result, "pending") == [
        "esxi1/web01: CBT enable pending until the VM is powered off (free licence: the .vmx is edited only"
        " while the VM is off); the power-cycle window opens at 2026-12-03 02:00 UTC"
    ]
    assert result.next_due == at("2026-11-27 02:00")  # the next backup comes before the window


def test_cbt_on_a_free_host_without_ssh_is_a_warning(tmp_path: Path) -> None:
    """A host configured with licence ``auto`` and no SSH that turns out to be free."""
    desired = load_desired(tmp_path, policy_doc("apps", "esxi2", ["app201"], cbt="enabled"))
    scene = observed(NOW, [host("esxi2", [vm("app201", power="poweredOff")], license="free", ssh=False)])
    result = plan(desired, scene)
    assert cbt_actions(result) == []
    assert messages(result, "warning") == [
        "esxi2/app201: cannot enable CBT: host esxi2 has a free licence and SSH is disabled in its config,"
        " so the .vmx cannot be edited"
    ]


def test_policies_disagreeing_on_cbt_leave_it_alone(tmp_path: Path) -> None:
    desired = load_desired(
        tmp_path,
        policy_doc("a", "esxi2", ["app201"], cbt="enabled"),
        policy_doc("b", "esxi2", None, cbt="disabled"),
    )
    result = plan(desired, observed(NOW, [host("esxi2", [vm("app201", power="poweredOff")])]))
    assert cbt_actions(result) == []
    assert messages(result, "warning") == [
        "esxi2/app201: policies disagree on CBT (a (enabled), b (disabled)); CBT left as it is"
    ]


# -- prune -------------------------------------------------------------------------------------------


def daily_points(
    policy: str, vm_name: str, days: int, *, end: str = "2026-11-26 02:00"
) -> list[RestorePoint]:
    last = at(end)
    return [point(policy, vm_name, last - timedelta(days=i)) for i in range(days)]


def prunes(result: Plan) -> list[PrunePoint]:
    return [a for a in result.actions if isinstance(a, PrunePoint)]


def test_retention_prunes_oldest_points_then_collects_garbage(tmp_path: Path) -> None:
    desired = web_policy(tmp_path, retention="{keep_daily: 7}")
    points = daily_points("web", "web01", 10)
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")])], points))
    assert kinds(result) == ["prune", "prune", "prune", "gc"]
    assert [p.point_id for p in prunes(result)] == [p.id for p in sorted(points, key=lambda p: p.time)[:3]]
    assert prunes(result)[0].reason == "retention: beyond keep-daily 7"
    assert prunes(result)[0].subject == "web01@2026-11-17T02:00Z"
    gc = result.actions[-1]
    assert isinstance(gc, CollectGarbage) and gc.repository == "nas"


def test_retention_day_boundary_is_in_the_policy_time_zone(tmp_path: Path) -> None:
    """Two points 15 minutes apart: different UTC days, the same Tokyo day -> the older one goes."""
    desired = web_policy(
        tmp_path, retention="{keep_daily: 5}", schedule='{daily: {at: "09:00"}, timezone: Asia/Tokyo}'
    )
    # 2026-11-25 23:50 UTC = 26th 08:50 Tokyo; 2026-11-26 00:05 UTC = 26th 09:05 Tokyo.
    a, b = point("web", "web01", at("2026-11-25 23:50")), point("web", "web01", at("2026-11-26 00:05"))
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")])], [a, b]))
    assert [p.point_id for p in prunes(result)] == [a.id]


def test_deletion_guard_prunes_nothing_when_too_many_expire(tmp_path: Path) -> None:
    desired = load_desired(
        tmp_path,
        policy_doc("web", "esxi1", ["web01"], retention="{keep_last: 2}"),
        repositories=[repo_doc(max_deletions=3)],
    )
    points = daily_points("web", "web01", 6)
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")])], points))
    assert prunes(result) == []
    assert "gc" not in kinds(result)
    assert messages(result, "warning") == [
        "nas: 4 expired points exceed max_deletions_per_run 3: none pruned (check the retention, or raise the"
        " limit to let them go)"
    ]
    exact = plan(desired, observed(NOW, [host("esxi1", [vm("web01")])], points[:5]))
    assert len(prunes(exact)) == 3


def test_prune_disabled_keeps_expired_points_with_a_note(tmp_path: Path) -> None:
    desired = load_desired(
        tmp_path,
        policy_doc("web", "esxi1", ["web01"], retention="{keep_last: 2}"),
        repositories=[repo_doc(prune=False)],
    )
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")])], daily_points("web", "web01", 5)))
    assert prunes(result) == []
    assert messages(result, "info") == ["nas: 3 expired points kept: pruning is disabled for repository nas"]


def test_newest_successful_point_is_never_pruned(tmp_path: Path) -> None:
    """Failed runs after the last success: keep-last counts successes only, the newest success stays."""
    desired = web_policy(tmp_path, retention="{keep_last: 1}")
    good = point("web", "web01", at("2026-11-20 02:00"))
    older = point("web", "web01", at("2026-11-19 02:00"))
    failed = [point("web", "web01", at(f"2026-11-{d} 02:00"), status="failed") for d in (21, 22, 23)]
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")])], [older, good, *failed]))
    pruned = {p.point_id for p in prunes(result)}
    assert good.id not in pruned
    assert pruned == {older.id, failed[0].id, failed[1].id}  # the newest failed one is kept as evidence


def test_protected_points_are_kept(tmp_path: Path) -> None:
    desired = web_policy(tmp_path, retention="{keep_last: 1}")
    points = daily_points("web", "web01", 3)
    points[2] = replace(points[2], protected=True)
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")])], points))
    assert [p.point_id for p in prunes(result)] == [points[1].id]


def test_points_of_removed_policies_are_never_pruned(tmp_path: Path) -> None:
    desired = web_policy(tmp_path, retention="{keep_last: 1}")
    points = daily_points("old", "web01", 4) + daily_points("web", "web01", 1)
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")])], points))
    assert prunes(result) == []
    assert messages(result, "info") == [
        "nas: 4 points of policy 'old', which no longer writes to this repository: never pruned automatically"
    ]


def test_retention_groups_are_per_vm(tmp_path: Path) -> None:
    desired = load_desired(
        tmp_path, policy_doc("web", "esxi1", ["web01", "web02"], retention="{keep_last: 2}")
    )
    points = daily_points("web", "web01", 3) + daily_points("web", "web02", 2)
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01"), vm("web02")])], points))
    assert [(p.vm, p.time) for p in prunes(result)] == [("web01", at("2026-11-24 02:00"))]


def test_prune_does_not_need_the_host(tmp_path: Path) -> None:
    desired = web_policy(tmp_path, retention="{keep_last: 1}")
    result = plan(desired, observed(NOW, [down("esxi1")], daily_points("web", "web01", 2)))
    assert kinds(result) == ["prune", "gc"]


def test_an_interrupted_gc_or_orphaned_indexes_plan_a_gc_with_the_reason(tmp_path: Path) -> None:
    """After a GC was killed (its marker left), or a backup died after writing a disk index, the space
    is reclaimed without waiting for the next prune — also with pruning disabled or the host down."""
    desired = load_desired(
        tmp_path, policy_doc("web", "esxi1", ["web01"]), repositories=[repo_doc(prune=False)]
    )
    points = daily_points("web", "web01", 1)
    clean = RepositoryObservation("nas", reachable=True, points=tuple(points))
    hosts = [down("esxi1")]
    assert "gc" not in kinds(plan(desired, observed(NOW, hosts, repositories={"nas": clean})))

    killed = replace(clean, gc_interrupted=at("2026-11-26 01:30"))
    result = plan(desired, observed(NOW, hosts, repositories={"nas": killed}))
    (gc,) = result.actions
    assert isinstance(gc, CollectGarbage) and gc.repository == "nas"
    assert gc.reason == "previous GC interrupted at 2026-11-26 01:30 UTC"

    orphans = replace(clean, unreferenced_indexes=2)
    (gc,) = plan(desired, observed(NOW, hosts, repositories={"nas": orphans})).actions
    assert gc.reason == (
        "2 disk indexes no restore point references, left by a failed backup or deleted points"
    )


def test_a_prune_and_an_interrupted_gc_make_one_gc_with_both_reasons(tmp_path: Path) -> None:
    desired = web_policy(tmp_path, retention="{keep_daily: 7}")
    points = tuple(daily_points("web", "web01", 8))
    repo = RepositoryObservation(
        "nas", reachable=True, points=points, gc_interrupted=at("2026-11-25 04:10"), unreferenced_indexes=1
    )
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01")])], repositories={"nas": repo}))
    assert kinds(result) == ["prune", "gc"]
    assert result.actions[-1].reason == (
        "free the data of 1 pruned point; previous GC interrupted at 2026-11-25 04:10 UTC;"
        " 1 disk index no restore point references, left by a failed backup or deleted points"
    )
    clean = replace(repo, gc_interrupted=None, unreferenced_indexes=0)
    assert fingerprint(desired, observed(NOW, [], repositories={"nas": repo})) != fingerprint(
        desired, observed(NOW, [], repositories={"nas": clean})
    )


# -- verify ------------------------------------------------------------------------------------------


def test_verify_is_planned_when_due(tmp_path: Path) -> None:
    desired = load_desired(tmp_path, policy_doc("web", "esxi1", ["web01"]), verify_doc("check"))
    hosts = [host("esxi1", [vm("web01")])]
    points = [point("web", "web01", at("2026-11-26 02:00"))]
    result = plan(desired, observed(at("2026-11-26 05:00"), hosts, points))
    (verify,) = result.actions
    assert isinstance(verify, RunVerify)
    assert (verify.verify_policy, verify.repository, verify.read_data_percent) == ("check", "nas", 10)
    history = {verify_key("check"): RunRecord(last_started=at("2026-11-26 05:00"))}
    assert plan(desired, observed(at("2026-11-26 06:00"), hosts, points, history=history)).actions == ()


def test_verify_after_a_backup_policy(tmp_path: Path) -> None:
    desired = load_desired(
        tmp_path, policy_doc("web", "esxi1", ["web01"]), verify_doc("check", schedule="{after: web}")
    )
    hosts = [host("esxi1", [vm("web01")])]
    history = {verify_key("check"): RunRecord(last_started=at("2026-11-25 03:00"))}
    points = [point("web", "web01", at("2026-11-26 02:00"))]
    result = plan(desired, observed(NOW, hosts, points, history=history))
    assert kinds(result) == ["verify"]
    assert plan(desired, observed(NOW, hosts, points[:0], history=history)).actions[-1].kind == "backup"


def test_test_restore_of_the_newest_successful_point_of_each_vm(tmp_path: Path) -> None:
    desired = load_desired(
        tmp_path,
        policy_doc("web", "esxi1", ["web01", "db 01"]),
        verify_doc("check", test_restore="{host: esxi1, datastore: datastore1}"),
    )
    hosts = [host("esxi1", [vm("web01"), vm("db 01")])]
    points = [
        point("web", "web01", at("2026-11-25 02:00")),
        point("web", "web01", at("2026-11-26 02:00")),
        point("web", "db 01", at("2026-11-26 02:00")),
    ]
    failed = replace(point("web", "db 01", at("2026-11-26 03:00")), status="failed")
    result = plan(desired, observed(at("2026-11-26 05:00"), hosts, [*points, failed]))
    assert kinds(result) == ["verify", "test-restore", "test-restore"]
    tests = [a for a in result.actions if isinstance(a, RunTestRestore)]
    assert [(t.vm, t.point_id, t.host_name, t.datastore) for t in tests] == [
        ("db 01", points[2].id, "esxi1", "datastore1"),
        ("web01", points[1].id, "esxi1", "datastore1"),
    ]
    (tmp_path / "named").mkdir()
    named = load_desired(
        tmp_path / "named",
        policy_doc("web", "esxi1", ["web01"]),
        verify_doc("check", test_restore="{host: esxi1, vms: [web01, gone]}"),
    )
    result = plan(named, observed(at("2026-11-26 05:00"), hosts, points))
    assert [a.vm for a in result.actions if isinstance(a, RunTestRestore)] == ["web01"]
    assert any("'gone' has no successful restore point" in n.message for n in result.notices)
    down_host = plan(named, observed(at("2026-11-26 05:00"), [down("esxi1")], points))
    assert kinds(down_host) == ["verify"]
    assert any("no test restore" in n.message for n in down_host.notices)


# -- the plan as a whole -------------------------------------------------------------------------------


def full_scene(tmp_path: Path) -> DesiredState:
    return load_desired(
        tmp_path,
        policy_doc("web", "esxi1", ["web01", "db 01"], cbt="enabled", retention="{keep_last: 2}"),
        policy_doc("apps", "esxi2", ["app201"], cbt="enabled"),
        verify_doc("check", schedule='{daily: {at: "02:30"}}'),
    )


def test_order_is_by_kind_then_host_vm_policy(tmp_path: Path) -> None:
    desired = full_scene(tmp_path)
    hosts = [
        host("esxi1", [vm("web01", power="poweredOff"), vm("db 01", snapshots=[ours()])]),
        host("esxi2", [vm("app201")]),
    ]
    points = daily_points("web", "web01", 4, end="2026-11-25 02:00")
    result = plan(desired, observed(NOW, hosts, points))
    assert [(a.kind, a.subject) for a in result.actions] == [
        ("remove-snapshot", "esxi1/db 01"),
        ("cbt", "esxi1/web01"),
        ("cbt", "esxi2/app201"),
        ("backup", "esxi1/db 01"),
        ("backup", "esxi1/web01"),
        ("backup", "esxi2/app201"),
        ("prune", "web01@2026-11-22T02:00Z"),
        ("prune", "web01@2026-11-23T02:00Z"),
        ("gc", "nas"),
        ("verify", "nas"),
    ]
    assert result.revision == desired.revision.id
    assert result.created == NOW
    # Deterministic, and a saved plan reads back identically.
    assert plan(desired, observed(NOW, hosts, points)) == result
    assert Plan.from_json(result.to_json()) == result


def test_no_changes_when_reality_matches(tmp_path: Path) -> None:
    desired = web_policy(tmp_path, cbt="enabled")
    points = [point("web", "web01", at("2026-11-26 02:00"))]
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01", cbt=True)])], points))
    assert not result.has_changes
    assert [n.level for n in result.notices] == ["info"]  # the free-licence digest note


def test_fingerprint_tracks_facts_not_time_or_free_space(tmp_path: Path) -> None:
    desired = web_policy(tmp_path)
    base = observed(NOW, [host("esxi1", [vm("web01")])])
    later = observed(NOW + timedelta(hours=1), [host("esxi1", [vm("web01")], free=10 * GiB)])
    assert fingerprint(desired, base) == fingerprint(desired, later)
    changed = [
        observed(NOW, [host("esxi1", [vm("web01", cbt=True)])]),
        observed(NOW, [host("esxi1", [vm("web01", power="poweredOff")])]),
        observed(NOW, [host("esxi1", [vm("web01", snapshots=[snapshot("x")])])]),
        observed(NOW, [down("esxi1")]),
        observed(NOW, [host("esxi1", [vm("web01")])], [point("web", "web01", NOW)]),
        observed(
            NOW,
            [host("esxi1", [vm("web01")])],
            history={backup_key("web", "esxi1", "web01"): RunRecord(retry_after=NOW)},
        ),
    ]
    prints = {fingerprint(desired, o) for o in changed}
    assert len(prints) == len(changed)
    assert fingerprint(desired, base) not in prints
    assert plan(desired, base).observed_fingerprint == fingerprint(desired, base)


def test_notices_are_unique_and_ordered_by_level(tmp_path: Path) -> None:
    desired = load_desired(
        tmp_path,
        policy_doc("web", "esxi1", ["web01"], cbt="enabled"),
        policy_doc("web2", "esxi1", ["web01"], cbt="enabled", repository="nas"),
    )
    result = plan(desired, observed(NOW, [host("esxi1", [vm("web01", snapshots=[snapshot("mine")])])]))
    assert [n.level for n in result.notices] == ["warning", "info", "info"]
    assert result.notices[0] == Notice(
        "warning", "esxi1/web01", "foreign snapshot 'mine' blocks backup and CBT change"
    )


def test_the_plan_does_not_depend_on_the_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Purity: the same inputs plan the same actions whenever they are planned."""
    desired = web_policy(tmp_path)
    scene = observed(NOW, [host("esxi1", [vm("web01")])])
    first = plan(desired, scene)

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: object = None) -> Frozen:
            raise AssertionError("the planner read the clock")

    monkeypatch.setattr("reconciler.planning.plan.datetime", Frozen, raising=False)
    assert plan(desired, scene) == first


def test_a_temporary_vm_left_by_a_killed_test_restore_is_tested_again_at_once(tmp_path: Path) -> None:
    """The daemon was killed during a test restore: its temporary VM is still registered. The job is not
    due (the verification itself finished), yet that VM's test restore runs again, which removes it."""
    desired = load_desired(
        tmp_path,
        policy_doc("web", "esxi1", ["web01", "db 01"]),
        verify_doc("check", test_restore="{host: esxi1, vms: [web01, db 01]}"),
    )
    points = [point("web", "web01", at("2026-11-26 02:00")), point("web", "db 01", at("2026-11-26 02:00"))]
    history = {verify_key("check"): RunRecord(last_started=at("2026-11-26 05:00"))}
    clean = [host("esxi1", [vm("web01"), vm("db 01")])]
    assert plan(desired, observed(at("2026-11-26 05:30"), clean, points, history=history)).actions == ()
    left = [host("esxi1", [vm("web01"), vm("db 01"), vm("web01-testrestore")])]
    result = plan(desired, observed(at("2026-11-26 05:30"), left, points, history=history))
    (again,) = result.actions
    assert isinstance(again, RunTestRestore) and (again.vm, again.point_id) == ("web01", points[0].id)
    assert "did not finish: its temporary VM 'web01-testrestore' is still on esxi1" in again.reason
    backing_off = {
        verify_key("check"): RunRecord(
            last_started=at("2026-11-26 05:00"), consecutive_failures=1, retry_after=at("2026-11-26 06:00")
        )
    }
    assert plan(desired, observed(at("2026-11-26 05:30"), left, points, history=backing_off)).actions == ()
