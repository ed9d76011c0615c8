"""One poll of the git source: fetch, examine the head, load its config, check approval — a verdict.

For a head other than the applied revision, each step can stop it (the reason names the step); the
applied revision then stays in force:

1. **fetch** the followed ref (``FetchFailed``: the remote cannot be read now);
2. **history**: a head older than the applied revision — an ancestor of it, or not descending from it
   and committed before it — is a rollback (``Rollback``), refused unless ``allow_rollback``; a head
   that does not descend from the applied revision but is newer (a force-push rewriting history) is
   reported and goes on;
3. **signature**, when signers are listed (``SignatureRefused``): ``git verify-commit`` against exactly
   those keys (:mod:`.trust`);
4. **config**: its work tree is checked out and loaded like any config directory (``InvalidConfig``,
   with file:line of every issue, files named from the repository's top); symbolic links are refused;
5. **approval**: compared with the applied config, destructive changes wait for an approving commit
   (``NeedsApproval``; :mod:`.approve`).

Otherwise the head is **accepted**; :meth:`Syncer.accept` makes it the applied revision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import structlog

from reconciler.config.errors import ConfigError, ConfigIssue
from reconciler.config.loader import load_config
from reconciler.config.model import DesiredState
from reconciler.config.source import GitSourceSpec
from reconciler.gitsource.approve import Approval, RepositoryReader, judge
from reconciler.gitsource.clone import SourceClone
from reconciler.gitsource.git import GitError
from reconciler.operations.observe import RepoOpener
from reconciler.operations.repositories import open_repository
from reconciler.planning.approval import APPROVAL_TRAILER, Review

log = structlog.get_logger(__name__)

Reason = Literal[
    "UpToDate",
    "Accepted",
    "FetchFailed",
    "Rollback",
    "SignatureRefused",
    "InvalidConfig",
    "NeedsApproval",
    "GitFailed",
]


@dataclass(frozen=True)
class AppliedRevision:
    """A trusted revision and its loaded config."""

    commit: str
    desired: DesiredState
    config_dir: Path
    signer: str | None = None


@dataclass(frozen=True)
class PollResult:
    """The verdict on the fetched head."""

    reason: Reason
    message: str
    head: str | None = None
    accepted: AppliedRevision | None = None
    issues: tuple[ConfigIssue, ...] = ()
    review: Review | None = None
    rewritten: str | None = None
    """Set when the head does not descend from the applied revision (history was rewritten)."""


def in_repository(issue: ConfigIssue, path: str) -> ConfigIssue:
    """``issue`` with its file named from the repository's top (``esxi/policies/web.yaml``)."""
    if not path or not issue.file or issue.file.startswith("/"):
        return issue
    return replace(issue, file=f"{path}/{issue.file}")


class Syncer:
    """Polls one :class:`GitSourceSpec` into the clone under ``state_dir``."""

    def __init__(
        self,
        spec: GitSourceSpec,
        state_dir: Path,
        *,
        load: Callable[[Path], DesiredState] = load_config,
        repo_opener: RepoOpener = open_repository,
    ) -> None:
        self.spec = spec
        self.clone = SourceClone(spec, state_dir)
        self.load = load
        self.repo_opener = repo_opener

    def open(self) -> tuple[AppliedRevision | None, str | None]:
        """Prepare the clone and bring back the recorded applied revision, checked again (the trusted
        keys may have changed): (the revision, None), or (None, why it is not used) or (None, None)
        before the first one. Raises :class:`GitError` or :class:`~.trust.TrustError`."""
        self.clone.open()
        commit = self.clone.applied()
        if commit is None:
            return None, None
        signer = None
        if self.spec.verify:
            check = self.clone.trust.check(self.clone.local, commit)
            if not check.trusted:
                return None, f"the applied revision {commit[:12]} is no longer trusted ({check.detail})"
            signer = check.signer
        desired, issues = self._load(commit)
        if desired is None:
            first = issues[0] if issues else "cannot be loaded"
            return None, f"the applied revision {commit[:12]} no longer loads: {first}"
        config_dir = self.clone.mark_applied(commit)
        return AppliedRevision(commit, desired, config_dir, signer), None

    def _load(self, commit: str) -> tuple[DesiredState | None, tuple[ConfigIssue, ...]]:
        """The config of ``commit`` from its work tree, or its issues (files named from the top)."""
        path = self.spec.path
        if not self.clone.has_config_dir(commit):
            return None, (
                ConfigIssue(
                    path or ".",
                    0,
                    0,
                    "",
                    f"is not a directory in commit {commit[:12]} (the source's spec.path)",
                ),
            )
        links = self.clone.symlinks(commit)
        if links:
            message = (
                "is a symbolic link: a fetched config may not link to files outside it;"
                " commit the file itself"
            )
            return None, tuple(ConfigIssue(f"{path}/{n}" if path else n, 0, 0, "", message) for n in links)
        try:
            return self.load(self.clone.config_dir(commit)), ()
        except ConfigError as error:
            return None, tuple(in_repository(issue, path) for issue in error.issues)

    def poll(self, applied: AppliedRevision | None) -> PollResult:
        """Fetch and judge the head (see the module doc). Never raises for git or config trouble."""
        try:
            head = self.clone.fetch()
        except GitError as exc:
            return PollResult("FetchFailed", str(exc))
        if applied is not None and head == applied.commit:
            return PollResult("UpToDate", f"{head[:12]} is applied", head=head)
        try:
            result = self._examine(head, applied)
        except GitError as exc:
            return PollResult("GitFailed", str(exc), head=head)
        keep = {head} | ({applied.commit} if applied is not None else set())
        try:
            self.clone.forget_trees(keep)
        except GitError as exc:
            log.warning("source.cleanup_failed", error=str(exc))
        return result

    def _examine(self, head: str, applied: AppliedRevision | None) -> PollResult:
        rewritten = None
        if applied is not None:
            descends = self.clone.is_ancestor(applied.commit, head)
            older = self.clone.is_ancestor(head, applied.commit) or (
                not descends and self.clone.committed(head) < self.clone.committed(applied.commit)
            )
            if older and not self.spec.allow_rollback:
                how = (
                    "an ancestor of it"
                    if self.clone.is_ancestor(head, applied.commit)
                    else "committed before it"
                )
                return PollResult(
                    "Rollback",
                    f"{head[:12]} is older than the applied {applied.commit[:12]} ({how}): not applied; a"
                    " force-push to an old commit is not a way to roll back (commit a revert, or set"
                    " allow_rollback: true in the source file)",
                    head=head,
                )
            if not descends:
                rewritten = (
                    f"history rewritten: {head[:12]} does not contain the applied {applied.commit[:12]}"
                    " (a force-push)"
                )
        signer = signed = None
        if self.spec.verify:
            check = self.clone.trust.check(self.clone.local, head)
            if not check.trusted:
                return PollResult("SignatureRefused", check.detail, head=head, rewritten=rewritten)
            signer, signed = check.signer, check.detail
        desired, issues = self._load(head)
        if desired is None:
            more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
            return PollResult(
                "InvalidConfig", f"{issues[0]}{more}", head=head, issues=issues, rewritten=rewritten
            )
        review = None
        if applied is not None:
            review = judge(
                applied.desired,
                desired,
                base_label=f"the applied revision {applied.commit[:12]}",
                approvals=self.approvals(applied.commit, head),
                load_at=lambda commit: desired if commit == head else self._load(commit)[0],
                reader=RepositoryReader(self.repo_opener),
            )
            if review.needs_approval:
                more = f" (and {len(review.destructive) - 1} more)" if len(review.destructive) > 1 else ""
                return PollResult(
                    "NeedsApproval",
                    f"{review.destructive[0]}{more}; approve with a commit carrying the trailer"
                    f" '{APPROVAL_TRAILER}: <why>'",
                    head=head,
                    review=review,
                    rewritten=rewritten,
                )
        accepted = AppliedRevision(head, desired, self.clone.config_dir(head), signer)
        signed = f", {signed}" if signed else ""
        approved = (
            f"; destructive changes approved by {review.approved_by}" if review and review.approved_by else ""
        )
        return PollResult(
            "Accepted",
            f"{head[:12]} accepted{signed}{approved}",
            head=head,
            accepted=accepted,
            review=review,
            rewritten=rewritten,
        )

    def approvals(self, base: str | None, head: str) -> list[Approval]:
        """The approving commits in ``base..head``, newest first; with signers listed, only signed ones."""
        found = []
        for commit, text in self.clone.trailers(base, head, APPROVAL_TRAILER):
            signer = None
            if self.spec.verify:
                check = self.clone.trust.check(self.clone.local, commit)
                if not check.trusted:
                    log.warning("source.approval_ignored", commit=commit, reason=check.detail)
                    continue
                signer = check.signer
            found.append(Approval(commit, text, signer))
        return found

    def accept(self, revision: AppliedRevision) -> AppliedRevision:
        """Make ``revision`` the applied one (recorded in the clone, ``applied`` link moved)."""
        config_dir = self.clone.mark_applied(revision.commit)
        return replace(revision, config_dir=config_dir)
