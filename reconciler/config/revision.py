"""The revision of the config: git commit and dirty flag when the config dir is a git work tree, plus a
digest of the loaded files (always).

git runs read-only (``--no-optional-locks``, no index refresh written) with a timeout; when git is
missing, the directory is not a work tree, or git refuses it (``safe.directory``), the digest alone
identifies the config.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

from reconciler.config.model import Revision

GIT_TIMEOUT_SECONDS = 10


def files_digest(files: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over (name, content) pairs, independent of their order."""
    outer = hashlib.sha256()
    for name, content in sorted(files):
        outer.update(name.encode("utf-8") + b"\0")
        outer.update(hashlib.sha256(content).digest())
    return outer.hexdigest()


def _git(directory: Path, *args: str) -> str | None:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        result = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(directory), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_SECONDS,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state(directory: Path, pathspec: str = ".") -> tuple[str, bool] | None:
    """(commit id, dirty) of the work tree containing ``directory``, or None outside git.

    Dirty means uncommitted or untracked changes to ``pathspec`` (relative to ``directory``, default: all of
    it); changes elsewhere in the repository do not count.
    """
    if _git(directory, "rev-parse", "--is-inside-work-tree") != "true":
        return None
    commit = _git(directory, "rev-parse", "--verify", "HEAD")
    if not commit:
        return None  # a fresh repository with no commit yet
    status = _git(directory, "status", "--porcelain", "--untracked-files=all", "--", pathspec)
    if status is None:
        return None
    return commit, bool(status)


def config_revision(
    directory: Path, files: Iterable[tuple[str, bytes]] | None = None, *, commit: str | None = None
) -> Revision:
    """The :class:`Revision` of the config at ``directory`` (a directory or a single file).

    ``files`` are (relative name, content) pairs of the loaded files; if omitted, the YAML files under
    ``directory`` are read. ``commit``: the files were exported from this commit (``plan --revision``),
    so it is the revision, clean, without asking git about ``directory``.
    """
    if files is None:
        from reconciler.config.documents import display_name, find_files

        files = [(display_name(path, directory), path.read_bytes()) for path in find_files(directory)]
    digest = files_digest(files)
    if commit is not None:
        return Revision(digest=digest, commit=commit)
    state = git_state(directory) if directory.is_dir() else git_state(directory.parent, directory.name)
    if state is None:
        return Revision(digest=digest)
    return Revision(digest=digest, commit=state[0], dirty=state[1])
