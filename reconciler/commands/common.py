"""What every verb of :mod:`reconciler.commands` shares: the global options, registering a verb, the
config and state directories, the loaded config, and the wording of counts (sizes:
:func:`reconciler.units.human_size`).

:mod:`reconciler.cli` builds the parser from the verbs and runs one; the verbs import only this module
of the command line, never :mod:`reconciler.cli`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.config import default_config_dir
from reconciler.config.loader import CONFIG_ENV, DEFAULT_CONFIG_DIR
from reconciler.log import LOG_FORMATS, LOG_LEVELS

if TYPE_CHECKING:
    from reconciler.config.model import DesiredState
    from reconciler.config.model import Repository as RepositoryConfig

STATE_ENV = "STATE_DIRECTORY"
DEFAULT_STATE_DIR = Path("/var/lib/esxi-reconciler")

Handler = Callable[[argparse.Namespace], int]


def add_global_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The options every verb shares: ``--config DIR``, ``--log-format``, ``--log-level``, ``-v``.

    Defined here and nowhere else. Their defaults are ``argparse.SUPPRESS`` so that a verb's copy does
    not overwrite a value given before the verb; :func:`reconciler.cli.build_parser` sets the real defaults
    once (:data:`GLOBAL_DEFAULTS`).
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


GLOBAL_DEFAULTS: dict[str, Any] = {
    "config": None,
    "state_dir": None,
    "log_format": "auto",
    "log_level": "info",
}


def global_options_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    add_global_options(parent.add_argument_group("global options"))
    return parent


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    help: str | None,
    description: str,
    epilog: str,
    handler: Handler,
) -> argparse.ArgumentParser:
    """Register the verb ``name`` with the global options, its examples and its handler; ``help=None``
    keeps it out of ``--help``, completion and the man page (an old spelling, an internal verb)."""
    listed: dict[str, Any] = {} if help is None else {"help": help}
    parser = commands.add_parser(
        name,
        **listed,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[global_options_parent()],
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


def add_yes_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--yes``/``-y`` for a verb that destroys or replaces something (``what`` it does)."""
    parser.add_argument(
        "--yes", "-y", action="store_true", help=f"do not ask before {what} (needed without a terminal)"
    )


def confirm(question: str) -> bool | None:
    """Ask ``question`` on the terminal: True/False as answered, None when there is no terminal to ask
    on (the caller then refuses with exit 2 and says to pass ``--yes``). Asked on stderr, so stdout
    stays the command's output."""
    from reconciler.printable import printable

    if not sys.stdin.isatty():
        return None
    print(printable(question) + " [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")
