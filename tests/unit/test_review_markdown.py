"""``plan --format markdown``: the plan as a pull-request comment, and the review of a change."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

from reconciler.planning.approval import ConfigChange, DestructiveChange, Review
from reconciler.planning.plan import plan
from reconciler.planning.review import markdown_escape, plan_markdown, review_text
from tests.unit.planfixtures import at, host, load_desired, observed, point, policy_doc, snapshot, vm

NOW = at("2026-11-26 03:00")
EVIL = "web*01|<b>x</b>\n+ backup `evil`"
COMMIT = "3f2a1b2c4d5e6f708192a3b4c5d6e7f809102132"

REMOVED = DestructiveChange(
    "policy-removed",
    "old",
    "BackupPolicy 'old' is removed: its VMs are no longer backed up and its 12 restore points in repository"
    " 'nas' become orphaned (kept, never pruned)",
)
REVIEW = Review(
    "main (git:9c8d7e6f5a4b)",
    (
        ConfigChange("BackupPolicy", "old", "removed"),
        ConfigChange("BackupPolicy", "web", "changed", ("retention",)),
    ),
    (REMOVED,),
)

EXPECTED = f"""\
### esxi-reconciler plan for `feature/retention (git:3f2a1b2c4d5e)`

**⛔ Needs approval.** The daemon holds this revision until a commit on top of it whose message ends with \
the trailer `Approve-Destructive: <why>` (signed by a trusted key when signatures are required) approves it:
- BackupPolicy 'old' is removed: its VMs are no longer backed up and its 12 restore points in repository \
'nas' become orphaned (kept, never pruned)

**Config changes against `main (git:9c8d7e6f5a4b)`:**
- BackupPolicy 'old' removed
- BackupPolicy 'web' changed (retention)

**3 to add, 1 to change, 3 to destroy.**

#### Add (3): backups, verifications, test restores
- backup esxi1/web\\*01\\|\\<b>x\\</b>\\\\n+ backup \\`evil\\` -> nas (first run; due since \
2026-11-26 02:00 UTC (daily at 02:00))
- backup esxi1/web01 -> nas (due since 2026-11-26 02:00 UTC (daily at 02:00))
- backup esxi2/app201 -> nas (first run; due since 2026-11-26 02:00 UTC (daily at 02:00))

#### Change (1): CBT switched
- esxi2/app201  cbt: disabled -> enabled (VM is off)

#### Destroy (3): restore points pruned, orphaned snapshots removed, unreferenced data freed
- point web01@2026-11-22T03:00Z of web in nas (retention: beyond keep-last 2)
- point web01@2026-11-23T03:00Z of web in nas (retention: beyond keep-last 2)
- unreferenced data in nas (free the data of 2 pruned points)

#### Not done, and why (1)
- ⚠️ warning esxi1/db01: foreign snapshot 'before upgrade' blocks backup and CBT change

Plan: 1 CBT change, 3 backups, 2 points to prune, 1 garbage collection; 1 warning.
Next scheduled job: 2026-11-27 02:00 UTC.

<sub>Planned against reality observed at 2026-11-26 03:00 UTC; revision `git:{COMMIT}`.</sub>
"""


def the_plan(tmp_path: Path):  # type: ignore[no-untyped-def]
    desired = load_desired(
        tmp_path,
        policy_doc("web", "esxi1", None, retention="{keep_last: 2}"),
        policy_doc("apps", "esxi2", ["app201"], cbt="enabled"),
    )
    points = [point("web", "web01", NOW - timedelta(days=d)) for d in range(1, 5)]
    hosts = [
        host("esxi1", [vm("web01"), vm(EVIL), vm("db01", snapshots=[snapshot("before upgrade")])]),
        host("esxi2", [vm("app201", power="poweredOff")]),
    ]
    return dataclasses.replace(plan(desired, observed(NOW, hosts, points)), revision=f"git:{COMMIT}")


def test_the_pull_request_comment_says_what_is_added_changed_destroyed_and_why(tmp_path: Path) -> None:
    text = plan_markdown(the_plan(tmp_path), revision="feature/retention (git:3f2a1b2c4d5e)", review=REVIEW)
    assert text == EXPECTED


def test_an_approved_change_names_its_approval_and_no_change_says_so(tmp_path: Path) -> None:
    approved = dataclasses.replace(REVIEW, approved_by="commit 0123456789ab (Approve-Destructive: bob)")
    text = plan_markdown(the_plan(tmp_path), revision="x", review=approved)
    assert "**✅ Destructive changes approved** by commit 0123456789ab (Approve-Destructive: bob).\n" in text
    assert "Needs approval" not in text
    empty = plan_markdown(dataclasses.replace(the_plan(tmp_path), actions=(), notices=()), revision="x")
    assert "**0 to add, 0 to change, 0 to destroy.**" in empty
    assert "No changes. Reality matches the desired state." in empty


def test_names_cannot_inject_markdown_or_lines() -> None:
    assert markdown_escape("a\n# b <img src=x> [link](http://e) `c` *d* _e_ | f") == (
        "a\\\\n\\# b \\<img src=x> \\[link\\](http://e) \\`c\\` \\*d\\* \\_e\\_ \\| f"
    )
    assert "\n" not in markdown_escape("x\ny\r\nz")


def test_the_text_review_lists_changes_and_what_needs_approval() -> None:
    assert review_text(REVIEW) == (
        "Compared with main (git:9c8d7e6f5a4b):\n"
        "  BackupPolicy 'old' removed\n"
        "  BackupPolicy 'web' changed (retention)\n"
        "\n"
        "NEEDS APPROVAL: the daemon holds this revision until a commit on top of it whose message ends with"
        " the trailer 'Approve-Destructive: <why>' (signed by a trusted key when signatures are required)"
        " approves it:\n"
        f"  ! {REMOVED.message}\n"
    )
    assert review_text(Review("main")) == "Compared with main:\n  no object changed\n"
