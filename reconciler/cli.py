"""The single command-line entry point: one sub-command per verb (validate, plan, apply, run, ...).

Each verb lives in its own small function that parses nothing itself: argparse does the parsing here,
so ``esxi-reconciler --help`` shows every verb in one place.

Adding a verb: register it with :func:`add_command` (which gives it the global options, so they work
before or after the verb name) and read the config directory with :func:`config_dir`. :func:`main` has
configured logging (:mod:`reconciler.log`) before the verb runs; log with ``structlog.get_logger()``.
Command output goes to stdout, logs to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from reconciler import __version__
from reconciler.config import default_config_dir
from reconciler.config.loader import CONFIG_ENV, DEFAULT_CONFIG_DIR
from reconciler.log import LOG_FORMATS, LOG_LEVELS, configure_logging

if TYPE_CHECKING:
    from reconciler.config.model import DesiredState
    from reconciler.config.model import Repository as RepositoryConfig

Handler = Callable[[argparse.Namespace], int]

log = structlog.get_logger("reconciler.cli")  # not __name__: that is "__main__" under python -m

# Only the verbs that exist; each new verb adds its lines here.
_EXAMPLES = f"""\
examples:
  esxi-reconciler validate                  check the default config directory
  esxi-reconciler validate config.example/  check another directory
  esxi-reconciler --config /srv/esxi-config validate --resolve-secrets
  esxi-reconciler validate --format json config.example/
  esxi-reconciler -v --log-format json validate
                                            ditto, with debug logs as JSON lines
  esxi-reconciler repo init nas             create the repository configured as nas
  esxi-reconciler repo key-export nas --out /safe/place/nas.key
                                            save its key file (keep it apart from the repository)
  esxi-reconciler backup web-daily          back up every VM of a policy now
  esxi-reconciler points --vm web01         list the restore points of a VM
  esxi-reconciler COMMAND --help            options and examples of one command

Global options may come before or after the command. Command output goes to
stdout, logs to stderr: readable lines on a terminal, else JSON lines (with
<N> priority prefixes when stderr is the systemd journal, see JOURNAL_STREAM).
Secret values are never printed or logged.

environment:
  {CONFIG_ENV}  the config directory when --config is not given
                          (else {DEFAULT_CONFIG_DIR})
  NO_COLOR                no colours in terminal logs
"""


def add_global_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The options every verb shares: ``--config DIR``, ``--log-format``, ``--log-level``, ``-v``.

    Defined here and nowhere else. Their defaults are ``argparse.SUPPRESS`` so that a verb's copy does
    not overwrite a value given before the verb; :func:`build_parser` sets the real defaults once.
    """
    parser.add_argument(
        "--config",
        metavar="DIR",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"config directory (or a single file); default: ${CONFIG_ENV} or {DEFAULT_CONFIG_DIR}",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=argparse.SUPPRESS,
        help="log format on stderr: console (readable), json (one object per line) or auto (console on"
        " a terminal, else json); default: auto",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        type=str.lower,
        default=argparse.SUPPRESS,
        help="least severe level logged; default: info",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const="debug",
        default=argparse.SUPPRESS,
        help="same as --log-level debug",
    )


_GLOBAL_DEFAULTS: dict[str, Any] = {"config": None, "log_format": "auto", "log_level": "info"}


def _global_options_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    add_global_options(parent.add_argument_group("global options"))
    return parent


def build_parser() -> argparse.ArgumentParser:
    """Return the parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="esxi-reconciler",
        description="Agentless, GitOps-style backup for VMware ESXi virtual machines.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options_parent()],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(**_GLOBAL_DEFAULTS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_validate(commands)
    _add_repo(commands)
    _add_backup(commands)
    _add_points(commands)
    return parser


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    help: str,
    description: str,
    epilog: str,
    handler: Handler,
) -> argparse.ArgumentParser:
    """Register the verb ``name`` with the global options, its examples and its handler."""
    parser = commands.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options_parent()],
    )
    parser.set_defaults(handler=handler)
    return parser


def config_dir(args: argparse.Namespace) -> Path:
    """The config directory: ``--config``, else ``$ESXI_RECONCILER_CONFIG``, else the system default."""
    config: Path | None = args.config
    return config if config is not None else default_config_dir()


# -- validate ----------------------------------------------------------------------------------------

_VALIDATE_EXAMPLES = """\
examples:
  esxi-reconciler validate config.example/
  esxi-reconciler validate --config /etc/esxi-reconciler/config.d --resolve-secrets
  esxi-reconciler validate --format json | jq '.errors[] | "\\(.file):\\(.line) \\(.message)"'

exit status: 0 valid, 1 invalid, 2 usage error
"""


def _add_validate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "validate",
        help="check the desired-state config without touching any host",
        description="Check every YAML file of the config: syntax, schemas, references between objects.\n"
        "All errors are reported at once, with file, line, column and field. Nothing is contacted.",
        epilog=_VALIDATE_EXAMPLES,
        handler=cmd_validate,
    )
    parser.add_argument(
        "directory", nargs="?", type=Path, metavar="DIR", help="config directory (same as --config)"
    )
    parser.add_argument(
        "--format", choices=("text", "json"), default="text", help="output format (default: text)"
    )
    parser.add_argument(
        "--resolve-secrets",
        action="store_true",
        help="also read every secret reference once (values are never shown)",
    )


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else (plural or word + 's')}"


def load_desired(args: argparse.Namespace) -> DesiredState | None:
    """The validated desired state of ``--config``, or None after printing every error (the caller
    exits 2: a broken config is bad input)."""
    from reconciler.config import ConfigError, load_config

    try:
        return load_config(config_dir(args))
    except ConfigError as error:
        for issue in error.issues:
            print(issue, file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    """``esxi-reconciler validate``: exit 0 when the config is valid, 1 when not."""
    from reconciler.config import ConfigError, load_config

    if args.directory is not None and args.config is not None and args.directory != args.config:
        print(
            "esxi-reconciler validate: give the config directory either as DIR or --config, not both",
            file=sys.stderr,
        )
        return 2
    path: Path = args.directory if args.directory is not None else config_dir(args)
    log.debug("validate.start", config=str(path), resolve_secrets=args.resolve_secrets)
    try:
        desired = load_config(path, resolve_secrets=args.resolve_secrets)
    except ConfigError as error:
        if args.format == "json":
            result = {"valid": False, "config": str(path), "errors": [i.to_dict() for i in error.issues]}
            print(json.dumps(result, indent=2, ensure_ascii=False))
        else:
            for issue in error.issues:
                print(issue)
            files = {issue.file for issue in error.issues}
            print(f"FAILED: {_plural(len(error.issues), 'error')} in {_plural(len(files), 'file')} ({path})")
        return 1
    revision = desired.revision
    counts = {
        "hosts": len(desired.hosts),
        "repositories": len(desired.repositories),
        "policies": len(desired.policies),
        "verify_policies": len(desired.verify_policies),
    }
    if args.format == "json":
        result = {
            "valid": True,
            "config": str(path),
            "revision": {
                "id": revision.id,
                "commit": revision.commit,
                "dirty": revision.dirty,
                "digest": revision.digest,
            },
            "counts": counts,
            "errors": [],
            "warnings": [w.to_dict() for w in desired.warnings],
        }
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    for warning in desired.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    summary = ", ".join(
        (
            _plural(counts["hosts"], "host"),
            _plural(counts["repositories"], "repository", "repositories"),
            _plural(counts["policies"], "policy", "policies"),
            _plural(counts["verify_policies"], "verify policy", "verify policies"),
        )
    )
    print(f"OK: {summary} (revision {revision.id})")
    return 0


# -- repo --------------------------------------------------------------------------------------------

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


def _add_repo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _repository_config(args: argparse.Namespace, command: str) -> RepositoryConfig | None:
    """The named Repository of the config, or None after printing why (exit 2)."""
    import difflib

    desired = load_desired(args)
    if desired is None:
        return None
    if args.repository not in desired.repositories:
        names = sorted(desired.repositories)
        close = difflib.get_close_matches(args.repository, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (configured: {', '.join(names) or 'none'})"
        print(f"esxi-reconciler {command}: no Repository named {args.repository!r}{hint}", file=sys.stderr)
        return None
    return desired.repositories[args.repository]


def cmd_repo_init(args: argparse.Namespace) -> int:
    """``esxi-reconciler repo init REPOSITORY``: 0 created, 1 failed or exists, 2 bad input."""
    from reconciler.config.secrets import SecretError
    from reconciler.repository import Repository
    from reconciler.repository.errors import RepositoryError

    cfg = _repository_config(args, "repo init")
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
    from reconciler.engine.backup import open_repository
    from reconciler.repository import export_key
    from reconciler.repository.errors import RepositoryError

    cfg = _repository_config(args, "repo key-export")
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


# -- backup ------------------------------------------------------------------------------------------

_BACKUP_EXAMPLES = """\
examples:
  esxi-reconciler backup web-daily                  every VM the policy selects
  esxi-reconciler backup web-daily --vm "db 01"     one VM
  esxi-reconciler backup web-daily --full           read whole disks (no incremental)

Prints one line per VM: mode (full, cbt, digest), bytes read on the host, sent over
the network and newly stored, time and restore point id. SIGTERM/Ctrl-C stop the run
and remove the snapshots taken; no partial restore point is ever listed.

exit status: 0 every VM backed up, 1 some VM failed, 2 usage or configuration error
"""


def _add_backup(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "backup",
        help="back up the VMs of a policy now (one-shot)",
        description="Snapshot each VM of POLICY, read only what changed since its last restore point\n"
        "(CBT on licensed hosts, on-host block digests on free hosts), store a restore point.",
        epilog=_BACKUP_EXAMPLES,
        handler=cmd_backup,
    )
    parser.add_argument("policy", metavar="POLICY", help="name of a BackupPolicy")
    parser.add_argument("--vm", metavar="NAME", help="only this VM (display name, exact)")
    parser.add_argument("--full", action="store_true", help="read whole disks instead of changes")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def cmd_backup(args: argparse.Namespace) -> int:
    """``esxi-reconciler backup POLICY``: 0 when every VM succeeded, 1 when any failed, 2 on bad input."""
    import threading

    from reconciler.engine.backup import BackupError, BackupOptions, VmResult, backup_policy
    from reconciler.engine.progress import Progress
    from reconciler.esxi.host import sigterm_raises

    desired = load_desired(args)
    if desired is None:
        return 2

    cancel = threading.Event()
    progress = Progress()

    def show(res: VmResult) -> None:
        progress.clear_line()
        if res.ok:
            reason = f" (fallback: {res.fallback_reason})" if res.fallback_reason else ""
            print(
                f"{res.vm}: ok {res.mode} read {_size(res.bytes_read)} sent {_size(res.bytes_sent)}"
                f" stored {_size(res.bytes_stored)} in {res.seconds:.1f}s point {res.point_id}{reason}",
                flush=True,
            )
        else:
            kept = f" (point {res.point_id} kept)" if res.point_id else ""
            print(f"{res.vm}: FAILED after {res.seconds:.1f}s: {res.error}{kept}", flush=True)

    try:
        with sigterm_raises(), progress:
            results = backup_policy(
                desired,
                args.policy,
                vm=args.vm,
                options=BackupOptions(full=args.full, progress=progress),
                cancel=cancel,
                on_result=show,
            )
    except BackupError as error:
        print(f"esxi-reconciler backup: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esxi-reconciler backup: interrupted; snapshots removed, no partial point", file=sys.stderr)
        return 130
    except Exception as error:  # repository or host unreachable, secrets ...
        log.error("backup.failed", error=str(error))
        print(f"esxi-reconciler backup: {error}", file=sys.stderr)
        return 1
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} of {len(results)} VMs backed up", flush=True)
    return 1 if failed else 0


# -- points ------------------------------------------------------------------------------------------

_POINTS_EXAMPLES = """\
examples:
  esxi-reconciler points                    every restore point of every repository
  esxi-reconciler points --vm web01 --json  one VM's points as JSON
"""


def _add_points(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "points",
        help="list restore points",
        description="List the complete restore points of every configured repository, oldest first.",
        epilog=_POINTS_EXAMPLES,
        handler=cmd_points,
    )
    parser.add_argument("--vm", metavar="NAME", help="only points of this VM (display name)")
    parser.add_argument("--json", action="store_true", help="JSON output")


def cmd_points(args: argparse.Namespace) -> int:
    """``esxi-reconciler points``: 0, or 1 if a repository could not be read."""
    from reconciler.engine.backup import open_repository

    desired = load_desired(args)
    if desired is None:
        return 2
    rows: list[dict[str, Any]] = []
    status = 0
    for name, repo_cfg in desired.repositories.items():
        try:
            repo = open_repository(repo_cfg)
            with repo.lock(purpose="list points"):
                points = repo.list_points(vm=args.vm)
        except Exception as error:
            print(f"esxi-reconciler points: repository {name}: {error}", file=sys.stderr)
            status = 1
            continue
        for p in points:
            rows.append(
                {
                    "repository": name,
                    "id": p.id,
                    "policy": p.policy,
                    "vm": p.vm.name,
                    "host": p.vm.host,
                    "time": p.snapshot_time.isoformat(),
                    "status": p.status,
                    "mode": p.mode,
                    "fallback_reason": p.fallback_reason,
                    "protected": p.protected,
                    "size": sum(d.capacity for d in p.disks),
                    "read": sum(d.bytes_read for d in p.disks),
                    "sent": sum(d.bytes_sent for d in p.disks),
                    "stored": sum(d.bytes_stored for d in p.disks),
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return status
    if rows:
        header = ("ID", "REPOSITORY", "POLICY", "VM", "TIME", "STATUS", "MODE", "SIZE", "SENT", "STORED")
        table = [header]
        for r in rows:
            plain = [r[k] for k in ("id", "repository", "policy", "vm")]
            sizes = [_size(r[k]) for k in ("size", "sent", "stored")]
            table.append((*plain, r["time"][:19], r["status"], r["mode"], *sizes))
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    else:
        print("no restore points")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named on the command line and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    log.debug("command", command=args.command, version=__version__)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
