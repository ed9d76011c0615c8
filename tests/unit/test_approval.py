"""Which changes of the config need approval before the daemon applies them (pure rules)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from reconciler.config import DesiredState
from reconciler.planning.approval import Review, config_changes, destructive_changes
from reconciler.planning.observed import RepositoryObservation
from tests.unit.planfixtures import at, load_desired, point, policy_doc, repo_doc

NOW = at("2026-11-26 03:00")


def config(tmp_path: Path, name: str, *documents: str, repositories: list[str] | None = None) -> DesiredState:
    directory = tmp_path / name
    directory.mkdir()
    return load_desired(directory, *documents, repositories=repositories)


def daily_points(policy: str, vm: str, days: int) -> list:  # type: ignore[type-arg]
    return [point(policy, vm, NOW - timedelta(days=d)) for d in range(days)]


def repos(points: list, name: str = "nas") -> dict[str, RepositoryObservation]:  # type: ignore[type-arg]
    return {name: RepositoryObservation(name, reachable=True, points=tuple(points))}


def test_nothing_changed_nothing_to_approve(tmp_path: Path) -> None:
    base = config(tmp_path, "a", policy_doc("web", "esxi1", ["web01"]))
    same = config(tmp_path, "b", policy_doc("web", "esxi1", ["web01"]))
    observed = repos(daily_points("web", "web01", 3))
    assert destructive_changes(base, observed, same, observed) == ()
    assert config_changes(base, same) == ()


def test_a_removed_policy_orphans_its_points(tmp_path: Path) -> None:
    base = config(tmp_path, "a", policy_doc("web", "esxi1", ["web01"]), policy_doc("db", "esxi1", ["db01"]))
    proposed = config(tmp_path, "b", policy_doc("db", "esxi1", ["db01"]))
    observed = repos(daily_points("web", "web01", 3) + daily_points("db", "db01", 2))
    (change,) = destructive_changes(base, observed, proposed, observed)
    assert change.rule == "policy-removed" and change.subject == "web"
    assert change.message == (
        "BackupPolicy 'web' is removed: its VMs are no longer backed up and its 3 restore points in"
        " repository 'nas' become orphaned (kept, never pruned)"
    )
    assert [str(c) for c in config_changes(base, proposed)] == ["BackupPolicy 'web' removed"]


def test_a_policy_pointed_at_another_repository_orphans_its_points(tmp_path: Path) -> None:
    two = [repo_doc("nas"), repo_doc("usb")]
    base = config(tmp_path, "a", policy_doc("web", "esxi1", ["web01"]), repositories=two)
    proposed = config(
        tmp_path, "b", policy_doc("web", "esxi1", ["web01"], repository="usb"), repositories=two
    )
    observed = {**repos(daily_points("web", "web01", 2)), **repos([], "usb")}
    (change,) = destructive_changes(base, observed, proposed, observed)
    assert change.rule == "policy-moved"
    assert "now writes to repository 'usb' instead of 'nas': its 2 restore points in 'nas'" in change.message
    assert [str(c) for c in config_changes(base, proposed)] == ["BackupPolicy 'web' changed (repository)"]


def test_a_shorter_retention_under_the_guard_is_ordinary(tmp_path: Path) -> None:
    base = config(tmp_path, "a", policy_doc("web", "esxi1", ["web01"], retention="{keep_last: 10}"))
    proposed = config(tmp_path, "b", policy_doc("web", "esxi1", ["web01"], retention="{keep_last: 7}"))
    observed = repos(daily_points("web", "web01", 10))  # 3 expire; the guard is 100
    assert destructive_changes(base, observed, proposed, observed) == ()
    (change,) = config_changes(base, proposed)
    assert change.fields == ("retention",)


def test_a_shorter_retention_over_its_own_guard_prunes_nothing_so_needs_no_approval(tmp_path: Path) -> None:
    """The planner itself holds back a run over the guard (and warns): nothing is deleted."""
    guarded = [repo_doc(max_deletions=5)]
    base = config(
        tmp_path,
        "a",
        policy_doc("web", "esxi1", ["web01"], retention="{keep_last: 10}"),
        repositories=guarded,
    )
    proposed = config(
        tmp_path, "b", policy_doc("web", "esxi1", ["web01"], retention="{keep_last: 2}"), repositories=guarded
    )
    observed = repos(daily_points("web", "web01", 10))
    assert destructive_changes(base, observed, proposed, observed) == ()


def test_raising_the_guard_to_let_a_mass_deletion_through_needs_approval(tmp_path: Path) -> None:
    base = config(
        tmp_path,
        "a",
        policy_doc("web", "esxi1", ["web01"], retention="{keep_last: 10}"),
        repositories=[repo_doc(max_deletions=5)],
    )
    proposed = config(
        tmp_path,
        "b",
        policy_doc("web", "esxi1", ["web01"], retention="{keep_last: 2}"),
        repositories=[repo_doc(max_deletions=50)],
    )
    observed = repos(daily_points("web", "web01", 10))
    (change,) = destructive_changes(base, observed, proposed, observed)
    assert change.rule == "mass-prune" and change.subject == "nas"
    assert change.message == (
        "repository 'nas': 8 restore points would be pruned in one run, more than max_deletions_per_run 5"
        " of the applied config (raised to 50)"
    )
    assert [str(c) for c in config_changes(base, proposed)] == [
        "Repository 'nas' changed (prune)",
        "BackupPolicy 'web' changed (retention)",
    ]


def test_a_raised_guard_on_a_repository_that_cannot_be_read_is_held(tmp_path: Path) -> None:
    base = config(tmp_path, "a", policy_doc("web", "esxi1", ["web01"], retention="{keep_last: 10}"))
    shorter = config(tmp_path, "b", policy_doc("web", "esxi1", ["web01"], retention="{keep_last: 2}"))
    down = {"nas": RepositoryObservation("nas", reachable=False, error="OSError: mount gone")}
    # A shorter retention under the same guard cannot prune more than the guard: not held.
    assert destructive_changes(base, down, shorter, down) == ()
    raised = config(
        tmp_path,
        "c",
        policy_doc("web", "esxi1", ["web01"], retention="{keep_last: 2}"),
        repositories=[repo_doc(max_deletions=1000)],
    )
    (change,) = destructive_changes(base, down, raised, down)
    assert change.rule == "prune-unknown"
    assert change.message == (
        "repository 'nas': max_deletions_per_run is raised from 100 to 1000, but its restore points cannot be"
        " counted now (OSError: mount gone); checked again at the next fetch"
    )


def test_pruning_disabled_is_never_a_mass_deletion(tmp_path: Path) -> None:
    off = [repo_doc(prune=False, max_deletions=1)]
    base = config(
        tmp_path, "a", policy_doc("web", "esxi1", ["web01"], retention="{keep_last: 10}"), repositories=off
    )
    proposed = config(
        tmp_path, "b", policy_doc("web", "esxi1", ["web01"], retention="{keep_last: 1}"), repositories=off
    )
    observed = repos(daily_points("web", "web01", 10))
    assert destructive_changes(base, observed, proposed, observed) == ()


def test_review_needs_approval_until_approved() -> None:
    review = Review("main (git:abc)", destructive=())
    assert not review.needs_approval
    from reconciler.planning.approval import DestructiveChange

    change = DestructiveChange("policy-removed", "web", "BackupPolicy 'web' is removed")
    assert Review("main", destructive=(change,)).needs_approval
    approved = Review("main", destructive=(change,), approved_by="commit 1234 (Approve-Destructive: ok)")
    assert not approved.needs_approval
    assert approved.to_dict()["needs_approval"] is False
