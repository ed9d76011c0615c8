"""What a proposed config changes, and which of its changes need a second look before they are applied.

Pure: the applied ("base") and the proposed desired state, and the restore points observed in their
repositories, in; values out. The daemon holds a fetched commit whose changes are destructive until a
commit approves it (:mod:`reconciler.gitsource.approve`), and ``plan --revision REF --against BASE``
prints the same verdict for a pull request.

A change is **destructive** (rule names in brackets) when:

* a BackupPolicy is removed [``policy-removed``]: its VMs are no longer backed up and its restore points
  become orphaned (kept for ever, never pruned);
* a BackupPolicy writes to another repository [``policy-moved``]: its points in the old one become
  orphaned;
* the proposed config's plan would prune more restore points of a repository in one run than the
  per-run guard of the applied config allows (``max_deletions_per_run``) [``mass-prune``]. The planner
  never prunes more than the guard of the config it plans with, so this needs the guard raised:
  typically a shorter retention together with a raised guard, or a raised guard letting a held-back
  mass deletion through. Counted with the planner's own rule
  (:func:`reconciler.planning.plan.expired_points`);
* the guard is raised for a repository that cannot be read now, so the count is unknown
  [``prune-unknown``]: held until it can be counted (the next fetch checks again).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from reconciler.config.model import DesiredState
from reconciler.planning.observed import RepositoryObservation
from reconciler.planning.plan import expired_points

APPROVAL_TRAILER = "Approve-Destructive"
"""The commit-message trailer that approves destructive changes: ``Approve-Destructive: <why>``, in a
commit after the applied revision, up to the proposed one (signed, when signatures are required)."""

Rule = Literal["policy-removed", "policy-moved", "mass-prune", "prune-unknown"]
ChangeKind = Literal["added", "removed", "changed"]


@dataclass(frozen=True)
class DestructiveChange:
    """One reason a proposed config needs approval."""

    rule: Rule
    subject: str
    """The object: a policy or repository name."""
    message: str

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "subject": self.subject, "message": self.message}


@dataclass(frozen=True)
class ConfigChange:
    """One object added, removed or changed between two configs; ``fields``: which of its settings."""

    kind: str
    name: str
    change: ChangeKind
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        detail = f" ({', '.join(self.fields)})" if self.fields else ""
        return f"{self.kind} {self.name!r} {self.change}{detail}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "change": self.change, "fields": list(self.fields)}


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _points_of(policy: str, observation: RepositoryObservation | None) -> str:
    """``"its 14 restore points in repository 'nas'"`` (or why they cannot be counted)."""
    if observation is None or not observation.reachable:
        return "its restore points"
    count = sum(1 for point in observation.points if point.policy == policy)
    return f"its {_count(count, 'restore point', 'restore points')}"


def destructive_changes(
    base: DesiredState,
    base_repositories: Mapping[str, RepositoryObservation],
    proposed: DesiredState,
    proposed_repositories: Mapping[str, RepositoryObservation],
) -> tuple[DestructiveChange, ...]:
    """Why ``proposed`` needs approval when ``base`` is applied (empty: it does not). The observations
    are of each config's own repositories (the same object when both configs define them alike)."""
    out: list[DestructiveChange] = []
    for name, policy in base.policies.items():
        old_repo = policy.repository
        where = base_repositories.get(old_repo)
        if name not in proposed.policies:
            out.append(
                DestructiveChange(
                    "policy-removed",
                    name,
                    f"BackupPolicy {name!r} is removed: its VMs are no longer backed up and"
                    f" {_points_of(name, where)} in repository {old_repo!r} become orphaned (kept, never"
                    " pruned)",
                )
            )
        elif proposed.policies[name].repository != old_repo:
            new_repo = proposed.policies[name].repository
            out.append(
                DestructiveChange(
                    "policy-moved",
                    name,
                    f"BackupPolicy {name!r} now writes to repository {new_repo!r} instead of {old_repo!r}:"
                    f" {_points_of(name, where)} in {old_repo!r} become orphaned (kept, never pruned)",
                )
            )
    for name, config in proposed.repositories.items():
        base_config = base.repositories.get(name)
        if base_config is None or not config.prune.enabled:
            continue
        guard = base_config.prune.max_deletions_per_run
        if config.prune.max_deletions_per_run <= guard:
            continue  # the planner never prunes more than the proposed guard in one run
        observation = proposed_repositories.get(name)
        if observation is None or not observation.reachable:
            error = observation.error if observation is not None and observation.error else "not observed"
            out.append(
                DestructiveChange(
                    "prune-unknown",
                    name,
                    f"repository {name!r}: max_deletions_per_run is raised from {guard} to"
                    f" {config.prune.max_deletions_per_run}, but its restore points cannot be counted now"
                    f" ({error}); checked again at the next fetch",
                )
            )
            continue
        expired, _ = expired_points(proposed, observation)
        # What the proposed config's plan prunes in one run: nothing when over its own guard (the
        # planner then prunes none and warns).
        prunes = len(expired) if len(expired) <= config.prune.max_deletions_per_run else 0
        if prunes > guard:
            out.append(
                DestructiveChange(
                    "mass-prune",
                    name,
                    f"repository {name!r}: {_count(prunes, 'restore point', 'restore points')} would be"
                    f" pruned in one run, more than max_deletions_per_run {guard} of the applied"
                    f" config (raised to {config.prune.max_deletions_per_run})",
                )
            )
    return tuple(out)


def _field_changes(old: object, new: object) -> tuple[str, ...]:
    return tuple(
        f.name
        for f in fields(old)  # type: ignore[arg-type]
        if f.compare and getattr(old, f.name) != getattr(new, f.name)
    )


def config_changes(base: DesiredState, proposed: DesiredState) -> tuple[ConfigChange, ...]:
    """Every object added, removed or changed from ``base`` to ``proposed``, by kind then name."""
    out: list[ConfigChange] = []
    kinds: tuple[tuple[str, Mapping[str, Any], Mapping[str, Any]], ...] = (
        ("Host", base.hosts, proposed.hosts),
        ("Repository", base.repositories, proposed.repositories),
        ("BackupPolicy", base.policies, proposed.policies),
        ("VerifyPolicy", base.verify_policies, proposed.verify_policies),
    )
    for kind, old, new in kinds:
        for name in sorted(set(old) | set(new)):
            if name not in new:
                out.append(ConfigChange(kind, name, "removed"))
            elif name not in old:
                out.append(ConfigChange(kind, name, "added"))
            elif old[name] != new[name]:
                out.append(ConfigChange(kind, name, "changed", _field_changes(old[name], new[name])))
    return tuple(out)


@dataclass(frozen=True)
class Review:
    """A proposed revision compared with a base: what changed, what is destructive, whether approved.

    ``approved_by`` names the approving commit (and its trailer's text) when one covers every
    destructive change; ``needs_approval`` is then False."""

    base: str
    """The base revision as people name it, e.g. ``main (git:9c8d7e6f5a4b)``."""
    changes: tuple[ConfigChange, ...] = ()
    destructive: tuple[DestructiveChange, ...] = ()
    approved_by: str | None = None

    @property
    def needs_approval(self) -> bool:
        return bool(self.destructive) and self.approved_by is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "changes": [c.to_dict() for c in self.changes],
            "destructive": [d.to_dict() for d in self.destructive],
            "approved_by": self.approved_by,
            "needs_approval": self.needs_approval,
        }
