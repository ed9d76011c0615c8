"""The config of another revision, for ``plan --revision REF [--against BASE]``.

Two places hold revisions: the git repository around ``--config`` (a CI checkout of the config
repository), or the daemon's clone (``--source FILE``: what the daemon fetched and applied). Either way
a revision's files are exported into a temporary directory (:meth:`GitRepository.export`: nothing of
the repository's work tree or index is touched) and loaded with the normal loader, its revision being
``git:<commit>``. Nothing is fetched: a CI job checks out what it reviews, the daemon fetches by itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from reconciler.config.errors import ConfigError, ConfigIssue
from reconciler.config.loader import load_config
from reconciler.config.model import DesiredState
from reconciler.config.source import GitSourceSpec
from reconciler.gitsource.approve import Approval, RepositoryReader, judge
from reconciler.gitsource.clone import APPLIED_REF, SourceClone
from reconciler.gitsource.git import GitError, GitRunner
from reconciler.gitsource.repo import GitRepository
from reconciler.gitsource.sync import in_repository
from reconciler.gitsource.trust import Trust
from reconciler.planning.approval import APPROVAL_TRAILER, Review

LOCAL_TIMEOUT = 60.0


@dataclass(frozen=True)
class LoadedRevision:
    """A loaded revision: how people name it, its commit and its config."""

    name: str
    commit: str
    desired: DesiredState

    @property
    def label(self) -> str:
        """``feature/x (git:3f2a1b2c4d5e)``."""
        short = f"git:{self.commit[:12]}"
        return short if self.name in (self.commit, short) else f"{self.name} ({short})"


class Revisions:
    """Reads revisions of one repository; a context manager (temporary files are removed on exit)."""

    def __init__(
        self,
        repository: GitRepository,
        *,
        default_revision: str | None = None,
        default_base: str | None = None,
        trust: Trust | None = None,
    ) -> None:
        self.repository = repository
        self.default_revision = default_revision
        self.default_base = default_base
        self.trust = trust
        self.names: dict[str, str] = {}
        """How people call some refs (``refs/reconciler/applied`` → ``the applied revision``)."""
        self._tmp = Path(tempfile.mkdtemp(prefix="esxi-reconciler-plan-"))
        self._count = 0

    @classmethod
    def around(cls, config_dir: Path) -> Revisions:
        """The git repository holding ``config_dir`` (the config is its sub-directory there).
        Raises :class:`GitError` when it is not inside one."""
        # The user's own environment and git config (their safe.directory for a CI checkout), but no
        # prompt and no optional locks: reading only.
        env = {**os.environ, "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}
        probe = GitRunner(env, LOCAL_TIMEOUT)
        directory = config_dir if config_dir.is_dir() else config_dir.parent
        result = probe.run(
            "-C", str(directory), "rev-parse", "--absolute-git-dir", "--show-prefix", what="", check=False
        )
        lines = result.text.splitlines()
        if result.returncode != 0 or not lines:
            raise GitError(f"{config_dir} is not inside a git work tree, so it has no other revisions")
        git_dir = Path(lines[0])
        prefix = lines[1].strip("/") if len(lines) > 1 else ""
        return cls(GitRepository(GitRunner(env, LOCAL_TIMEOUT, git_dir), prefix))

    @classmethod
    def of_source(cls, spec: GitSourceSpec, state_dir: Path) -> Revisions:
        """The daemon's clone of ``spec`` in ``state_dir`` (read only): the revision defaults to the
        fetched head, the base to the applied revision. Signers are checked with a private copy of the
        trusted keys."""
        clone = SourceClone(spec, state_dir)
        if not (clone.git_dir / "HEAD").exists():
            raise GitError(f"{clone.root}: no clone yet (has the daemon run with --source?)")
        # Read as another user than the daemon's (root at a terminal): git's ownership check would refuse.
        settings: tuple[str, ...] = (f"safe.directory={clone.git_dir}",)
        env = dict(clone.local.env)
        trust = None
        if spec.verify:
            trust = Trust(spec.signers, Path(tempfile.mkdtemp(prefix="esxi-reconciler-trust-")))
            trust.prepare()
            settings += trust.git_config
            env.update(trust.env)
        clone.local = replace(clone.local, env=env, config=settings)
        revisions = cls(clone, default_revision=spec.ref, trust=trust)
        revisions.names = {spec.ref: f"the fetched {spec.ref_name}", APPLIED_REF: "the applied revision"}
        if clone.applied() is not None:
            revisions.default_base = APPLIED_REF
        return revisions

    def __enter__(self) -> Revisions:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
        if self.trust is not None:
            shutil.rmtree(self.trust.directory, ignore_errors=True)

    def load(self, ref: str) -> LoadedRevision:
        """The config of ``ref``. Raises :class:`GitError` (no such revision) or :class:`ConfigError`
        (its files named from the repository's top)."""
        commit = self.repository.commit_of(ref)
        path = self.repository.path
        if not self.repository.has_config_dir(commit):
            raise ConfigError(
                [ConfigIssue(path or ".", 0, 0, "", f"is not a directory in {ref} ({commit[:12]})")]
            )
        links = self.repository.symlinks(commit)
        if links:
            raise ConfigError(
                [
                    ConfigIssue(
                        f"{path}/{n}" if path else n, 0, 0, "", "is a symbolic link; commit the file itself"
                    )
                    for n in links
                ]
            )
        self._count += 1
        directory = self.repository.export(commit, self._tmp / f"r{self._count}")
        try:
            desired = load_config(directory, commit=commit)
        except ConfigError as error:
            raise ConfigError(in_repository(issue, path) for issue in error.issues) from None
        return LoadedRevision(self.names.get(ref, ref), commit, desired)

    def approvals(self, base: str, head: str) -> list[Approval]:
        """Approving commits in ``base..head``, newest first (only signed ones when signers are known)."""
        found = []
        for commit, text in self.repository.trailers(base, head, APPROVAL_TRAILER):
            signer = None
            if self.trust is not None:
                check = self.trust.check(self.repository.local, commit)
                if not check.trusted:
                    continue
                signer = check.signer
            found.append(Approval(commit, text, signer))
        return found

    def review(self, base: LoadedRevision, proposed: LoadedRevision, reader: RepositoryReader) -> Review:
        """``proposed`` judged against ``base`` (see :func:`reconciler.gitsource.approve.judge`)."""

        def load_at(commit: str) -> DesiredState | None:
            if commit == proposed.commit:
                return proposed.desired
            try:
                return self.load(commit).desired
            except (ConfigError, GitError):
                return None

        return judge(
            base.desired,
            proposed.desired,
            base_label=base.label,
            approvals=self.approvals(base.commit, proposed.commit),
            load_at=load_at,
            reader=reader,
        )
