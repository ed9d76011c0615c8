"""``esxi-reconciler validate``: check the config without contacting anything."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from reconciler.commands.common import ExitCode, add_command, config_dir, emit_json, fail, plural

if TYPE_CHECKING:
    from reconciler.config.errors import ConfigIssue
    from reconciler.config.model import DesiredState

log = structlog.get_logger("reconciler.cli")


_VALIDATE_EXAMPLES = """\
examples:
  esxi-reconciler validate config.example/
  esxi-reconciler validate --config /etc/esxi-reconciler/config.d --resolve-secrets
  esxi-reconciler validate --json | jq '.errors[] | "\\(.file):\\(.line) \\(.message)"'

An invalid config exits 78 (configuration error), like every verb given one.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        "--format", choices=("text", "json"), default="text", help="--format json: the same as --json"
    )
    parser.add_argument(
        "--resolve-secrets",
        action="store_true",
        help="also read every secret reference once (values are never shown)",
    )


def cmd_validate(args: argparse.Namespace) -> int:
    """``esxi-reconciler validate``: exit 0 when the config is valid, 78 when not."""
    from reconciler.config import ConfigError, load_config

    if args.format == "json":
        args.json = True
    if args.directory is not None and args.config is not None and args.directory != args.config:
        fail("give the config directory either as DIR or --config, not both", "usage", "usage")
    path: Path = args.directory if args.directory is not None else config_dir(args)
    log.debug("validate.start", config=str(path), resolve_secrets=args.resolve_secrets)
    try:
        desired = load_config(path, resolve_secrets=args.resolve_secrets)
    except ConfigError as error:
        if args.json:
            result = {"valid": False, "config": str(path), "errors": [i.to_dict() for i in error.issues]}
            emit_json(result)
        else:
            for issue in error.issues:
                print(issue)
            files = {issue.file for issue in error.issues}
            print(f"FAILED: {plural(len(error.issues), 'error')} in {plural(len(files), 'file')} ({path})")
        return ExitCode.CONFIG
    warnings = [*desired.warnings, *_notifier_warnings(desired)]
    revision = desired.revision
    counts = {
        "hosts": len(desired.hosts),
        "repositories": len(desired.repositories),
        "policies": len(desired.policies),
        "verify_policies": len(desired.verify_policies),
        "notifiers": len(desired.notifiers),
    }
    if args.json:
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
            "warnings": [w.to_dict() for w in warnings],
        }
        emit_json(result)
        return ExitCode.OK
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    summary = ", ".join(
        (
            plural(counts["hosts"], "host"),
            plural(counts["repositories"], "repository", "repositories"),
            plural(counts["policies"], "policy", "policies"),
            plural(counts["verify_policies"], "verify policy", "verify policies"),
            plural(counts["notifiers"], "notifier"),
        )
    )
    print(f"OK: {summary} (revision {revision.id})")
    return 0


def _notifier_warnings(desired: DesiredState) -> list[ConfigIssue]:
    """Notifiers whose URL apprise does not understand. A warning, not an error: the daemon loads such a
    config too (and logs ``notify.unusable``), since a notifier never stops backups; but the owner
    would hear nothing through it."""
    if not desired.notifiers:
        return []  # apprise is not even loaded
    from reconciler.config.errors import ConfigIssue
    from reconciler.notify.send import url_problem

    found = []
    for notifier in desired.notifiers.values():
        problem = url_problem(notifier)
        if problem is not None:
            found.append(ConfigIssue(notifier.source.file, notifier.source.line, 1, "spec.url", problem))
    return found
