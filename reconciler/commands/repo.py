"""``esxi-reconciler repo init|key|stats|gc|copy``: create a repository; export, import and list its key
files and change its passphrase; show what it holds and saves; free its garbage; copy restore points to
another repository (an off-site copy)."""

from __future__ import annotations

import argparse
import sys
from datetime import timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from reconciler.commands.common import (
    ExitCode,
    add_command,
    add_yes_option,
    ask,
    emit_json,
    fail,
    load_desired,
    plural,
    repository_config,
    since_argument,
    unknown_name,
)
from reconciler.printable import printable
from reconciler.units import human_size

if TYPE_CHECKING:
    from reconciler.config.secrets import Secret
    from reconciler.repository.gc import GcReport

log = structlog.get_logger("reconciler.cli")


_REPO_EXAMPLES = """\
examples:
  esxi-reconciler repo init nas
  esxi-reconciler repo key export nas --out /media/usb/nas-repository.key
  esxi-reconciler repo key import nas /media/usb/nas-repository.key
  esxi-reconciler repo key passwd nas        change the passphrase (asks for the new one)
  esxi-reconciler repo key list nas          its key files, and which the configured secret opens
  esxi-reconciler repo stats                 logical vs stored bytes, dedup and compression ratios
  esxi-reconciler repo gc nas --dry-run      what garbage collection would free
  esxi-reconciler repo gc                    free it in every repository
  esxi-reconciler repo copy nas offsite      copy the restore points offsite lacks

Exit 1 when it failed (the repository exists; GC deferred because a backup holds it; the
cause is named).
"""

_GC_EXAMPLES = """\
examples:
  esxi-reconciler repo gc nas --dry-run     what would be removed; nothing is deleted
  esxi-reconciler repo gc nas               remove it now (fails if a backup is running)
  esxi-reconciler repo gc --wait 600        every repository, waiting up to 10 min for backups

Prints per repository what was removed: chunks and their size, disk indexes, digest maps,
staged files left in tmp/ by killed runs, and whether an interrupted GC was completed.

Exit 1 when GC failed or was deferred (a backup holds the repository).
"""

_KEY_EXAMPLES = """\
examples:
  esxi-reconciler repo key export nas --out /media/usb/nas-repository.key
  esxi-reconciler repo key import nas /media/usb/nas-repository.key
                                            put a saved key file back (e.g. keys/ was lost)
  esxi-reconciler repo key import nas old.key --passphrase-file /root/old-passphrase
                                            one saved before a passphrase change
  esxi-reconciler repo key passwd nas       asks for the new passphrase twice, then asks to go on
  esxi-reconciler repo key passwd nas --new-passphrase-file /root/new --yes
  esxi-reconciler repo key list nas --json

Exit 1 when it failed (wrong passphrase, unreadable repository, declined); 64 a bad key file
or no terminal to ask on without --yes.
"""

_KEY_CHANGE_EXAMPLES = """\
examples:
  esxi-reconciler repo key passwd nas       asks for the new passphrase twice, then asks to go on
  esxi-reconciler repo key passwd nas --new-passphrase-file /root/nas-new.pass --yes

The old passphrase is the repository's configured key secret. Steps, each safe to be killed:
a key file for the new passphrase is written and synced; it is read back and must open the
repository with the new passphrase; only then are the key files of the old passphrase deleted.
Killed before the end, the old passphrase still works (and maybe the new one): run it again.
Afterwards put the new passphrase where the configuration reads the secret, or backups fail;
key files exported earlier still need the OLD passphrase: export the new one.

Exit 0 changed (or found changed already); 1 failed or declined; 64 an unusable new passphrase,
or no terminal to ask on without --yes; 78 the configured key secret cannot be read.
"""

_STATS_EXAMPLES = """\
examples:
  esxi-reconciler repo stats                every repository: totals, per VM and per policy
  esxi-reconciler repo stats nas --json

logical: what restoring every point would write; data: of it not zeros (zeros are not stored);
unique: data after deduplication; stored: unique after compression, as on the volume; exclusive:
stored bytes no other VM (policy) shares, so forgetting all its points frees them after GC.
dedup = data / unique, compression = unique / stored, overall = logical / stored.

Exit 1 when a repository could not be read (the others are still shown).
"""

_KEY_WARNING = """\
Keep this key file and the repository's passphrase safe, apart from the repository and
from each other. The repository cannot be read without a key file AND its passphrase:
if both the key files in the repository and this copy are lost, or the passphrase is
forgotten, every restore point in it is lost for good. The file alone is useless
without the passphrase, but treat it as a secret anyway."""


_COPY_EXAMPLES = """\
examples:
  esxi-reconciler repo copy nas offsite                 every successful point offsite lacks
  esxi-reconciler repo copy nas offsite --vm 'web*'     only VMs matching a glob (repeatable)
  esxi-reconciler repo copy nas offsite --since 7d      only points of the last 7 days
  esxi-reconciler repo copy offsite nas --since 2026-12-01T00:00Z --vm db01   bring one VM back

Only chunks the destination lacks are sent; a point already there is skipped, so an interrupted
copy resumes when run again. Chunks are re-encrypted when the repositories' keys differ. Each
copied point is read back and checked in the destination. The destination's retention is that
of its CopyPolicy (the daemon prunes it); this verb prunes nothing.

Exit 1 when a point failed to copy or a repository failed (locked by a GC, unreachable).
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "repo",
        help="create a repository, export its key, free its garbage",
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
    key = add_command(
        verbs,
        "key",
        help="export, import or list key files; change the passphrase",
        description="The key files of an encrypted repository: each wraps its master key under a\n"
        "passphrase (the configured key secret). Without a key file AND its passphrase the backups\n"
        "cannot be read.",
        epilog=_KEY_EXAMPLES,
        handler=_key_usage,
    )
    keys = key.add_subparsers(dest="key_command", metavar="SUBCOMMAND")
    for name, listed in (("export", True), ("key-export", False)):
        # `repo key-export`: the earlier spelling, still accepted, not listed
        export = add_command(
            keys if listed else verbs,
            name,
            help="write the repository's key file to a file for safekeeping" if listed else None,
            description="Write the key file of REPOSITORY (the master key, wrapped by the passphrase) to\n"
            "FILE, readable by its owner only (mode 600). The passphrase is checked first.",
            epilog=_KEY_EXAMPLES,
            handler=cmd_repo_key_export,
        )
        export.add_argument("repository", metavar="REPOSITORY", help="name of a Repository document")
        export.add_argument("--out", metavar="FILE", type=Path, required=True, help="file to create")
    imp = add_command(
        keys,
        "import",
        help="put a saved key file back into the repository",
        description="Put a key file saved with `repo key export` back into REPOSITORY (e.g. after\n"
        "keys/ was lost), after checking it belongs to this repository and that the passphrase\n"
        "opens it: the configured key secret, or the one given with --passphrase-file/-env.",
        epilog=_KEY_EXAMPLES,
        handler=cmd_repo_key_import,
    )
    imp.add_argument("repository", metavar="REPOSITORY", help="name of a Repository document")
    imp.add_argument("file", metavar="FILE", type=Path, help="the saved key file")
    _passphrase_options(imp, "passphrase", "the key file's passphrase, if not the configured one")
    passwd = add_command(
        keys,
        "passwd",
        help="change the repository's passphrase",
        description="Change the passphrase of REPOSITORY from its configured key secret to a new one\n"
        "(asked twice on the terminal, or --new-passphrase-file/-env), crash-safe (see below).",
        epilog=_KEY_CHANGE_EXAMPLES,
        handler=cmd_repo_key_passwd,
    )
    passwd.add_argument("repository", metavar="REPOSITORY", help="name of a Repository document")
    _passphrase_options(passwd, "new-passphrase", "the new passphrase")
    add_yes_option(passwd, "changing the passphrase")
    klist = add_command(
        keys,
        "list",
        help="list the repository's key files",
        description="List the key files of REPOSITORY: id, creation time, and whether the configured\n"
        "key secret opens it.",
        epilog=_KEY_EXAMPLES,
        handler=cmd_repo_key_list,
    )
    klist.add_argument("repository", metavar="REPOSITORY", help="name of a Repository document")
    stats = add_command(
        verbs,
        "stats",
        help="what a repository holds and saves: logical vs stored bytes, dedup, compression",
        description="Show, for REPOSITORY (default: every configured one), in total, per VM and per\n"
        "policy: logical bytes (what restoring every point would write), data (not zeros), unique\n"
        "(after deduplication), stored (after compression), the ratios, and the chunks no point\n"
        "references (what `repo gc` frees). Reads every disk index under a shared lock.",
        epilog=_STATS_EXAMPLES,
        handler=cmd_repo_stats,
    )
    stats.add_argument(
        "repositories", metavar="REPOSITORY", nargs="*", help="names of Repository documents (default: all)"
    )
    gc = add_command(
        verbs,
        "gc",
        help="free the data no restore point references (garbage collection)",
        description="Delete from REPOSITORY (default: every configured one) the chunks, disk indexes and\n"
        "digest maps no restore point references, and the staged files killed runs left in tmp/;\n"
        "completes a GC that was interrupted. Runs under the repository's exclusive lock, so never\n"
        "while a backup, restore or verification holds it: then it waits up to --wait seconds and\n"
        "otherwise does nothing. The daemon runs GC by itself after pruning, after an interrupted GC\n"
        "and after a failed backup; this is for doing it now (e.g. on a full volume).",
        epilog=_GC_EXAMPLES,
        handler=cmd_repo_gc,
    )
    gc.add_argument(
        "repositories", metavar="REPOSITORY", nargs="*", help="names of Repository documents (default: all)"
    )
    copy = add_command(
        verbs,
        "copy",
        help="copy restore points to another repository (off-site copy)",
        description="Copy the successful restore points of SOURCE that DESTINATION lacks: local to S3,\n"
        "S3 to local, between two buckets. Incremental (only missing chunks are sent), resumable,\n"
        "re-encrypting when the keys differ, verified after the copy.",
        epilog=_COPY_EXAMPLES,
        handler=cmd_repo_copy,
    )
    copy.add_argument("source_repository", metavar="SOURCE", help="name of the Repository to copy from")
    copy.add_argument(
        "destination_repository", metavar="DESTINATION", help="name of the Repository to copy to"
    )
    copy.add_argument(
        "--vm", metavar="NAME", action="append", default=[], help="only this VM (a glob; repeatable)"
    )
    copy.add_argument(
        "--policy", metavar="NAME", action="append", default=[], help="only points of this BackupPolicy"
    )
    copy.add_argument(
        "--since",
        metavar="WHEN",
        type=since_argument,
        help="only points taken at or after WHEN: a date/time (2026-12-01, 2026-12-01T02:00Z) or an age (7d)",
    )
    gc.add_argument("--dry-run", action="store_true", help="report what would be removed; delete nothing")
    gc.add_argument(
        "--wait",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="wait up to this long for a running backup to release the repository (default: 0)",
    )


def _repo_usage(args: argparse.Namespace) -> int:
    fail("give a subcommand: init, key, stats, gc or copy (see repo --help)", "usage", "usage")


def _key_usage(args: argparse.Namespace) -> int:
    fail("give a subcommand: export, import, passwd or list (see repo key --help)", "usage", "usage")


def _passphrase_options(parser: argparse.ArgumentParser, prefix: str, what: str) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        f"--{prefix}-file",
        metavar="FILE",
        type=Path,
        help=f"read {what} from FILE (mode 600; one trailing newline is ignored)",
    )
    source.add_argument(
        f"--{prefix}-env", metavar="VAR", help=f"read {what} from the environment variable VAR"
    )


def _given_passphrase(file: Path | None, env: str | None, prompt: str | None) -> str | None:
    """A passphrase from ``file``, the environment variable ``env``, or asked on the terminal
    (``prompt``, twice); None when none was given and there is no terminal (or no ``prompt``).
    Raises :class:`~reconciler.config.secrets.SecretError` (naming the source, never the value)."""
    import getpass

    from reconciler.config.secrets import Secret, SecretError

    if file is not None:
        return Secret("file", str(file)).reveal()
    if env is not None:
        return Secret("env", env).reveal()
    if prompt is None or not sys.stdin.isatty():
        return None
    first = getpass.getpass(f"{prompt}: ")
    if not first:
        raise SecretError("the passphrase is empty")
    if getpass.getpass(f"{prompt} (again): ") != first:
        raise SecretError("the two passphrases differ")
    return first


def secret_text(secret: Secret) -> str:
    """Where a secret is read from, for people: ``file /etc/…``, ``environment variable X``, …"""
    kind = {"file": "file", "env": "environment variable", "credential": "systemd credential"}[secret.source]
    return f"{kind} {secret.name}"


def cmd_repo_init(args: argparse.Namespace) -> int:
    """``esxi-reconciler repo init REPOSITORY``: 0 created, 1 failed or exists, 64 bad input."""
    from reconciler.config.model import LocalBackendConfig
    from reconciler.operations.repositories import repository_backend
    from reconciler.repository import Repository
    from reconciler.repository.errors import RepositoryError

    cfg = repository_config(args, "repo init")
    path = cfg.backend.location
    if isinstance(cfg.backend, LocalBackendConfig):
        directory = Path(cfg.backend.path)
        if (directory / "config").exists():
            fail(f"repository {cfg.name}: {path} is already a repository; nothing done", "exists")
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            fail(f"repository {cfg.name}: {path} exists and is not empty; nothing done", "exists")
    key = cfg.encryption.key
    passphrase = key.reveal() if cfg.encryption.enabled and key is not None else None
    backend = repository_backend(cfg)
    if not isinstance(cfg.backend, LocalBackendConfig):
        if backend.exists("config"):
            fail(f"repository {cfg.name}: {path} is already a repository; nothing done", "exists")
        if any(True for _ in backend.list("keys")) or any(True for _ in backend.list("points")):
            fail(f"repository {cfg.name}: {path} holds objects; nothing done", "exists")
    try:
        repo = Repository.init(
            backend,
            passphrase,
            compression=cfg.compression.algorithm,
            compression_level=cfg.compression.level,
        )
    except RepositoryError as error:
        if "objects exist" in str(error):
            fail(f"repository {cfg.name}: {path} holds objects; nothing done", "exists")
        raise
    log.info("repo.init", repository=cfg.name, path=path, id=repo.id, encrypted=repo.encrypted)
    comp = cfg.compression
    compression = f"zstd level {comp.level}" if comp.algorithm == "zstd" else comp.algorithm
    encryption = f"encrypted (AES-256-GCM, key {repo.key_id})" if repo.encrypted else "NOT encrypted"
    print(f"created repository {cfg.name} at {path}: id {repo.id}, {encryption}, {compression}")
    elsewhere = (
        "another volume mounted at that path"
        if isinstance(cfg.backend, LocalBackendConfig)
        else "another repository under that bucket and prefix"
    )
    print(f"pin it: add `id: {repo.id}` to the spec of Repository {cfg.name}, so that {elsewhere} is refused")
    if repo.encrypted:
        print(
            f"next: esxi-reconciler repo key export {cfg.name} --out FILE, and keep that file and the"
            " passphrase safe: without them the backups cannot be read"
        )
    if args.json:
        emit_json(
            {
                "ok": True,
                "repository": cfg.name,
                "path": str(path),
                "id": repo.id,
                "encrypted": repo.encrypted,
                "key_id": repo.key_id,
                "compression": {"algorithm": comp.algorithm, "level": comp.level},
            }
        )
    return ExitCode.OK


def cmd_repo_key_export(args: argparse.Namespace) -> int:
    """``esxi-reconciler repo key export REPOSITORY --out FILE``: 0 written, 1 failed, 64 bad input."""
    import os

    from reconciler.operations.repositories import open_repository
    from reconciler.repository import export_key

    cfg = repository_config(args, "repo key export")
    if not cfg.encryption.enabled:
        fail(f"repository {cfg.name} is not encrypted; it has no key", "not-encrypted")
    out: Path = args.out
    repo = open_repository(cfg)  # checks the passphrase opens the key we export
    try:
        data = export_key(repo.backend, repo.key_id)
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
        fail(f"{out} exists; not overwritten (choose another file, or remove it first)", "exists")
    log.info("repo.key_export", repository=cfg.name, key=repo.key_id, out=str(out))
    print(f"wrote the key file of repository {cfg.name} (key {repo.key_id}) to {out} (mode 600)")
    print(_KEY_WARNING, file=sys.stderr)
    if args.json:
        emit_json({"ok": True, "repository": cfg.name, "key_id": repo.key_id, "out": str(out), "mode": "600"})
    return ExitCode.OK


def _key_err(command: str, message: str) -> None:
    print(f"esxi-reconciler repo key {command}: {printable(message)}", file=sys.stderr)


def cmd_repo_key_import(args: argparse.Namespace) -> int:
    """``repo key import REPOSITORY FILE``: 0 imported (or there already), 1 failed, 64 a bad key file."""
    from reconciler.config.secrets import SecretError
    from reconciler.operations.repositories import repository_backend
    from reconciler.repository import FormatError, Repository, RepositoryError, WrongKeyError, import_key
    from reconciler.repository.crypto import KeyFile

    cfg = repository_config(args, "repo key import")
    configured = cfg.encryption.key
    if not cfg.encryption.enabled or configured is None:
        fail(f"repository {cfg.name} is not encrypted; it has no key files", "not-encrypted", "usage")
    try:
        data = args.file.read_bytes()
    except OSError as error:
        fail(f"cannot read {args.file}: {error.strerror or error}", "not-found", "usage")
    try:
        keyfile = KeyFile.from_json(data, str(args.file))
    except FormatError as error:
        fail(f"{error}; give a file written by `repo key export`", "bad-key-file", "usage")
    try:
        given = _given_passphrase(args.passphrase_file, args.passphrase_env, None)
    except SecretError as error:
        fail(f"{error}; nothing imported", "usage", "usage")
    passphrase = given if given is not None else configured.reveal()
    path = cfg.backend.location
    target = repository_backend(cfg)
    present = target.exists(f"keys/{keyfile.id}.json")
    try:
        key_id = import_key(target, data, passphrase)
    except WrongKeyError:
        which = (
            "the given passphrase"
            if given is not None
            else f"the configured key secret ({secret_text(configured)})"
        )
        fail(
            f"{which} does not open key file {args.file} (key {keyfile.id}); nothing imported",
            "wrong-passphrase",
        )
    except RepositoryError as error:
        if "belongs to repository" not in str(error):
            raise
        fail(f"repository {cfg.name} ({path}): {error}; nothing imported", "foreign-key", "usage")
    opens_configured = given is None
    if given is not None:
        try:
            Repository.open(target, configured.reveal(), expect_encrypted=True, label=cfg.name)
            opens_configured = True
        except (SecretError, RepositoryError):
            opens_configured = False
    log.info("repo.key_import", repository=cfg.name, key=key_id, already_present=present)
    if present:
        print(f"key {key_id} is already in repository {cfg.name} ({path}); nothing changed")
    else:
        print(
            f"imported key {key_id} into repository {cfg.name} ({path}): its passphrase opens the repository"
        )
    if not opens_configured:
        _key_err(
            "import",
            f"note: the configured key secret ({secret_text(configured)}) opens no key file of repository"
            f" {cfg.name}: put the passphrase of this key there, or backups fail",
        )
    if args.json:
        emit_json(
            {
                "ok": True,
                "repository": cfg.name,
                "path": str(path),
                "key_id": key_id,
                "already_present": present,
                "configured_secret_opens": opens_configured,
            }
        )
    return ExitCode.OK


def cmd_repo_key_passwd(args: argparse.Namespace) -> int:
    """``repo key passwd REPOSITORY``: 0 changed (or already), 1 failed or declined, 64 bad input or not
    asked, 78 the configured key secret cannot be read."""
    from reconciler.config.secrets import SecretError
    from reconciler.operations.repositories import repository_backend
    from reconciler.repository import Repository, RepositoryError, WrongKeyError

    cfg = repository_config(args, "repo key passwd")
    secret = cfg.encryption.key
    if not cfg.encryption.enabled or secret is None:
        fail(f"repository {cfg.name} is not encrypted; it has no passphrase", "not-encrypted", "usage")
    path = cfg.backend.location
    target = repository_backend(cfg)
    old = secret.reveal()
    try:
        new = _given_passphrase(
            args.new_passphrase_file,
            args.new_passphrase_env,
            None if args.json else f"New passphrase for repository {cfg.name}",
        )
    except SecretError as error:  # the new passphrase as given is unusable: bad input
        fail(f"{error}; nothing changed", "usage", "usage")
    if new is None:
        fail(
            "no terminal to ask for the new passphrase (or --json): give --new-passphrase-file or"
            " --new-passphrase-env; nothing changed",
            "usage",
            "usage",
        )
    if new == old:
        fail(
            f"the new passphrase is the one configured ({secret_text(secret)}) already; nothing changed",
            "usage",
            "usage",
        )
    try:
        repo = Repository.open(target, old, expect_encrypted=True, label=cfg.name)
    except WrongKeyError:
        try:  # an earlier run got past deleting the old key files, or the passphrase was changed already
            done = Repository.open(target, new, expect_encrypted=True, label=cfg.name)
        except RepositoryError:
            fail(
                f"neither the configured key secret ({secret_text(secret)}) nor the new passphrase opens"
                f" repository {cfg.name} ({path}); nothing changed",
                "wrong-passphrase",
            )
        return _passwd_done(
            args, cfg.name, path, secret_text(secret), done.key_id or "", (), (), already=True
        )
    ask(
        args,
        f"Change the passphrase of repository {cfg.name} ({path})? Afterwards only the new one opens it:"
        f" the configuration's key secret ({secret_text(secret)}) must be updated, or backups fail.",
        "nothing changed",
    )
    change = repo.change_passphrase(old, new)
    log.info("repo.key_passwd", repository=cfg.name, key=change.key_id, removed=list(change.removed))
    return _passwd_done(
        args, cfg.name, path, secret_text(secret), change.key_id, change.removed, change.others
    )


def _passwd_done(
    args: argparse.Namespace,
    name: str,
    path: str,
    secret: str,
    key_id: str,
    removed: tuple[str, ...],
    others: tuple[str, ...],
    *,
    already: bool = False,
) -> int:
    if already:
        print(
            f"the new passphrase opens repository {name} ({path}) already, the configured one does not:"
            " the change was made before (an earlier run may have been interrupted after it)"
        )
    else:
        gone = f", removed key file {', '.join(removed)}" if removed else ""
        print(f"changed the passphrase of repository {name} ({path}): new key file {key_id}{gone}")
    print(
        f"now put the new passphrase where the configuration reads it ({secret}); until then backups and the"
        f" daemon fail with 'wrong passphrase'. Key files exported earlier need the OLD passphrase: export"
        f" the new one (esxi-reconciler repo key export {name} --out FILE) and destroy the old copies.",
        file=sys.stderr,
    )
    if others:
        print(
            f"note: {plural(len(others), 'other key file')} ({', '.join(others)}) still open the repository"
            " with their own passphrases (repo key list)",
            file=sys.stderr,
        )
    if args.json:
        emit_json(
            {
                "ok": True,
                "repository": name,
                "path": str(path),
                "key_id": key_id,
                "removed": list(removed),
                "others": list(others),
                "already_changed": already,
                "secret": secret,
            }
        )
    return ExitCode.OK


def cmd_repo_key_list(args: argparse.Namespace) -> int:
    """``repo key list REPOSITORY``: 0 listed, 1 failed, 64 bad input, 78 the key secret is unreadable."""
    from reconciler.operations.repositories import repository_backend
    from reconciler.repository import list_keys

    cfg = repository_config(args, "repo key list")
    secret = cfg.encryption.key
    if not cfg.encryption.enabled or secret is None:
        fail(f"repository {cfg.name} is not encrypted; it has no key files", "not-encrypted", "usage")
    path = cfg.backend.location
    keys = list_keys(repository_backend(cfg), secret.reveal())
    print(f"repository {cfg.name} ({path}): {plural(len(keys), 'key file')}")
    for k in keys:
        opens = "opens with the configured key secret" if k.opens else "another passphrase"
        print(f"  {k.id}  created {k.created[:19].replace('T', ' ')} UTC  {opens}")
    if not any(k.opens for k in keys):
        _key_err(
            "list",
            f"the configured key secret ({secret_text(secret)}) opens no key file: backups fail until it"
            " holds the right passphrase, or import a key file saved for it (repo key import)",
        )
    if args.json:
        rows = [{"id": k.id, "created": k.created, "opens": k.opens} for k in keys]
        emit_json(
            {
                "ok": True,
                "repository": cfg.name,
                "path": str(path),
                "secret": secret_text(secret),
                "keys": rows,
            }
        )
    return ExitCode.OK


def cmd_repo_stats(args: argparse.Namespace) -> int:
    """``repo stats [REPOSITORY...]``: 0 shown, 1 a repository could not be read, 64 bad input."""
    from reconciler.operations.failures import explain
    from reconciler.operations.repositories import open_repository
    from reconciler.repository.stats import usage_report

    desired = load_desired(args)
    names: list[str] = args.repositories or sorted(desired.repositories)
    for name in names:
        if name not in desired.repositories:
            unknown_name("repo stats", "Repository", name, sorted(desired.repositories))
    if not names:
        fail("no repositories configured", "no-repositories", "config")
    status = ExitCode.OK
    results: list[dict[str, Any]] = []
    for name in names:
        cfg = desired.repositories[name]
        entry: dict[str, Any] = {"repository": name, "path": cfg.backend.location}
        results.append(entry)
        try:
            repo = open_repository(cfg)
            with repo.lock(purpose="stats"):
                report = usage_report(repo, repo.list_points())
        except Exception as error:
            explained = explain(error)
            if explained is None:
                raise
            status = ExitCode.FAILED
            message = explained.message if name in explained.message else f"repository {name}: {explained}"
            entry.update(ok=False, error=message)
            print(f"esxi-reconciler repo stats: {printable(message)}", file=sys.stderr)
            continue
        entry.update(ok=True, error=None, **report.to_dict())
        _print_stats(name, cfg.backend.location, entry)
    if args.json:
        emit_json({"ok": status == ExitCode.OK, "repositories": results})
    return status


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _print_stats(name: str, path: object, entry: dict[str, Any]) -> None:
    total = entry["total"]
    volume = entry["volume"]
    vms = entry["vms"]
    print(
        f"repository {name} ({path}): {plural(total['points'], 'restore point')} of {plural(len(vms), 'VM')}"
        f" in {plural(len(entry['policies']), 'policy', 'policies')}"
    )
    print(f"  logical  {human_size(total['logical_bytes']):>10}  what restoring every point would write")
    print(f"  data     {human_size(total['data_bytes']):>10}  of it not zeros (zeros are not stored)")
    dedup, compression = _ratio(total["dedup_ratio"]), _ratio(total["compression_ratio"])
    print(f"  unique   {human_size(total['unique_bytes']):>10}  after deduplication: {dedup}")
    print(
        f"  stored   {human_size(total['stored_bytes']):>10}  after compression: {compression}"
        f" (overall {_ratio(total['reduction_ratio'])})"
    )
    garbage = ""
    if volume["unreferenced_chunks"]:
        garbage = (
            f", of which {human_size(volume['unreferenced_bytes'])} in"
            f" {plural(volume['unreferenced_chunks'], 'chunk')} no point references"
            f" (repo gc {name} frees them)"
        )
    print(f"  volume   {human_size(volume['bytes']):>10}  in {plural(volume['chunks'], 'chunk')}{garbage}")
    if volume["missing_chunks"]:
        print(
            f"  MISSING  {plural(volume['missing_chunks'], 'referenced chunk')}:"
            f" run esxi-reconciler verify {name}"
        )
    columns = ("POINTS", "LOGICAL", "DATA", "UNIQUE", "STORED", "EXCLUSIVE", "DEDUP", "COMPRESSION")
    for title, keys, rows in (
        ("VM", ("vm", "host"), vms),
        ("POLICY", ("policy",), entry["policies"]),
    ):
        if not rows:
            continue
        print()
        table = [(title, *(["HOST"] if len(keys) > 1 else []), *columns)]
        for row in rows:
            table.append(
                (
                    *(printable(row[k]) for k in keys),
                    str(row["points"]),
                    *(
                        human_size(row[f"{k}_bytes"])
                        for k in ("logical", "data", "unique", "stored", "exclusive")
                    ),
                    _ratio(row["dedup_ratio"]),
                    _ratio(row["compression_ratio"]),
                )
            )
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for r in table:
            print("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def cmd_repo_gc(args: argparse.Namespace) -> int:
    """``esxi-reconciler repo gc [REPOSITORY...] [--dry-run]``: 0 done, 1 failed or deferred, 64 bad input."""
    from reconciler.config.secrets import SecretError
    from reconciler.operations.prune import collect
    from reconciler.operations.repositories import open_repository
    from reconciler.repository.errors import RepositoryError, StorageError

    desired = load_desired(args)
    if args.wait < 0:
        fail("--wait must not be negative", "usage", "usage")
    names: list[str] = args.repositories or sorted(desired.repositories)
    for name in names:
        if name not in desired.repositories:
            unknown_name("repo gc", "Repository", name, sorted(desired.repositories))
    if not names:
        fail("no repositories configured", "no-repositories", "config")
    status = 0
    results: list[dict[str, Any]] = []
    for name in names:
        cfg = desired.repositories[name]
        entry: dict[str, Any] = {"repository": name, "path": cfg.backend.location, "dry_run": args.dry_run}
        results.append(entry)
        try:
            repo = open_repository(cfg)
            result = collect(repo, wait_seconds=args.wait, dry_run=args.dry_run)
        except (SecretError, RepositoryError, OSError) as error:
            status = 1
            log.error("repo.gc_failed", repository=name, error=str(error))
            entry.update({"ok": False, "error": str(error), "deferred": None})
            why = (
                str(error)
                if isinstance(error, StorageError) or name in str(error)
                else f"repository {name}: {error}"
            )
            print(f"esxi-reconciler repo gc: {why}", file=sys.stderr)
            continue
        if result.report is None:
            status = 1
            entry.update({"ok": False, "error": None, "deferred": result.deferred})
            print(
                f"esxi-reconciler repo gc: repository {name}: {result.deferred}; run it again when that"
                " is done, or give --wait SECONDS",
                file=sys.stderr,
            )
            continue
        entry.update({"ok": True, "error": None, "deferred": None, **result.report.to_dict()})
        if not args.json:
            print(gc_line(name, cfg.backend.location, result.report))
    if args.json:
        emit_json({"ok": status == 0, "repositories": results})
    return status


def gc_line(name: str, path: object, report: GcReport) -> str:
    """``repository nas (/srv/nas): removed 12 chunks (48.0 MiB), ...; 1234 chunks in use by 5 points``."""
    parts = []
    if report.unreferenced_chunks:
        parts.append(
            f"{plural(report.unreferenced_chunks, 'chunk')} ({human_size(report.unreferenced_bytes)})"
        )
    if report.unreferenced_indexes:
        parts.append(plural(report.unreferenced_indexes, "disk index", "disk indexes"))
    if report.unreferenced_digest_maps:
        parts.append(plural(report.unreferenced_digest_maps, "digest map"))
    if report.tmp_files:
        parts.append(f"{plural(report.tmp_files, 'staged file')} in tmp/ ({human_size(report.tmp_bytes)})")
    verb = "would remove" if report.dry_run else "removed"
    done = f"{verb} {', '.join(parts)}" if parts else "nothing to remove"
    kept = f"{plural(report.referenced_chunks, 'chunk')} in use by {plural(report.points, 'restore point')}"
    line = f"repository {name} ({path}): {done}; {kept}"
    if report.interrupted_at is not None:
        when = report.interrupted_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        line += f"; {'would complete' if report.dry_run else 'completed'} the GC interrupted at {when}"
    if report.dry_run:
        line += " (dry run: nothing deleted)"
    return line


def cmd_repo_copy(args: argparse.Namespace) -> int:
    """``esxi-reconciler repo copy SRC DST``: 0 copied (or nothing to do), 1 a point or a repository
    failed, 64 bad input, 78 bad config."""
    from reconciler.operations.copy import PointCopy, copy_points
    from reconciler.operations.repositories import open_repository

    source, destination = args.source_repository, args.destination_repository
    desired = load_desired(args)
    known = sorted(desired.repositories)
    for name in (source, destination):
        if name not in desired.repositories:
            unknown_name("repo copy", "Repository", name, known)
    if source == destination:
        fail("SOURCE and DESTINATION are the same repository; name two different ones", "usage", "usage")
    for policy in args.policy:
        if policy not in desired.policies:
            unknown_name("repo copy", "BackupPolicy", policy, sorted(desired.policies))
    src_cfg, dst_cfg = (
        desired.repositories[source],
        desired.repositories[destination],
    )
    src = open_repository(src_cfg)
    dst = open_repository(dst_cfg)
    if src.id == dst.id:
        fail(
            f"repositories {source} and {destination} are the same repository (id {src.id}); nothing to copy",
            "usage",
            "usage",
        )

    def show(item: PointCopy) -> None:
        when = item.time.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        if item.decision == "copied":
            sent = f"{plural(item.chunks_uploaded, 'chunk')} sent ({human_size(item.bytes_uploaded)})"
            there = f"{item.chunks_present} already there"
            line = f"copied {item.vm}@{when} ({item.policy}): {sent}, {there}; verified"
        elif item.decision == "present":
            line = f"present {item.vm}@{when} ({item.policy}): already in {destination}"
        else:
            line = f"FAILED {item.vm}@{when} ({item.policy}): {item.error}"
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    try:
        report = copy_points(
            src,
            dst,
            vms=args.vm,
            policies=args.policy,
            since=args.since,
            purpose=f"copy {source} -> {destination}",
            progress=show,
        )
    finally:
        src.backend.close()
        dst.backend.close()
    log.info(
        "repo.copy",
        source=source,
        destination=destination,
        copied=report.count("copied"),
        present=report.count("present"),
        failed=report.count("failed"),
        bytes_uploaded=report.bytes_uploaded,
    )
    mode = "re-encrypted" if report.reencrypted else "blobs copied unchanged"
    summary = (
        f"repository {source} -> {destination}: {plural(report.count('copied'), 'point')} copied,"
        f" {report.count('present')} already there, {report.count('failed')} failed;"
        f" {human_size(report.bytes_uploaded)} sent ({mode}) in {report.seconds:.1f} s"
    )
    print(summary, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        emit_json(
            {
                "ok": report.ok,
                **report.to_dict(),
                "source_repository": source,
                "destination_repository": destination,
            }
        )
    return ExitCode.OK if report.ok else ExitCode.FAILED
