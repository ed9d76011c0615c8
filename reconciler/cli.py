"""The single command-line entry point: one sub-command per verb (validate, plan, apply, run, ...).

Each verb lives in its own small function that parses nothing itself: argparse does the parsing here,
so ``esxi-reconciler --help`` shows every verb in one place.

Adding a verb: a module in :mod:`reconciler.commands` with ``register(commands)``, listed in
:data:`COMMANDS`; it registers itself with :func:`add_command` (which gives it the global options, so
they work before or after the verb name) and reads the config with :func:`load_desired`. :func:`main` has
configured logging (:mod:`reconciler.log`) before the verb runs; log with ``structlog.get_logger()``.
Command output goes to stdout, logs to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from reconciler import __version__
from reconciler.config import default_config_dir
from reconciler.config.loader import CONFIG_ENV, DEFAULT_CONFIG_DIR
from reconciler.log import LOG_FORMATS, LOG_LEVELS, configure_logging
from reconciler.units import human_size as human_size  # re-exported: the commands import it from here

if TYPE_CHECKING:
    from reconciler.config.model import DesiredState
    from reconciler.config.model import Repository as RepositoryConfig

COMMANDS: tuple[str, ...] = (
    "validate",
    "plan",
    "apply",
    "repo",
    "backup",
    "points",
    "verify",
    "restore",
    "export",
    "run",
    "status",
)
"""Modules of :mod:`reconciler.commands`, in the order ``--help`` lists them."""

STATE_ENV = "STATE_DIRECTORY"
DEFAULT_STATE_DIR = Path("/var/lib/esxi-reconciler")

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
  esxi-reconciler plan                      show what would be done now, and why
  esxi-reconciler apply                     do it: show the plan, ask, execute
  esxi-reconciler apply tonight.plan        execute a plan saved by plan --out (if still current)
  esxi-reconciler repo init nas             create the repository configured as nas
  esxi-reconciler repo key-export nas --out /safe/place/nas.key
                                            save its key file (keep it apart from the repository)
  esxi-reconciler repo gc nas --dry-run     what garbage collection would free (repo gc: free it)
  esxi-reconciler backup web-daily          back up every VM of a policy now
  esxi-reconciler points --vm web01         list the restore points of a VM
  esxi-reconciler verify                    check every repository can be restored (reads all data)
  esxi-reconciler verify nas --read-data-subset 10%
                                            ditto, reading a random tenth of the data
  esxi-reconciler restore web01             restore its newest point as a new VM
  esxi-reconciler restore web01 --overwrite
                                            put it back over web01 itself (asks first)
  esxi-reconciler export web01 --to DIR     write its newest point as local files
  esxi-reconciler run                       the daemon: reconcile until stopped (systemd runs this)
  esxi-reconciler status                    Ready/Reconciling/Stalled per host, VM, policy, repository
  esxi-reconciler COMMAND --help            options and examples of one command

Global options may come before or after the command. Command output goes to
stdout, logs to stderr: readable lines on a terminal, else JSON lines (with
<N> priority prefixes when stderr is the systemd journal, see JOURNAL_STREAM).
Secret values are never printed or logged.

environment:
  {CONFIG_ENV}  the config directory when --config is not given
                          (else {DEFAULT_CONFIG_DIR})
  STATE_DIRECTORY         the state directory when --state-dir is not given
                          (else /var/lib/esxi-reconciler)
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
        "--state-dir",
        metavar="DIR",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"where status and run history are kept; default: ${STATE_ENV} (set by systemd) or"
        f" {DEFAULT_STATE_DIR}",
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


_GLOBAL_DEFAULTS: dict[str, Any] = {
    "config": None,
    "state_dir": None,
    "log_format": "auto",
    "log_level": "info",
}


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
    for name in COMMANDS:
        importlib.import_module(f"reconciler.commands.{name}").register(commands)
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


def state_dir(args: argparse.Namespace) -> Path:
    """The state directory: ``--state-dir``, else ``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``; the
    first entry if several), else :data:`DEFAULT_STATE_DIR`."""
    given: Path | None = args.state_dir
    if given is not None:
        return given
    env = os.environ.get(STATE_ENV, "").split(":")[0]
    return Path(env) if env else DEFAULT_STATE_DIR


def plural(count: int, word: str, plural: str | None = None) -> str:
    """``"1 host"``, ``"3 hosts"``; ``plural`` for irregular words."""
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


def repository_config(args: argparse.Namespace, command: str) -> RepositoryConfig | None:
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
