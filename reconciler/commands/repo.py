"""``esxi-reconciler repo init|key-export|gc|copy``: create a repository, save its key, free its garbage,
copy restore points to another repository (an off-site copy)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from reconciler.commands.common import (
    ExitCode,
    add_command,
    emit_json,
    fail,
    load_desired,
    plural,
    repository_config,
    unknown_name,
)
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
    copy.add_argument("source", metavar="SOURCE", help="name of the Repository to copy from")
    copy.add_argument("destination", metavar="DESTINATION", help="name of the Repository to copy to")
    copy.add_argument(
        "--vm", metavar="NAME", action="append", default=[], help="only this VM (a glob; repeatable)"
    )
    copy.add_argument(
        "--policy", metavar="NAME", action="append", default=[], help="only points of this BackupPolicy"
    )
    copy.add_argument(
        "--since",
        metavar="WHEN",
        type=_since,
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


def _since(text: str) -> datetime:
    """``--since``: an ISO date/time (UTC unless it has an offset) or an age such as ``7d``."""
    from reconciler.config import parse_interval

    try:
        return datetime.now(timezone.utc) - parse_interval(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a date/time (2026-12-01T02:00Z) nor an age (7d, 12h)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _repo_usage(args: argparse.Namespace) -> int:
    fail("give a subcommand: init, key-export, gc or copy (see repo --help)", "usage", "usage")


def cmd_repo_init(args: argparse.Namespace) -> int:
    """``esxi-reconciler repo init REPOSITORY``: 0 created, 1 failed or exists, 64 bad input."""
    from reconciler.config.model import LocalBackend
    from reconciler.operations.repositories import repository_backend
    from reconciler.repository import Repository
    from reconciler.repository.errors import RepositoryError

    cfg = repository_config(args, "repo init")
    path = cfg.backend.location
    if isinstance(cfg.backend, LocalBackend):
        directory = Path(cfg.backend.path)
        if (directory / "config").exists():
            fail(f"repository {cfg.name}: {path} is already a repository; nothing done", "exists")
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            fail(f"repository {cfg.name}: {path} exists and is not empty; nothing done", "exists")
    key = cfg.encryption.key
    passphrase = key.reveal() if cfg.encryption.enabled and key is not None else None
    backend = repository_backend(cfg)
    if not isinstance(cfg.backend, LocalBackend):
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
    print(
        f"pin it: add `id: {repo.id}` to the spec of Repository {cfg.name}, so that another volume mounted"
        " at that path is refused"
    )
    if repo.encrypted:
        print(
            f"next: esxi-reconciler repo key-export {cfg.name} --out FILE, and keep that file and the"
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
    """``esxi-reconciler repo key-export REPOSITORY --out FILE``: 0 written, 1 failed, 64 bad input."""
    import os

    from reconciler.operations.repositories import open_repository
    from reconciler.repository import export_key

    cfg = repository_config(args, "repo key-export")
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
            print(_gc_line(name, cfg.backend.location, result.report))
    if args.json:
        emit_json({"ok": status == 0, "repositories": results})
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


def cmd_repo_copy(args: argparse.Namespace) -> int:
    """``esxi-reconciler repo copy SRC DST``: 0 copied (or nothing to do), 1 a point or a repository
    failed, 64 bad input, 78 bad config."""
    from reconciler.operations.copy import PointCopy, copy_points
    from reconciler.operations.repositories import open_repository

    desired = load_desired(args)
    known = sorted(desired.repositories)
    for name in (args.source, args.destination):
        if name not in desired.repositories:
            unknown_name("repo copy", "Repository", name, known)
    if args.source == args.destination:
        fail("SOURCE and DESTINATION are the same repository; name two different ones", "usage", "usage")
    for policy in args.policy:
        if policy not in desired.policies:
            unknown_name("repo copy", "BackupPolicy", policy, sorted(desired.policies))
    src_cfg, dst_cfg = desired.repositories[args.source], desired.repositories[args.destination]
    src = open_repository(src_cfg)
    dst = open_repository(dst_cfg)
    if src.id == dst.id:
        fail(
            f"repositories {args.source} and {args.destination} are the same repository (id {src.id});"
            " nothing to copy",
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
            line = f"present {item.vm}@{when} ({item.policy}): already in {args.destination}"
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
            purpose=f"copy {args.source} -> {args.destination}",
            progress=show,
        )
    finally:
        src.backend.close()
        dst.backend.close()
    log.info(
        "repo.copy",
        source=args.source,
        destination=args.destination,
        copied=report.count("copied"),
        present=report.count("present"),
        failed=report.count("failed"),
        bytes_uploaded=report.bytes_uploaded,
    )
    mode = "re-encrypted" if report.reencrypted else "blobs copied unchanged"
    summary = (
        f"repository {args.source} -> {args.destination}: {plural(report.count('copied'), 'point')} copied,"
        f" {report.count('present')} already there, {report.count('failed')} failed;"
        f" {human_size(report.bytes_uploaded)} sent ({mode}) in {report.seconds:.1f} s"
    )
    print(summary, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        emit_json(
            {
                "ok": report.ok,
                **report.to_dict(),
                "source_repository": args.source,
                "destination_repository": args.destination,
            }
        )
    return ExitCode.OK if report.ok else ExitCode.FAILED
