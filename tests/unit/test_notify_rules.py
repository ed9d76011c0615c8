"""Which events notify and when (pure): problems from conditions, history and observations; one message
per change, delays, recoveries, the rate limit, suspend, the summary's schedule, and the words."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from reconciler.config.model import DesiredState, Notifier
from reconciler.notify.rules import (
    CONFIG_SCOPE,
    Check,
    Facts,
    NotifierState,
    Period,
    Problem,
    decide,
    problems,
    summary_due,
    summary_message,
)
from reconciler.planning.actions import Notice, Plan
from reconciler.planning.observed import RepositoryObservation, RunRecord, backup_key
from reconciler.planning.plan import plan
from reconciler.status.conditions import Condition, config_condition, derive_conditions
from tests.unit.planfixtures import at, down, host, load_desired, observed, policy_doc, vm

NOW = at("2026-11-26 03:00")
NOTIFIER = """---
apiVersion: esxi-reconciler/v1
kind: Notifier
metadata: {name: ops}
spec:
  url: "json://127.0.0.1/hook"
  rate_limit: {messages: 2, per: 1h}
  summary: {daily: {at: "08:00"}}
"""


@pytest.fixture
def desired(tmp_path: Path) -> DesiredState:
    return load_desired(tmp_path, policy_doc("web-daily", "esxi1", ["web01", "db01"]), NOTIFIER)


@pytest.fixture
def ops(desired: DesiredState) -> Notifier:
    return desired.notifiers["ops"]


def failing(vm_name: str, error: str = "snapshot failed: disk locked") -> Condition:
    return Condition("vm", f"esxi1/{vm_name}", "Stalled", "BackupFailed", f"web-daily: {error}")


def problem(key: str = "backup-failed/vm/esxi1/web01", event: str = "backup-failed") -> Problem:
    return Problem(key, event, "VM esxi1/web01", "web-daily: snapshot failed")


def test_an_unreachable_host_is_one_problem_naming_its_vms_and_the_cause(
    desired: DesiredState, ops: Notifier
) -> None:
    history = {
        backup_key("web-daily", "esxi1", name): RunRecord(at("2026-11-26 02:00"), at("2026-11-26 02:10"))
        for name in ("web01", "db01")
    }
    seen = observed(NOW, [down("esxi1"), host("esxi2", [])], history=history)
    conditions = derive_conditions(desired, seen, plan=plan(desired, seen))
    found = problems(Facts(NOW, conditions, history, observed=seen, desired=desired), ops)
    assert len(found) == 1, (found, [(c.kind, c.name, c.status, c.reason) for c in conditions])
    (only,) = found
    assert (only.key, only.event, only.subject) == ("backup-failed/host/esxi1", "backup-failed", "host esxi1")
    assert "Connection refused" in only.message and "web01" in only.message and "db01" in only.message


def test_a_vm_left_powered_off_by_a_killed_overwrite_is_told_as_an_error(
    desired: DesiredState, ops: Notifier
) -> None:
    """Its backups go on, so it is not ``backup-failed``: an ``error`` naming the VM, with the commands."""
    notice = "VM 'scratch' on esxi1 is powered off after an overwrite that did not finish (...): run `x`"
    esxi1 = replace(
        host("esxi1", [vm("web01"), vm("db01"), vm("scratch")]), unfinished_overwrites=(("scratch", notice),)
    )
    seen = observed(NOW, [esxi1, host("esxi2", [])])
    conditions = derive_conditions(desired, seen, plan=plan(desired, seen))
    (found,) = problems(Facts(NOW, conditions, {}, observed=seen, desired=desired), ops)
    assert (found.key, found.event, found.subject, found.message) == (
        "error/vm/esxi1/scratch",
        "error",
        "VM esxi1/scratch",
        notice,
    )


def test_stale_when_the_last_success_is_older_than_the_rpo(desired: DesiredState, ops: Notifier) -> None:
    record = RunRecord(at("2026-11-26 02:00"), at("2026-11-23 02:10"), 3, None, "host unreachable")
    facts = Facts(NOW, (), {backup_key("web-daily", "esxi1", "web01"): record}, desired=desired)
    (stale,) = problems(facts, ops)
    assert stale.key == "stale/web-daily/esxi1/web01"
    assert stale.message == (
        "last success 2026-11-23 02:10Z, older than the RPO of policy web-daily (2d);"
        " last error: host unreachable"
    )


def test_space_cbt_and_checks(desired: DesiredState, ops: Notifier) -> None:
    gib = 1 << 30
    seen = observed(NOW, [host("esxi1", [vm("web01")], free=5 * gib, capacity=100 * gib), host("esxi2", [])])
    seen = replace(
        seen,
        repositories={
            "nas": RepositoryObservation("nas", True, capacity_bytes=1000 * gib, free_bytes=50 * gib)
        },
    )
    cbt = Condition(
        "vm", "esxi1/web01", "Reconciling", "Pending", "CBT enable pending until the VM is powered off"
    )
    checks = {
        ("verify", "nas"): Check("failed", "repository nas: 2 problems: chunk ab12… is damaged"),
        ("test-restore", "esxi2/web01"): Check("failed", "did not power on"),
        ("verify", "other"): Check("ok", "fine"),
    }
    found = {
        p.key: p for p in problems(Facts(NOW, (cbt,), checks=checks, observed=seen, desired=desired), ops)
    }
    assert found["low-space/datastore/esxi1/ds1"].message == (
        "5.0 GiB of 100.0 GiB free, below the host's floor: no snapshot (so no backup) of its VMs"
    )
    assert set(found) >= {
        "low-space/repository/nas",
        "cbt-pending/esxi1/web01",
        "verify-damage/verify/nas",
        "test-restore-failed/esxi2/web01",
    }
    assert found["low-space/repository/nas"].message == "50.0 GiB of 1000.0 GiB free on its volume"
    assert found["cbt-pending/esxi1/web01"].delay == timedelta(hours=24)


def test_one_message_per_change_not_per_cycle_then_a_recovery(ops: Notifier) -> None:
    state = NotifierState()
    first = decide(ops, state, [problem()], NOW)
    assert first.message is not None
    assert first.message.title == "[esxi-reconciler] Backup failed: VM esxi1/web01"
    assert "web-daily: snapshot failed" in first.message.body
    state = first.state
    for minutes in (5, 10, 15):  # the same problem, cycle after cycle, with new words: silence
        again = decide(
            ops, state, [replace(problem(), message=f"retry {minutes}")], NOW + timedelta(minutes=minutes)
        )
        assert again.message is None
        state = again.state
    fixed = decide(ops, state, [], NOW + timedelta(minutes=20))
    assert fixed.message is not None and fixed.message.title == "[esxi-reconciler] Recovered: VM esxi1/web01"
    assert fixed.message.level == "success" and fixed.message.events == ("recovered",)
    assert decide(ops, fixed.state, [], NOW + timedelta(minutes=25)).message is None
    assert fixed.state.problems == {}


def test_a_problem_gone_before_its_delay_is_never_mentioned(ops: Notifier) -> None:
    slow = replace(problem("cbt-pending/esxi1/web01", "cbt-pending"), delay=timedelta(hours=24))
    d = decide(ops, NotifierState(), [slow], NOW)
    assert d.message is None
    d = decide(ops, d.state, [slow], NOW + timedelta(hours=23))
    assert d.message is None
    gone = decide(ops, d.state, [], NOW + timedelta(hours=23, minutes=30))
    assert gone.message is None and gone.state.problems == {}
    # a config load in between evaluates only the config: it does not tell the CBT change early
    config_only = decide(ops, d.state, [], NOW + timedelta(hours=23, minutes=1), scope=CONFIG_SCOPE)
    assert config_only.message is None and "cbt-pending/esxi1/web01" in config_only.state.problems
    restored = NotifierState.from_dict(config_only.state.to_dict())  # as the store keeps it
    late = decide(ops, restored, [slow], NOW + timedelta(hours=24))
    assert late.message is not None and late.message.title.startswith("[esxi-reconciler] CBT change pending")


def test_the_rate_limit_holds_and_then_sends_everything_together(ops: Notifier) -> None:
    state = NotifierState()
    for i, minute in enumerate((0, 1)):
        so_far = [problem(f"backup-failed/vm/esxi1/vm{j}") for j in range(i + 1)]
        d = decide(ops, state, so_far, NOW + timedelta(minutes=minute))
        assert d.message is not None
        state = d.state
    found = [problem(f"backup-failed/vm/esxi1/vm{i}") for i in range(5)]
    held = decide(ops, state, found, NOW + timedelta(minutes=2))
    assert held.message is None and held.held
    held = decide(ops, held.state, found, NOW + timedelta(minutes=30))
    assert held.message is None and held.held
    later = decide(ops, held.state, found, NOW + timedelta(minutes=61))
    assert later.message is not None and later.message.title == "[esxi-reconciler] 3 problems"
    assert "held back by the rate limit since 2026-11-26 03:02Z" in later.message.body
    assert decide(ops, later.state, found, NOW + timedelta(minutes=62)).message is None


def test_only_wanted_events_and_a_suspended_notifier_says_nothing(ops: Notifier) -> None:
    quiet = replace(ops, events=frozenset({"stale"}))
    assert decide(quiet, NotifierState(), [problem()], NOW).message is None
    suspended = replace(ops, suspend=True)
    d = decide(suspended, NotifierState(), [problem()], NOW)
    assert d.message is None and d.state.problems["backup-failed/vm/esxi1/web01"].told
    # unsuspended later: no flood of what happened meanwhile
    assert decide(ops, d.state, [problem()], NOW + timedelta(hours=1)).message is None


def test_the_config_scope_leaves_the_other_problems_alone(desired: DesiredState, ops: Notifier) -> None:
    told = decide(ops, NotifierState(), [problem()], NOW).state
    from reconciler.config.errors import ConfigIssue

    rejected = config_condition(
        NOW, issues=[ConfigIssue("p.yaml", 3, 5, "spec.host", "no Host named 'esx1'")]
    )
    found = problems(Facts(NOW, (rejected,)), ops)
    d = decide(ops, told, found, NOW + timedelta(minutes=1), scope=CONFIG_SCOPE)
    assert d.message is not None and d.message.title == "[esxi-reconciler] Config rejected: the config"
    assert "p.yaml:3:5 spec.host: no Host named 'esx1'" in d.message.body
    assert "backup-failed/vm/esxi1/web01" in d.state.problems  # not evaluated, not recovered


def test_the_summary_comes_on_its_schedule_counted_from_the_start(
    desired: DesiredState, ops: Notifier
) -> None:
    due, state = summary_due(ops, NotifierState(), NOW)
    assert not due and state.last_summary == NOW
    assert not summary_due(ops, state, at("2026-11-26 07:59"))[0]
    assert summary_due(ops, state, at("2026-11-26 08:00"))[0]
    conditions = [
        Condition("vm", "esxi1/web01", "Ready", "UpToDate", "ok", last_success=at("2026-11-26 02:10")),
        failing("db01"),
    ]
    period = Period(
        NOW, {("backup", "ok"): 3, ("backup", "failed"): 1}, {"bytes_read": 3 << 30, "bytes_stored": 1 << 20}
    )
    message = summary_message("ops", Facts(at("2026-11-26 08:00"), conditions), period, [problem()])
    assert message.title == "[esxi-reconciler] Summary: 2 VMs, 1 need attention"
    assert "- backups: 3 ok, 1 failed" in message.body
    assert "- esxi1/web01: 2026-11-26 02:10Z (Ready)" in message.body
    assert "- esxi1/db01: never (Stalled: BackupFailed)" in message.body


def test_notices_and_plans_feed_the_same_words(desired: DesiredState, ops: Notifier) -> None:
    seen = observed(NOW, [host("esxi1", [vm("web01"), vm("db01")]), host("esxi2", [])])
    the_plan = Plan(
        NOW,
        "r",
        "f",
        notices=(Notice("warning", "esxi1/web01", "snapshot 'keep me' is not ours: no backup"),),
    )
    conditions = derive_conditions(desired, seen, plan=the_plan)
    found = {p.key: p for p in problems(Facts(NOW, conditions, desired=desired, observed=seen), ops)}
    assert found["backup-failed/vm/esxi1/web01"].message == "snapshot 'keep me' is not ours: no backup"


def test_status_says_when_a_notifiers_last_message_was_not_sent(ops: Notifier) -> None:
    from reconciler.commands.status import notify_problems
    from reconciler.status.history import Event

    failed = Event(
        NOW, "notify", "ops", "failed", "x: not sent", detail={"error": "535 authentication failed"}
    )
    sent = replace(failed, outcome="ok", detail={})
    assert notify_problems({"ops": ops}, {("notify", "ops"): sent}) == []
    assert notify_problems({"ops": ops}, {}) == []
    (problem,) = notify_problems({"ops": ops}, {("notify", "ops"): failed})
    assert problem.code == "notify-failed"
    assert problem.message == (
        "notifier ops: the last message was not sent (2026-11-26 03:00Z: 535 authentication failed);"
        " try `esxi-reconciler notify test ops`"
    )
    assert notify_problems({}, {("notify", "ops"): failed}) == []  # no longer configured
