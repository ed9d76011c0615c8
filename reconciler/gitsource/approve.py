"""Whether a proposed revision may be applied: its destructive changes and the commit that approves them.

The rules are pure (:func:`reconciler.planning.approval.destructive_changes`); this module gathers what
they need: the restore points of both configs' repositories (each repository read once per check), the
approving commits, and the config at an approving commit.

An approving commit carries the trailer ``Approve-Destructive: <why>`` in its message
(:data:`~reconciler.planning.approval.APPROVAL_TRAILER`) and lies after the applied revision, up to the
proposed one (when signatures are required, it must be signed by a trusted key itself). The newest one
counts, and it approves what is destructive *up to it*: a destructive change pushed after it (the
config at the approving commit compared with the proposed one) needs an approval of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from reconciler.config.model import DesiredState, RepositoryConfig
from reconciler.operations.observe import RepoOpener, observe_repositories
from reconciler.operations.repositories import open_repository
from reconciler.planning.approval import APPROVAL_TRAILER, Review, config_changes, destructive_changes
from reconciler.planning.observed import RepositoryObservation


@dataclass(frozen=True)
class Approval:
    """A commit whose message approves destructive changes."""

    commit: str
    text: str
    """The trailer's value: who approves and why."""
    signer: str | None = None

    def __str__(self) -> str:
        by = f", signed by {self.signer}" if self.signer else ""
        return f"commit {self.commit[:12]} ({APPROVAL_TRAILER}: {self.text}{by})"


class RepositoryReader:
    """The restore points of each repository, read once: configs defining a repository alike share one
    observation."""

    def __init__(self, opener: RepoOpener = open_repository) -> None:
        self._opener = opener
        self._seen: dict[str, tuple[RepositoryConfig, RepositoryObservation]] = {}

    def seed(self, desired: DesiredState, observations: Mapping[str, RepositoryObservation]) -> None:
        """Reuse what a full observation of ``desired`` already read."""
        for name, observation in observations.items():
            if name in desired.repositories:
                self._seen[name] = (desired.repositories[name], observation)

    def points(self, desired: DesiredState) -> dict[str, RepositoryObservation]:
        """An observation of every repository of ``desired``."""
        out: dict[str, RepositoryObservation] = {}
        todo: list[RepositoryConfig] = []
        for name, config in desired.repositories.items():
            seen = self._seen.get(name)
            if seen is not None and seen[0] == config:
                out[name] = seen[1]
            else:
                todo.append(config)
        for name, observation in observe_repositories(todo, repo_opener=self._opener).items():
            self._seen[name] = (desired.repositories[name], observation)
            out[name] = observation
        return out


def judge(
    base: DesiredState,
    proposed: DesiredState,
    *,
    base_label: str,
    approvals: Sequence[Approval],
    load_at: Callable[[str], DesiredState | None],
    reader: RepositoryReader,
) -> Review:
    """The review of ``proposed`` against ``base``: changed objects, destructive changes, approval.

    ``approvals``: the approving commits after ``base``, newest first (already checked for trust);
    ``load_at(commit)``: the config of an approving commit (``proposed`` itself for the proposed one,
    None when it is invalid: then it approves nothing).
    """
    proposed_points = reader.points(proposed)
    destructive = destructive_changes(base, reader.points(base), proposed, proposed_points)
    approved_by = None
    if destructive and approvals:
        newest = approvals[0]
        at = load_at(newest.commit)
        if at is not None:
            later = (
                ()
                if at is proposed
                else destructive_changes(at, reader.points(at), proposed, proposed_points)
            )
            if later:
                destructive = later
            else:
                approved_by = str(newest)
    return Review(base_label, config_changes(base, proposed), destructive, approved_by)
