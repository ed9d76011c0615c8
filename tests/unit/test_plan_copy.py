"""Copy policies in the pure planner: when a copy is due, which points it sends, the destination's own
retention, unreachable ends, the run history, and how the plan shows and saves it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from reconciler.config import DesiredState
from reconciler.facts.points import RestorePoint
from reconciler.planning.actions import Plan, PrunePoint, RunCopy
from reconciler.planning.observed import RepositoryObservation, RunRecord, copy_key
from reconciler.planning.plan import plan
from reconciler.planning.render import render_text
from tests.unit.planfixtures import at, host, load_desired, observed, point, policy_doc, repo_doc, vm

NOW = at("2026-11-26 05:00")


def copy_doc(
    *,
    schedule: str = '{daily: {at: "04:00"}}',
    retention: str = "{keep_daily: 3}",
    extra: str = "",
) -> str:
    return f"""---
apiVersion: esxi-reconciler/v1
kind: CopyPolicy
metadata: {{name: offsite}}
spec: {{source: nas, destination: cloud, schedule: {schedule}, retention: {retention}{extra}}}
"""


def desired_with_copy(tmp_path: Path, **copy: str) -> DesiredState:
    return load_desired(
        tmp_path,
        policy_doc("web", "esxi1", ["web01", "db01"], retention="{keep_daily: 30}"),
        copy_doc(**copy),
        repositories=[repo_doc("nas"), repo_doc("cloud")],
    )


def daily(vm_name: str, days: int, *, policy: str = "web") -> list[RestorePoint]:
    last = at("2026-11-26 02:00")
    return [point(policy, vm_name, last - timedelta(days=i)) for i in range(days)]


def plan_for(
    desired: DesiredState,
    source: list[RestorePoint],
    destination: list[RestorePoint],
    *,
    history: dict[str, RunRecord] | None = None,
    cloud_reachable: bool = True,
) -> Plan:
    repos = {
        "nas": RepositoryObservation("nas", reachable=True, points=tuple(source)),
        "cloud": RepositoryObservation(
            "cloud",
            reachable=cloud_reachable,
            error=None if cloud_reachable else "ObjectStoreUnavailable: endpoint timed out",
            points=tuple(destination),
        ),
    }
    hosts = [host("esxi1", [vm("web01"), vm("db01")])]
    # Backups of the day are done: their history says so, so only the copy is due.
    done = {
        f"backup/web/esxi1/{name}": RunRecord(last_started=at("2026-11-26 02:00"))
        for name in ("web01", "db01")
    }
    return plan(desired, observed(NOW, hosts, history={**done, **(history or {})}, repositories=repos))


def copies(result: Plan) -> list[RunCopy]:
    return [a for a in result.actions if isinstance(a, RunCopy)]


def test_due_copy_sends_what_the_destination_lacks_and_its_retention_keeps(tmp_path: Path) -> None:
    desired = desired_with_copy(tmp_path)
    web, db = daily("web01", 5), daily("db01", 5)
    result = plan_for(desired, web + db, [web[1]])
    [action] = copies(result)
    # keep_daily 3 in the destination: the newest three days of each VM; web01's second day is there.
    expected = sorted([web[0], web[2], db[0], db[1], db[2]], key=lambda p: (p.time, p.id))
    assert action.point_ids == tuple(p.id for p in expected)
    assert (action.source, action.destination, action.copy_policy) == ("nas", "cloud", "offsite")
    assert action.reason.endswith("; 5 points of 2 VMs missing in cloud")
    assert "+ copy nas -> cloud by offsite: 5 points (" in render_text(result, color=False)
    assert "Plan: 1 copy" in render_text(result, color=False)
    assert Plan.from_json(result.to_json()) == result  # a saved plan keeps the point ids


def test_filters_and_max_age_narrow_the_copy(tmp_path: Path) -> None:
    desired = desired_with_copy(tmp_path, extra=", vms: ['web*'], max_age: 2d")
    web = daily("web01", 5)
    result = plan_for(desired, web + daily("db01", 5), [])
    [action] = copies(result)
    assert action.point_ids == (web[1].id, web[0].id)  # web01 of the last two days only, oldest first


def test_not_due_and_nothing_to_copy(tmp_path: Path) -> None:
    desired = desired_with_copy(tmp_path)
    web = daily("web01", 2)
    ran = {copy_key("offsite"): RunRecord(last_started=at("2026-11-26 04:00"))}
    assert copies(plan_for(desired, web, [], history=ran)) == []  # ran at 04:00 today: next is tomorrow
    result = plan_for(desired, web, web)
    assert copies(result) == []
    assert any(n.subject == "copy offsite" and "nothing to copy" in n.message for n in result.notices)


def test_a_failed_copy_waits_for_its_backoff(tmp_path: Path) -> None:
    desired = desired_with_copy(tmp_path)
    failed = RunRecord(
        last_started=at("2026-11-26 04:00"),
        consecutive_failures=1,
        retry_after=at("2026-11-26 06:00"),
        last_error="cloud: endpoint timed out",
    )
    result = plan_for(desired, daily("web01", 2), [], history={copy_key("offsite"): failed})
    assert copies(result) == []
    assert any("retrying after" in n.message for n in result.notices if n.subject == "copy offsite")


def test_unreachable_destination_is_a_warning(tmp_path: Path) -> None:
    desired = desired_with_copy(tmp_path)
    result = plan_for(desired, daily("web01", 2), [], cloud_reachable=False)
    assert copies(result) == []
    [warning] = [n for n in result.notices if n.subject == "copy offsite"]
    assert warning.level == "warning" and "repository cloud is unreachable" in warning.message


def test_destination_prunes_copied_points_by_the_copy_policys_retention(tmp_path: Path) -> None:
    desired = desired_with_copy(tmp_path)
    web = daily("web01", 6)
    result = plan_for(desired, web[:1], web)  # the cloud holds six days, keeps three
    pruned = [a for a in result.actions if isinstance(a, PrunePoint)]
    assert {a.point_id for a in pruned} == {p.id for p in web[3:]}
    assert {a.repository for a in pruned} == {"cloud"}
    assert [a.kind for a in result.actions if a.kind in ("prune", "gc")][-1] == "gc"
    # The source keeps them all (the backup policy keeps 30 days), and nothing is copied back.
    assert copies(result) == []


def test_points_no_copy_policy_brings_are_never_pruned_in_the_destination(tmp_path: Path) -> None:
    desired = desired_with_copy(tmp_path, extra=", policies: [web]")
    other = daily("web01", 6, policy="gone")  # a policy that no longer exists, copied by hand
    result = plan_for(desired, [], other)
    assert [a for a in result.actions if isinstance(a, PrunePoint)] == []
    assert any("never pruned automatically" in n.message for n in result.notices if n.subject == "cloud")


def test_suspended_copy_policy_plans_nothing_and_prunes_nothing(tmp_path: Path) -> None:
    desired = desired_with_copy(tmp_path, extra=", suspend: true")
    web = daily("web01", 6)
    result = plan_for(desired, web, web[4:])
    assert copies(result) == [] and [a for a in result.actions if isinstance(a, PrunePoint)] == []
