"""A config repository for git-source tests: a work clone the test edits, commits (unsigned, SSH- or
OpenPGP-signed) and pushes to a bare remote (``file://`` or the lab's git server over SSH), the keys
to sign with, a real restore-point repository, and the documents and source file the daemon reads.

Everything runs real git with its own ``HOME`` (no user or system git config); the OpenPGP key lives in
a private ``GNUPGHOME`` whose agent is stopped when the keys are dropped (:meth:`Keys.close`).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.repository import CHUNK_SIZE, Repository

HOST_KEY_PIN = "SHA256:glTDKakoUPbVOd03b0gW7idkUX2l4CNVFK9DMWRIDXo"
THUMBPRINT = ":".join(["AB"] * 32)


def run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()


@dataclass
class Keys:
    """Signing keys: SSH keys ``alice`` (trusted) and ``mallory`` (not), OpenPGP keys ``bob`` (trusted)
    and ``eve`` (not)."""

    directory: Path
    gnupg: Path

    @classmethod
    def make(cls, directory: Path) -> Keys:
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("alice", "mallory"):
            run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    f"{name}@example",
                    "-f",
                    str(directory / name),
                ]
            )
        gnupg = directory / "gnupg"
        gnupg.mkdir(mode=0o700)
        keys = cls(directory, gnupg)
        for name in ("bob", "eve"):
            run(
                [
                    "gpg",
                    "--batch",
                    "--passphrase",
                    "",
                    "--quick-gen-key",
                    f"{name} <{name}@example>",
                    "ed25519",
                    "sign",
                    "never",
                ],
                env=keys.gpg_env,
            )
        return keys

    @property
    def gpg_env(self) -> dict[str, str]:
        return {"PATH": os.environ["PATH"], "GNUPGHOME": str(self.gnupg), "LC_ALL": "C"}

    def ssh_public(self, name: str) -> str:
        return (self.directory / f"{name}.pub").read_text().strip()

    def openpgp_public(self, name: str) -> str:
        return run(["gpg", "--armor", "--export", f"{name}@example"], env=self.gpg_env)

    def close(self) -> None:
        """Stop the gpg-agent that key generation and signing started in our GNUPGHOME."""
        subprocess.run(["gpgconf", "--kill", "all"], env=self.gpg_env, capture_output=True, check=False)


class ConfigRepo:
    """A work clone of ``url``: write files, commit, push to ``main``."""

    def __init__(self, directory: Path, url: str, keys: Keys, *, ssh_command: str | None = None) -> None:
        self.directory = directory
        self.url = url
        self.keys = keys
        home = directory.parent / f"{directory.name}-home"
        home.mkdir(parents=True, exist_ok=True)
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(home),
            "LC_ALL": "C",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GNUPGHOME": str(keys.gnupg),
        }
        if ssh_command is not None:
            self.env["GIT_SSH_COMMAND"] = ssh_command
        run(["git", "init", "-q", "-b", "main", str(directory)], env=self.env)
        for key, value in (
            ("user.name", "Test"),
            ("user.email", "test@example"),
            ("commit.gpgsign", "false"),
        ):
            self.git("config", key, value)

    def git(self, *args: str) -> str:
        return run(["git", "-C", str(self.directory), *args], env=self.env)

    def write(self, name: str, text: str) -> None:
        path = self.directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def remove(self, name: str) -> None:
        (self.directory / name).unlink()

    def commit(self, message: str, *, sign: str | None = None, trailer: str | None = None) -> str:
        """Commit everything; ``sign``: ``alice``/``mallory`` (SSH) or ``bob``/``eve`` (OpenPGP)."""
        self.git("add", "-A")
        options: list[str] = []
        if sign in ("alice", "mallory"):
            options = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={self.keys.directory / sign}"]
        elif sign in ("bob", "eve"):
            options = ["-c", "gpg.format=openpgp", "-c", f"user.signingkey={sign}@example"]
        body = f"{message}\n\n{trailer}\n" if trailer else message
        self.git(*options, "commit", "-q", "--allow-empty", *(["-S"] if sign else []), "-m", body)
        return self.git("rev-parse", "HEAD")

    def push(self, *, force: bool = False, ref: str = "HEAD:main") -> None:
        self.git("push", "-q", *(["--force"] if force else []), self.url, ref)

    def reset(self, commit: str) -> None:
        self.git("reset", "-q", "--hard", commit)


def repository_doc(path: Path, *, max_deletions: int = 100, prune: bool = True) -> str:
    return f"""---
apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: nas}}
spec:
  backend: {{type: local, path: {path}}}
  encryption: {{enabled: false}}
  prune: {{enabled: {str(prune).lower()}, max_deletions_per_run: {max_deletions}}}
"""


HOST_PASSWORD_ENV = "GITREMOTE_TEST_HOST_PASSWORD"
"""The host's password variable: the daemon resolves secrets on every load, so a test using
:data:`HOST_DOC` sets it (``monkeypatch.setenv``); the host itself never answers."""

HOST_DOC = f"""---
apiVersion: esxi-reconciler/v1
kind: Host
metadata: {{name: esxi1}}
spec:
  address: 127.0.0.1
  license: free
  credentials: {{user: root, password: {{env: {HOST_PASSWORD_ENV}}}}}
  api: {{port: 1, thumbprint: "{THUMBPRINT}"}}
  ssh: {{port: 1, host_key: "{HOST_KEY_PIN}"}}
"""
"""A host nothing answers for (port 1): observed unreachable at once, so a cycle plans only repository
work (prunes)."""


def policy_doc(name: str, *, retention: str = "{keep_last: 10}") -> str:
    return f"""---
apiVersion: esxi-reconciler/v1
kind: BackupPolicy
metadata: {{name: {name}}}
spec:
  host: esxi1
  repository: nas
  vms: {{names: [web01]}}
  schedule: {{manual: true}}
  retention: {retention}
"""


def make_points(path: Path, policy: str, count: int) -> list[RestorePoint]:
    """A real repository at ``path`` (created if missing) with ``count`` successful daily points of
    ``policy`` for VM web01, the newest now."""
    repo = Repository.open(path) if (path / "config").exists() else Repository.init(path)
    now = datetime.now(timezone.utc)
    points = []
    with repo.lock(purpose="test"):
        writer = repo.chunk_writer(CHUNK_SIZE)
        writer.write(0, memoryview(b"x" * CHUNK_SIZE))
        index = writer.finish()
        for day in range(count):
            when = now - timedelta(days=day, minutes=5)
            point = RestorePoint(
                id=new_point_id(when),
                policy=policy,
                vm=VmRef("web01", "uuid-web01", "esxi1", "1"),
                started=when,
                snapshot_time=when,
                finished=when + timedelta(minutes=1),
                status="success",
                mode="full",
                config_revision="git:test",
                disks=(DiskRecord(2000, "Hard disk 1", "[ds1] web01/web01.vmdk", CHUNK_SIZE, index),),
            )
            repo.write_point(point)
            points.append(point)
    return points


def point_count(path: Path) -> int:
    repo = Repository.open(path)
    with repo.lock(exclusive=False, purpose="test"):
        return len(repo.list_points())


def source_doc(
    url: str,
    *,
    path: str = "esxi",
    interval: str = "1s",
    signers: list[tuple[str, str, str]] = (),  # type: ignore[assignment]
    ssh: str = "",
    allow_rollback: bool = False,
    branch: str = "main",
) -> str:
    """The GitSource bootstrap document; ``signers``: (name, ssh|openpgp, public key)."""
    verify = ""
    if signers:
        items = "".join(
            f"      - name: {name}\n        {kind}: |\n"
            + "".join(f"          {line}\n" for line in key.splitlines())
            for name, kind, key in signers
        )
        verify = f"  verify:\n    signers:\n{items}"
    return (
        "apiVersion: esxi-reconciler/v1\nkind: GitSource\nmetadata: {name: config}\nspec:\n"
        f"  url: {url}\n  branch: {branch}\n  path: {path}\n  interval: {interval}\n  timeout: 30s\n"
        f"  allow_rollback: {str(allow_rollback).lower()}\n{ssh}{verify}"
    )
