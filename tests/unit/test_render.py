"""The plan as text: Terraform-like lines a reviewer reads, notices, the summary, safe names, colour."""

from __future__ import annotations

from datetime import datetime

from reconciler.planning.actions import (
    Action,
    CollectGarbage,
    Notice,
    Plan,
    PrunePoint,
    RemoveSnapshot,
    RunBackup,
    RunVerify,
    SetCbt,
)
from reconciler.planning.render import render_text, summary
from tests.unit.planfixtures import at

NOW = at("2026-11-26 03:00")


def make(
    actions: tuple[Action, ...] = (), notices: tuple[Notice, ...] = (), next_due: datetime | None = None
) -> Plan:
    return Plan(
        created=NOW,
        revision="git:abc",
        observed_fingerprint="f" * 64,
        actions=actions,
        notices=notices,
        next_due=next_due,
    )


CBT = SetCbt(
    reason="stun cycle: VM is running",
    host_name="esxi1",
    vm="web01",
    vmid="1",
    enabled=True,
    method="reconfigure+stun",
    policy="web",
)
BACKUP = RunBackup(
    reason="due since 2026-11-26 02:00 UTC (daily at 02:00)",
    policy="web",
    host_name="esxi1",
    vm="web01",
    vmid="1",
    repository="nas",
    due_since=at("2026-11-26 02:00"),
)
PRUNE = PrunePoint(
    reason="retention: beyond keep-daily 7",
    repository="nas",
    point_id="20261001T020000000000Z-0000abcd",
    policy="web",
    vm="web01",
    time=at("2026-10-01 02:00"),
)
PRUNE2 = PrunePoint(
    reason="retention: beyond keep-daily 7",
    repository="nas",
    point_id="20261002T020000000000Z-0000abcd",
    policy="web",
    vm="web01",
    time=at("2026-10-02 02:00"),
)
GC = CollectGarbage(reason="free the data of 2 pruned points", repository="nas")
ORPHAN = RemoveSnapshot(
    reason="left behind by an interrupted run",
    host_name="esxi1",
    vm="db 01",
    vmid="2",
    snapshot_id="7",
    snapshot_name="esxi-reconciler-20261126T010000Z-abcd",
)
VERIFY = RunVerify(
    reason="due since 2026-11-26 02:30 UTC (daily at 02:30)",
    verify_policy="check",
    repository="nas",
    read_data_percent=10,
)


def test_actions_read_like_a_diff() -> None:
    text = render_text(make((ORPHAN, CBT, BACKUP, PRUNE, PRUNE2, GC, VERIFY)), color=False)
    assert text.splitlines() == [
        "  - snapshot esxi1/db 01 'esxi-reconciler-20261126T010000Z-abcd'"
        " (left behind by an interrupted run)",
        "  ~ esxi1/web01  cbt: disabled -> enabled (stun cycle: VM is running)",
        "  + backup esxi1/web01 -> nas (due since 2026-11-26 02:00 UTC (daily at 02:00))",
        "  - point web01@2026-10-01T02:00Z of web in nas (retention: beyond keep-daily 7)",
        "  - point web01@2026-10-02T02:00Z of web in nas (retention: beyond keep-daily 7)",
        "  - unreferenced data in nas (free the data of 2 pruned points)",
        "  ~ verify nas by check, reading 10 % of the data (due since 2026-11-26 02:30 UTC (daily at 02:30))",
        "",
        "Plan: 1 orphaned snapshot to remove, 1 CBT change, 1 backup, 2 points to prune,"
        " 1 garbage collection, 1 verification.",
    ]


def test_notices_follow_the_actions_and_are_counted() -> None:
    notices = (
        Notice("warning", "esxi1/db 01", "foreign snapshot 'x' blocks backup and CBT change"),
        Notice("warning", "policy web", "VM 'gone' not found on host esxi1"),
        Notice("pending", "esxi1/web01", "CBT enable pending until the VM is powered off"),
    )
    text = render_text(make((BACKUP, BACKUP), notices, next_due=at("2026-11-27 02:00")), color=False)
    lines = text.splitlines()
    assert lines[2:] == [
        "",
        "  ! warning esxi1/db 01: foreign snapshot 'x' blocks backup and CBT change",
        "  ! warning policy web: VM 'gone' not found on host esxi1",
        "  … pending esxi1/web01: CBT enable pending until the VM is powered off",
        "",
        "Next scheduled job: 2026-11-27 02:00 UTC",
        "Plan: 2 backups; 1 pending, 2 warnings.",
    ]


def test_nothing_to_do() -> None:
    assert render_text(make(), color=False) == "No changes. Reality matches the desired state.\n"
    only_notes = make(notices=(Notice("info", "nas", "3 expired points kept"),))
    assert summary(only_notes) == "No changes; 1 note."
    assert render_text(only_notes, color=False).splitlines()[0] == "  i info nas: 3 expired points kept"


def test_control_characters_in_names_are_escaped() -> None:
    hostile = RunBackup(
        reason="first run",
        policy="p",
        host_name="esxi1",
        vm='evil\x1b[2J\r\n"q" $(x) ファイル',
        vmid="3",
        repository="nas",
    )
    (line, _, _) = render_text(make((hostile,)), color=False).splitlines()
    assert line == '  + backup esxi1/evil\\x1b[2J\\r\\n"q" $(x) ファイル -> nas (first run)'
    assert "\x1b" not in render_text(make((hostile,)), color=False)


def test_colour_only_when_asked() -> None:
    plain = render_text(make((BACKUP, PRUNE)), color=False)
    coloured = render_text(make((BACKUP, PRUNE)), color=True)
    assert "\x1b[" not in plain
    assert "\x1b[32m  + backup" in coloured and "\x1b[31m  - point" in coloured
    assert coloured.replace("\x1b[32m", "").replace("\x1b[31m", "").replace("\x1b[0m", "") == plain
