"""The daemon's clone of the config repository, under ``<state dir>/source/``::

    repo.git/          bare clone: the followed ref (refs/heads/<branch> or refs/tags/<tag>) and
                       refs/reconciler/applied, the revision in force (kept across restarts, never
                       garbage-collected: gc.auto is off)
    trees/<commit>/    a detached work tree per revision in use (the applied one, the one before it, a
                       candidate); the daemon loads the config from it, so its revision is git:<commit>
    applied            symlink to trees/<applied commit>/<path>: the config in force, for the CLI
                       (esxi-reconciler --config /var/lib/esxi-reconciler/source/applied points)
    ssh/               known_hosts with the pinned host keys; the deploy key only while a fetch runs
    https/             the HTTPS credentials (git's credential format) only while a fetch runs;
                       capath/, an empty directory standing in for the system's CA directory
    trust/             allowed signers and the private OpenPGP keyring (:mod:`.trust`)
    home/              an empty HOME for git and ssh

Work trees are only ever created and deleted, never changed, so a config read from one is exactly its
commit. Everything is private to the service user (0700).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import structlog

from reconciler.config.source import GitSourceSpec
from reconciler.gitsource.git import (
    HOST_KEY_ALIAS,
    GitError,
    GitRunner,
    https_config,
    isolated_env,
    secret_forms,
    ssh_command,
)
from reconciler.gitsource.repo import GitRepository
from reconciler.gitsource.trust import Trust

log = structlog.get_logger(__name__)

APPLIED_REF = "refs/reconciler/applied"
SOURCE_DIR = "source"
LOCAL_TIMEOUT = 60.0
"""Seconds for git commands that do not touch the network (rev-parse, worktree, log)."""


def source_dir(state_dir: Path) -> Path:
    """Where the clone of a state directory lives."""
    return state_dir / SOURCE_DIR


class SourceClone(GitRepository):
    """The clone of one :class:`GitSourceSpec` in a state directory."""

    def __init__(self, spec: GitSourceSpec, state_dir: Path) -> None:
        self.spec = spec
        self.root = source_dir(state_dir)
        self.git_dir = self.root / "repo.git"
        self.trees = self.root / "trees"
        self.applied_link = self.root / "applied"
        self.ssh_dir = self.root / "ssh"
        self.https_dir = self.root / "https"
        self.home = self.root / "home"
        self.trust = Trust(spec.signers, self.root / "trust")
        protocols = spec.scheme
        env = isolated_env(self.home, protocols=protocols, extra=self.trust.env)
        super().__init__(GitRunner(env, LOCAL_TIMEOUT, self.git_dir, self.trust.git_config), spec.path)
        self._env = env

    # -- set-up ------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directories and the bare repository if missing; (re)write the pins and the
        trusted keys from the spec. Raises :class:`GitError` or :class:`~.trust.TrustError`."""
        for directory in (
            self.root,
            self.trees,
            self.ssh_dir,
            self.https_dir,
            self.https_dir / "capath",
            self.home,
        ):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)
        for leftover in (self.ssh_dir / "deploy_key", self.https_dir / "credentials"):
            leftover.unlink(missing_ok=True)  # a daemon killed while fetching
        if not (self.git_dir / "HEAD").exists():
            if self.git_dir.exists():
                shutil.rmtree(self.git_dir)  # a clone interrupted before it had a HEAD
            GitRunner(self._env, LOCAL_TIMEOUT).run(
                "init", "--bare", "-q", str(self.git_dir), what="git init"
            )
        for setting, value in (
            ("gc.auto", "0"),
            ("core.hooksPath", os.devnull),
            ("core.logAllRefUpdates", "true"),
        ):
            self.local.run("config", setting, value, what="configuring the clone")
        if self.spec.ssh is not None:
            lines = "".join(f"{HOST_KEY_ALIAS} {key}\n" for key in self.spec.ssh.host_keys)
            _write_private(self.ssh_dir / "known_hosts", lines.encode())
        self.trust.prepare()
        self.local.run("worktree", "prune", what="pruning stale work trees")

    # -- the remote ----------------------------------------------------------------------------------

    def fetch(self) -> str:
        """Fetch the followed ref from the remote; return the commit it names. Raises :class:`GitError`."""
        ref = self.spec.ref
        with self._ssh_env() as env, self._https_access() as (config, secrets):
            runner = GitRunner(env, self.spec.timeout.total_seconds(), self.git_dir, config, secrets)
            runner.run(
                "fetch",
                "--no-tags",
                "--no-recurse-submodules",
                "--no-write-fetch-head",
                "--quiet",
                self.spec.url,
                f"+{ref}:{ref}",
                what=f"fetching {self.spec.ref_name} from {self.spec.display_url}",
            )
        return self.commit_of(ref)

    @contextlib.contextmanager
    def _ssh_env(self) -> Iterator[dict[str, str]]:
        """The environment of a fetch; over SSH with the deploy key written to a private file for its
        duration (a secret is never an argument or an environment value)."""
        env = dict(self._env)
        if self.spec.ssh is None:
            yield env
            return
        from reconciler.config.secrets import SecretError

        try:
            key = self.spec.ssh.private_key.reveal_bytes()
        except SecretError as exc:
            raise GitError(f"the deploy key cannot be read: {exc}") from None
        key_file = self.ssh_dir / "deploy_key"
        _write_private(key_file, key if key.endswith(b"\n") else key + b"\n")
        try:
            env["GIT_SSH_COMMAND"] = ssh_command(
                key_file=key_file,
                known_hosts=self.ssh_dir / "known_hosts",
                connect_timeout=max(1, min(30, int(self.spec.timeout.total_seconds()))),
            )
            env["GIT_SSH_VARIANT"] = "ssh"
            yield env
        finally:
            key_file.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _https_access(self) -> Iterator[tuple[list[str], tuple[str, ...]]]:
        """The ``-c`` settings of a fetch over HTTPS and the values to keep out of its errors; the token
        is written to a private file for the fetch's duration only (like the deploy key)."""
        https = self.spec.https
        if self.spec.scheme != "https":
            yield [], ()
            return
        ca_file = https.ca_file if https is not None else None
        empty_dir = self.https_dir / "capath"
        if https is None or https.token is None or https.username is None:
            yield https_config(credentials=None, ca_file=ca_file, empty_dir=empty_dir), ()
            return
        from reconciler.config.secrets import SecretError

        try:
            token = https.token.reveal().strip()
        except SecretError as exc:
            raise GitError(f"the HTTPS token cannot be read: {exc}") from None
        if not token or any(c in token for c in "\n\r\0"):
            raise GitError(f"the HTTPS token {https.token} is empty or spans lines; give the token alone")
        credentials = self.https_dir / "credentials"
        _write_private(credentials, f"username={https.username}\npassword={token}\n".encode())
        try:
            yield (
                https_config(credentials=credentials, ca_file=ca_file, empty_dir=empty_dir),
                secret_forms(https.username, token),
            )
        finally:
            credentials.unlink(missing_ok=True)

    # -- work trees ------------------------------------------------------------------------------------

    def tree(self, commit: str) -> Path:
        """The work tree of ``commit`` (created if missing)."""
        path = self.trees / commit
        if (path / ".git").is_file():
            return path
        if path.exists():
            shutil.rmtree(path)  # half-made by a killed daemon
            self.local.run("worktree", "prune", what="pruning stale work trees")
        self.local.run(
            "worktree",
            "add",
            "--detach",
            "--force",
            "--quiet",
            str(path),
            commit,
            what=f"checking out {commit[:12]}",
        )
        return path

    def config_dir(self, commit: str) -> Path:
        """The config directory of ``commit``: its work tree, or the spec's sub-directory of it."""
        tree = self.tree(commit)
        return tree / self.spec.path if self.spec.path else tree

    def forget_trees(self, keep: set[str]) -> None:
        """Delete the work trees of every commit but ``keep``."""
        for path in sorted(self.trees.iterdir()) if self.trees.exists() else ():
            if path.name in keep:
                continue
            try:
                self.local.run("worktree", "remove", "--force", str(path), what="removing an old work tree")
            except GitError as exc:
                log.warning("source.tree_remove_failed", tree=str(path), error=str(exc))
                shutil.rmtree(path, ignore_errors=True)
        self.local.run("worktree", "prune", what="pruning stale work trees")

    # -- the applied revision --------------------------------------------------------------------------

    def applied(self) -> str | None:
        """The revision in force, as recorded (None before the first one)."""
        result = self.local.run(
            "rev-parse",
            "--verify",
            "--quiet",
            f"{APPLIED_REF}^{{commit}}",
            what="reading the applied revision",
            check=False,
        )
        return result.text or None if result.returncode == 0 else None

    def mark_applied(self, commit: str) -> Path:
        """Record ``commit`` as the revision in force and point ``applied`` at its config; return that."""
        self.local.run(
            "update-ref", "-m", "applied", APPLIED_REF, commit, what="recording the applied revision"
        )
        config = self.config_dir(commit)
        target = config.relative_to(self.root)
        tmp = self.root / ".applied.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        tmp.replace(self.applied_link)
        return config


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, mode 600 from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
