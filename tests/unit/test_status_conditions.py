"""Conditions derived from one cycle's desired state, observation, plan and outcomes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from reconciler.config import ConfigError, DesiredState, load_config
from reconciler.planning.actions import Notice, Outcome, Plan, RunBackup
from reconciler.planning.observed import RepositoryObservation, RunRecord, backup_key
from reconciler.status.conditions import Condition, config_condition, derive_conditions
from tests.unit.planfixtures import at, down, host, load_desired, observed, point, policy_doc, vm

NOW = at("2026-11-26 03:00")


@pytest.fixture
def desired(tmp_path: Path) -> DesiredState:
    return load_desired(tmp_path, policy_doc("web-daily", "esxi1", ["web01", "db01"]))


def by_name(conditions: list[Condition]) -> dict[tuple[str, str], Condition]:
    return {c.key: c for c in conditions}


def backup(vm_name: str) -> RunBackup:
    return RunBackup(
        reason=f"due since 02:00 (daily {vm_name})",
        policy="web-daily",
        host_name="esxi1",
        vm=vm_name,
        vmid="1",
        repository="nas",
    )


def plan_of(*actions: RunBackup, notices: tuple[Notice, ...] = ()) -> Plan:
    return Plan(created=NOW, revision="r", observed_fingerprint="f", actions=actions, notices=notices)


def test_everything_backed_up_is_ready_with_last_success_and_next_due(desired: DesiredState) -> None:
    points = [point("web-daily", name, at("2026-11-26 02:00")) for name in ("web01", "db01")]
    seen = observed(NOW, [host("esxi1", [vm("web01"), vm("db01")]), host("esxi2", [])], points)

    c = by_name(derive_conditions(desired, seen, plan=plan_of()))

    web = c[("vm", "esxi1/web01")]
    assert (web.status, web.reason) == ("Ready", "UpToDate")
    assert web.next_due == at("2026-11-27 02:00")
    assert web.revision == desired.revision.id
    assert c[("host", "esxi1")].status == "Ready"
    assert c[("policy", "web-daily")].status == "Ready"
    repo = c[("repository", "nas")]
    assert (repo.status, repo.message) == ("Ready", "2 restore points")
    assert repo.last_success == at("2026-11-26 02:10")


def test_a_due_backup_is_reconciling_until_its_outcome_arrives(desired: DesiredState) -> None:
    seen = observed(NOW, [host("esxi1", [vm("web01"), vm("db01")]), host("esxi2", [])])
    action = backup("web01")
    plan = plan_of(action)

    before = by_name(derive_conditions(desired, seen, plan=plan))
    assert (before[("vm", "esxi1/web01")].status, before[("vm", "esxi1/web01")].reason) == (
        "Reconciling",
        "BackupDue",
    )
    assert before[("vm", "esxi1/web01")].message == action.reason
    assert before[("policy", "web-daily")].status == "Reconciling"

    done = Outcome(action, "ok", NOW, NOW + timedelta(minutes=3))
    history = {backup_key("web-daily", "esxi1", "web01"): RunRecord(NOW, NOW + timedelta(minutes=3))}
    after = by_name(derive_conditions(desired, seen, plan=plan, outcomes=[done], history=history))
    assert after[("vm", "esxi1/web01")].status == "Ready"
    assert after[("vm", "esxi1/web01")].last_success == NOW + timedelta(minutes=3)
    assert after[("policy", "web-daily")].status == "Ready"
    # The observation predates the backup; the repository counts the point it just received.
    assert after[("repository", "nas")].message == "1 restore point"
    assert after[("repository", "nas")].last_success == NOW + timedelta(minutes=3)


def test_a_failed_backup_is_stalled_with_the_error_and_the_retry_time(desired: DesiredState) -> None:
    seen = observed(NOW, [host("esxi1", [vm("web01"), vm("db01")]), host("esxi2", [])])
    action = backup("web01")
    failed = Outcome(action, "failed", NOW, NOW + timedelta(minutes=1), error="snapshot timed out")
    retry = NOW + timedelta(minutes=2)
    history = {
        backup_key("web-daily", "esxi1", "web01"): RunRecord(NOW, None, 1, retry, "snapshot timed out")
    }

    c = by_name(derive_conditions(desired, seen, plan=plan_of(action), outcomes=[failed], history=history))

    web = c[("vm", "esxi1/web01")]
    assert (web.status, web.reason) == ("Stalled", "BackupFailed")
    assert "snapshot timed out" in web.message
    policy = c[("policy", "web-daily")]
    assert (policy.status, policy.reason) == ("Stalled", "BackupFailed")
    assert "retry after 2026-11-26 03:02Z" in policy.message
    assert policy.next_due == retry

    # Next cycle, before the retry: still Stalled from the history alone, with the retry time.
    later = by_name(derive_conditions(desired, observed(NOW, seen.hosts.values()), history=history))
    assert later[("vm", "esxi1/web01")].status == "Stalled"
    assert "retry after 2026-11-26 03:02Z" in later[("vm", "esxi1/web01")].message


def test_an_unreachable_host_stalls_it_and_the_vms_it_had(desired: DesiredState) -> None:
    history = {backup_key("web-daily", "esxi1", "web01"): RunRecord(NOW, NOW)}
    seen = observed(NOW, [down("esxi1"), host("esxi2", [])], history=history)

    c = by_name(derive_conditions(desired, seen, plan=plan_of()))

    assert (c[("host", "esxi1")].status, c[("host", "esxi1")].reason) == ("Stalled", "HostUnreachable")
    assert "Connection refused" in c[("host", "esxi1")].message
    web = c[("vm", "esxi1/web01")]
    assert (web.status, web.reason) == ("Stalled", "HostUnreachable")
    assert web.last_success == NOW
    assert c[("host", "esxi2")].status == "Ready"


def test_a_vm_named_by_a_policy_but_missing_is_stalled(desired: DesiredState) -> None:
    seen = observed(NOW, [host("esxi1", [vm("web01")]), host("esxi2", [])])

    c = by_name(derive_conditions(desired, seen, plan=plan_of()))

    assert (c[("vm", "esxi1/db01")].status, c[("vm", "esxi1/db01")].reason) == ("Stalled", "VmNotFound")


def test_unreachable_repository_and_warning_notices_need_attention(desired: DesiredState) -> None:
    repos = {"nas": RepositoryObservation("nas", reachable=False, error="not mounted")}
    seen = observed(NOW, [host("esxi1", [vm("web01"), vm("db01")]), host("esxi2", [])], repositories=repos)
    warn = Notice("warning", "esxi1/db01", "foreign snapshot 'before upgrade' blocks backups")
    pending = Notice("pending", "esxi1/web01", "CBT enabled at the VM's next power-off")

    c = by_name(derive_conditions(desired, seen, plan=plan_of(notices=(warn, pending))))

    repo = c[("repository", "nas")]
    assert (repo.status, repo.reason, repo.message) == ("Stalled", "RepositoryUnreachable", "not mounted")
    db = c[("vm", "esxi1/db01")]
    assert (db.status, db.reason, db.message) == ("Stalled", "NeedsAttention", warn.message)
    web = c[("vm", "esxi1/web01")]
    assert (web.status, web.reason) == ("Reconciling", "Pending")


def test_an_invalid_config_names_the_file_line_and_field(tmp_path: Path) -> None:
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "repo.yaml").write_text(
        "apiVersion: esxi-reconciler/v1\nkind: Repository\nmetadata: {name: r}\nspec:\n"
        "  backend: {type: local, path: /srv/r}\n  encryption: {enabled: maybe}\n"
    )
    with pytest.raises(ConfigError) as error:
        load_config(directory)

    condition = config_condition(NOW, revision="git:abc", issues=error.value.issues)

    assert (condition.kind, condition.status, condition.reason) == ("config", "Stalled", "InvalidConfig")
    assert condition.message.startswith("repo.yaml:6:")
    assert "spec.encryption.enabled" in condition.message
    assert condition.revision == "git:abc"  # the revision still running


def test_a_valid_config_is_ready_and_says_what_it_declares(desired: DesiredState) -> None:
    condition = config_condition(NOW, revision=desired.revision.id, desired=desired)
    assert (condition.status, condition.reason) == ("Ready", "Loaded")
    assert condition.message == "2 hosts, 1 repository, 1 backup policy, 0 verify policies"


def test_a_killed_overwrite_stalls_its_vm_with_the_two_ways_on(desired: DesiredState) -> None:
    """A VM an interrupted ``restore --overwrite`` left powered off is Stalled (``OverwriteUnfinished``,
    with the commands) whether a policy protects it or not, even while its backup is due; ``plan``
    shows the same as a warning. Once the journal is gone, the VM is as before."""
    from dataclasses import replace

    from reconciler.planning.plan import plan as make_plan

    notice = "VM 'web01' on esxi1 is powered off after an overwrite that did not finish (...): run `a` or `b`"
    other = "VM 'scratch' on esxi1 is powered off after an overwrite that did not finish (...)"
    esxi1 = host("esxi1", [vm("web01", power="poweredOff"), vm("db01"), vm("scratch", power="poweredOff")])
    seen = observed(
        NOW,
        [replace(esxi1, unfinished_overwrites=(("web01", notice), ("scratch", other))), host("esxi2", [])],
    )
    planned = make_plan(desired, seen)
    assert any(isinstance(a, RunBackup) and a.vm == "web01" for a in planned.actions)  # due: not hidden by it
    assert Notice("warning", "esxi1/web01", notice) in planned.notices
    assert Notice("warning", "esxi1/scratch", other) in planned.notices

    c = by_name(derive_conditions(desired, seen, plan=planned))
    web, scratch = c[("vm", "esxi1/web01")], c[("vm", "esxi1/scratch")]
    assert (web.status, web.reason, web.message) == ("Stalled", "OverwriteUnfinished", notice)
    assert (scratch.status, scratch.reason, scratch.message) == ("Stalled", "OverwriteUnfinished", other)
    assert c[("vm", "esxi1/db01")].reason == "BackupDue"

    after = by_name(derive_conditions(desired, observed(NOW, [esxi1, host("esxi2", [])]), plan=planned))
    assert after[("vm", "esxi1/web01")].reason == "BackupDue" and ("vm", "esxi1/scratch") not in after
