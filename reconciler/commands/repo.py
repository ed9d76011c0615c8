"""``esxi-reconciler repo init|key-export``: create a repository, save its key."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import structlog

from reconciler.commands.common import add_command, repository_config

log = structlog.get_logger("reconciler.cli")


_REPO_EXAMPLES = """\
examples:
  esxi-reconciler repo init nas
  esxi-reconciler repo key-export nas --out /media/usb/nas-repository.key

exit status: 0 done, 1 failed (e.g. the repository exists), 2 usage or configuration error
"""

_KEY_WARNING = """\
Keep this key file and the repository's passphrase safe, apart from the repository and
from each other. The repository cannot be read without a key file AND its passphrase:
if both the key files in the repository and this copy are lost, or the passphrase is
forgotten, every restore point in it is lost for good. The file alone is useless
without the passphrase, but treat it as a secret anyway."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "repo",
        help="create a repository, export its key",
        description="Manage the repositories of the configuration (named as in their Repository document).",
        epilog=_REPO_EXAMPLES,
        handler=_repo_usage,
    )
    verbs = parser.add_subparsers(dest="repo_command", metavar="SUBCOMMAND")
    init = add_command(
        verbs,
        "init",
        help="create the repository configured under a name",
        description="Create the repository REPOSITORY at its configured path: encrypted with the\n"
        "configured key secret (as the passphrase) when encryption is enabled, with the configured\n"
        "compression. Refuses if anything exists at the path already.",
        epilog=_REPO_EXAMPLES,
        handler=cmd_repo_init,
    )
    init.add_argument("repository", metavar="REPOSITORY", help="name of a Repository document")
    export = add_command(
        verbs,
        "key-export",
        help="write the repository's key file to a file for safekeeping",
        description="Write the key file of REPOSITORY (the master key, wrapped by the passphrase) to\n"
        "FILE, readable by its owner only (mode 600). The passphrase is checked first.",
        epilog=_REPO_EXAMPLES,
        handler=cmd_repo_key_export,
    )
    export.add_argument("repository", metavar="REPOSITORY", help="name of a Repository document")
    export.add_argument("--out", metavar="FILE", type=Path, required=True, help="file to create")


def _repo_usage(args: argparse.Namespace) -> int:
    print("esxi-reconciler repo: give a subcommand: init or key-export (see repo --help)", file=sys.stderr)
    return 2


def cmd_repo_init(args: argparse.Namespace) -> int:
    """``esxi-reconciler repo init REPOSITORY``: 0 created, 1 failed or exists, 2 bad input."""
    from reconciler.config.secrets import SecretError
    from reconciler.repository import Repository
    from reconciler.repository.errors import RepositoryError

    cfg = repository_config(args, "repo init")
    if cfg is None:
        return 2
    path = Path(cfg.backend.path)
    if (path / "config").exists():
        print(f"esxi-reconciler repo init: {path} is already a repository; nothing done", file=sys.stderr)
        return 1
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        print(f"esxi-reconciler repo init: {path} exists and is not empty; nothing done", file=sys.stderr)
        return 1
    try:
        key = cfg.encryption.key
        passphrase = key.reveal() if cfg.encryption.enabled and key is not None else None
        repo = Repository.init(
            path, passphrase, compression=cfg.compression.algorithm, compression_level=cfg.compression.level
        )
    except (SecretError, RepositoryError, OSError, ValueError) as error:
        print(f"esxi-reconciler repo init: {error}", file=sys.stderr)
        return 1
    log.info("repo.init", repository=cfg.name, path=str(path), id=repo.id, encrypted=repo.encrypted)
    comp = cfg.compression
    compression = f"zstd level {comp.level}" if comp.algorithm == "zstd" else comp.algorithm
    encryption = f"encrypted (AES-256-GCM, key {repo.key_id})" if repo.encrypted else "NOT encrypted"
    print(f"created repository {cfg.name} at {path}: id {repo.id}, {encryption}, {compression}")
    if repo.encrypted:
        print(
            f"next: esxi-reconciler repo key-export {cfg.name} --out FILE, and keep that file and the"
            " passphrase safe: without them the backups cannot be read"
        )
    return 0


def cmd_repo_key_export(args: argparse.Namespace) -> int:
    """``esxi-reconciler repo key-export REPOSITORY --out FILE``: 0 written, 1 failed, 2 bad input."""
    import os

    from reconciler.config.secrets import SecretError
    from reconciler.operations.backup import open_repository
    from reconciler.repository import export_key
    from reconciler.repository.errors import RepositoryError

    cfg = repository_config(args, "repo key-export")
    if cfg is None:
        return 2
    if not cfg.encryption.enabled:
        print(
            f"esxi-reconciler repo key-export: repository {cfg.name} is not encrypted; it has no key",
            file=sys.stderr,
        )
        return 1
    out: Path = args.out
    try:
        repo = open_repository(cfg)  # checks the passphrase opens the key we export
        data = export_key(repo.path, repo.key_id)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(fd)
        finally:
            os.close(fd)
    except FileExistsError:
        print(f"esxi-reconciler repo key-export: {out} exists; not overwritten", file=sys.stderr)
        return 1
    except (SecretError, RepositoryError, OSError) as error:
        print(f"esxi-reconciler repo key-export: {error}", file=sys.stderr)
        return 1
    log.info("repo.key_export", repository=cfg.name, key=repo.key_id, out=str(out))
    print(f"wrote the key file of repository {cfg.name} (key {repo.key_id}) to {out} (mode 600)")
    print(_KEY_WARNING, file=sys.stderr)
    return 0
