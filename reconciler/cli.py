"""The single command-line entry point: one sub-command per verb (validate, plan, apply, run, ...).

Each verb lives in its own small function that parses nothing itself: argparse does the parsing here,
so ``esxi-reconciler --help`` shows every verb in one place.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from reconciler import __version__

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """Return the parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="esxi-reconciler",
        description="Agentless, GitOps-style backup for VMware ESXi virtual machines.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_validate(commands)
    return parser


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``--config DIR``, shared by every verb that reads the desired state."""
    parser.add_argument(
        "--config",
        metavar="DIR",
        type=Path,
        help="config directory (or a single file); default: $ESXI_RECONCILER_CONFIG or"
        " /etc/esxi-reconciler/config.d",
    )


# -- validate ----------------------------------------------------------------------------------------

_VALIDATE_EXAMPLES = """\
examples:
  esxi-reconciler validate config.example/
  esxi-reconciler validate --config /etc/esxi-reconciler/config.d --resolve-secrets
  esxi-reconciler validate --format json | jq '.errors[] | "\\(.file):\\(.line) \\(.message)"'

exit status: 0 valid, 1 invalid, 2 usage error
"""


def _add_validate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "validate",
        help="check the desired-state config without touching any host",
        description="Check every YAML file of the config: syntax, schemas, references between objects.\n"
        "All errors are reported at once, with file, line, column and field. Nothing is contacted.",
        epilog=_VALIDATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "directory", nargs="?", type=Path, metavar="DIR", help="config directory (same as --config)"
    )
    add_config_option(parser)
    parser.add_argument(
        "--format", choices=("text", "json"), default="text", help="output format (default: text)"
    )
    parser.add_argument(
        "--resolve-secrets",
        action="store_true",
        help="also read every secret reference once (values are never shown)",
    )
    parser.set_defaults(handler=cmd_validate)


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else (plural or word + 's')}"


def cmd_validate(args: argparse.Namespace) -> int:
    """``esxi-reconciler validate``: exit 0 when the config is valid, 1 when not."""
    from reconciler.config import ConfigError, default_config_dir, load_config

    if args.directory is not None and args.config is not None and args.directory != args.config:
        print(
            "esxi-reconciler validate: give the config directory either as DIR or --config, not both",
            file=sys.stderr,
        )
        return 2
    path: Path = args.directory or args.config or default_config_dir()
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named on the command line and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
