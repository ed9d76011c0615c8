"""Reading a git repository: resolve refs, compare history, read trailers, export a revision's config.

:class:`GitRepository` is what the daemon's clone (:mod:`.clone`) and a CI checkout (``plan --revision``,
:mod:`.preview`) share. Exporting never touches a work tree or index of the repository: the files of a
revision are written into a new directory through a temporary index (``GIT_INDEX_FILE``), so a checkout
with uncommitted changes is safe.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path

from reconciler.gitsource.git import GitError, GitRunner

SYMLINK_MODE = "120000"


class GitRepository:
    """One repository, read through ``runner`` (whose ``git_dir`` is set); ``path``: the sub-directory
    holding the config (``""`` for the top)."""

    def __init__(self, runner: GitRunner, path: str) -> None:
        self.local = runner
        self.path = path

    def commit_of(self, ref: str) -> str:
        """The commit ``ref`` names (a tag is peeled). Raises :class:`GitError`."""
        result = self.local.run(
            "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}", what="", check=False
        )
        if result.returncode != 0 or not result.text:
            raise GitError(f"no commit named {ref!r} in this repository")
        return result.text

    def is_ancestor(self, older: str, newer: str) -> bool:
        """Whether ``older`` is in the history of ``newer`` (or the same commit)."""
        result = self.local.run(
            "merge-base", "--is-ancestor", older, newer, what="comparing history", check=False
        )
        if result.returncode not in (0, 1):
            raise GitError(
                f"comparing the history of {older[:12]} and {newer[:12]}: git exited {result.returncode}"
            )
        return result.returncode == 0

    def committed(self, commit: str) -> datetime:
        """The committer date of ``commit``."""
        stamp = self.local.text("show", "-s", "--format=%ct", commit, what=f"reading commit {commit[:12]}")
        return datetime.fromtimestamp(int(stamp), timezone.utc)

    def trailers(self, base: str | None, head: str, key: str) -> list[tuple[str, str]]:
        """(commit, first value) of every commit in ``base..head`` (all of ``head``'s history without a
        base) whose message has the trailer ``key``, newest first."""
        span = f"{base}..{head}" if base else head
        out = self.local.run(
            "log",
            "--topo-order",
            "-z",
            f"--format=%H%x1f%(trailers:key={key},valueonly,separator=%x1e)",
            span,
            what="reading commit messages",
        ).stdout.decode("utf-8", "replace")
        found: list[tuple[str, str]] = []
        for record in out.split("\x00"):
            commit, _, values = record.partition("\x1f")
            value = values.split("\x1e")[0].strip()
            if commit.strip() and value:
                found.append((commit.strip(), value))
        return found

    def _treeish(self, commit: str) -> str:
        return f"{commit}:{self.path}" if self.path else f"{commit}^{{tree}}"

    def symlinks(self, commit: str) -> list[str]:
        """Paths (under the config directory) that are symbolic links in ``commit``: refused, since a
        link could make the daemon read any file of the machine as config."""
        out = self.local.run("ls-tree", "-r", "-z", self._treeish(commit), what="", check=False)
        links = []
        for entry in out.stdout.decode("utf-8", "replace").split("\x00"):
            meta, _, name = entry.partition("\t")
            if meta.split(" ")[0] == SYMLINK_MODE:
                links.append(name)
        return links

    def has_config_dir(self, commit: str) -> bool:
        """Whether ``commit`` has the config sub-directory as a directory (a symbolic link in its place,
        which could point anywhere on the machine, does not count)."""
        result = self.local.run("cat-file", "-t", self._treeish(commit), what="", check=False)
        return result.returncode == 0 and result.text == "tree"

    def export(self, commit: str, directory: Path) -> Path:
        """Write the config files of ``commit`` into ``directory`` (which must not exist) and return it.

        Uses a temporary index next to it; the repository's own index and work tree are not touched.
        """
        index = directory.with_name(directory.name + ".index")
        directory.mkdir(mode=0o700)
        env = {**self.local.env, "GIT_INDEX_FILE": str(index)}
        runner = dataclasses.replace(self.local, env=env)
        try:
            runner.run("read-tree", self._treeish(commit), what=f"reading the tree of {commit[:12]}")
            runner.run(
                "--work-tree",
                str(directory),
                "checkout-index",
                "--all",
                "--force",
                what=f"exporting {commit[:12]}",
            )
        finally:
            index.unlink(missing_ok=True)
        return directory
