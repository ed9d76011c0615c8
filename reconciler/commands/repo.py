"""``esxi-reconciler repo init|key-export|gc``: create a repository, save its key, free its garbage."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from reconciler.commands.common import add_command, load_desired, plural, repository_config
from reconciler.units import human_size

if TYPE_CHECKING:
    from reconciler.repository.gc import GcReport

log = structlog.get_logger("reconciler.cli")


_REPO_EXAMPLES = """\
examples:
  esxi-reconciler repo init nas
  esxi-reconciler repo key-export nas --out /media/usb/nas-repository.key
  esxi-reconciler repo gc nas --dry-run      what garbage collection would free
  esxi-reconciler repo gc                    free it in every repository

exit status: 0 done, 1 failed (e.g. the repository exists; GC deferred), 2 usage or configuration error
"""

_GC_EXAMPLES = """\
examples:
  esxi-reconciler repo gc nas --dry-run     what would be removed; nothing is deleted
  esxi-reconciler repo gc nas               remove it now (fails if a backup is running)
  esxi-reconciler repo gc --wait 600        every repository, waiting up to 10 min for backups

Prints per repository what was removed: chunks and their size, disk indexes, digest maps,
staged files left in tmp/ by killed runs, and whether an interrupted GC was completed.

exit status: 0 done, 1 GC failed or deferred (a backup holds the repository), 2 usage or
configuration error
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
    gc.add_argument("--dry-run", action="store_true", help="report what would be removed; delete nothing")
    gc.add_argument(
        "--wait",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="wait up to this long for a running backup to release the repository (default: 0)",
    )
    gc.add_argument("--json", action="store_true", help="JSON output")


def _repo_usage(args: argparse.Namespace) -> int:
    print(
        "esxi-reconciler repo: give a subcommand: init, key-export or gc (see repo --help)", file=sys.stderr
    )
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
    from reconciler.operations.repositories import open_repository
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


def cmd_repo_gc(args: argparse.Namespace) -> int:
    """``esxi-reconciler repo gc [REPOSITORY...] [--dry-run]``: 0 done, 1 failed or deferred, 2 bad input."""
    import difflib

    from reconciler.config.secrets import SecretError
    from reconciler.operations.prune import collect
    from reconciler.operations.repositories import open_repository
    from reconciler.repository.errors import RepositoryError, StorageError

    desired = load_desired(args)
    if desired is None:
        return 2
    if args.wait < 0:
        print("esxi-reconciler repo gc: --wait must not be negative", file=sys.stderr)
        return 2
    names: list[str] = args.repositories or sorted(desired.repositories)
    unknown = [n for n in names if n not in desired.repositories]
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(desired.repositories), n=1)
        configured = ", ".join(sorted(desired.repositories)) or "none"
        hint = f"; did you mean {close[0]!r}?" if close else f" (configured: {configured})"
        print(f"esxi-reconciler repo gc: no Repository named {name!r}{hint}", file=sys.stderr)
    if unknown:
        return 2
    if not names:
        print("esxi-reconciler repo gc: no repositories configured", file=sys.stderr)
        return 2
    status = 0
    results: list[dict[str, Any]] = []
    for name in names:
        cfg = desired.repositories[name]
        entry: dict[str, Any] = {"repository": name, "path": str(cfg.backend.path), "dry_run": args.dry_run}
        results.append(entry)
        try:
            repo = open_repository(cfg)
            result = collect(repo, wait_seconds=args.wait, dry_run=args.dry_run)
        except (SecretError, RepositoryError, OSError) as error:
            status = 1
            log.error("repo.gc_failed", repository=name, error=str(error))
            entry.update({"ok": False, "error": str(error), "deferred": None})
            if not args.json:
                why = str(error) if isinstance(error, StorageError) else f"repository {name}: {error}"
                print(f"esxi-reconciler repo gc: {why}", file=sys.stderr)
            continue
        if result.report is None:
            status = 1
            entry.update({"ok": False, "error": None, "deferred": result.deferred})
            if not args.json:
                print(
                    f"esxi-reconciler repo gc: repository {name}: {result.deferred}; run it again when that"
                    " is done, or give --wait SECONDS",
                    file=sys.stderr,
                )
            continue
        entry.update({"ok": True, "error": None, "deferred": None, **result.report.to_dict()})
        if not args.json:
            print(_gc_line(name, cfg.backend.path, result.report))
    if args.json:
        print(json.dumps({"ok": status == 0, "repositories": results}, indent=2, ensure_ascii=False))
    return status


def _gc_line(name: str, path: object, report: GcReport) -> str:
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
