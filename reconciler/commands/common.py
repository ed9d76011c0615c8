"""What every verb of :mod:`reconciler.commands` shares: the global options, registering a verb, the
config and state directories, the loaded config, the wording of counts (sizes:
:func:`reconciler.units.human_size`), and the outcome contract: the exit codes (:class:`ExitCode`), the
one-line report of an expected failure (:func:`report_failure`, messages from
:func:`reconciler.operations.failures.explain`) and ``--json`` output (:func:`emit_json`).

:mod:`reconciler.cli` builds the parser from the verbs and runs one; the verbs import only this module
of the command line, never :mod:`reconciler.cli`.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from reconciler.config import default_config_dir
from reconciler.config.loader import CONFIG_ENV, DEFAULT_CONFIG_DIR
from reconciler.log import LOG_FORMATS, LOG_LEVELS

if TYPE_CHECKING:
    from reconciler.config.model import DesiredState, RepositoryConfig

STATE_ENV = "STATE_DIRECTORY"
DEFAULT_STATE_DIR = Path("/var/lib/esxi-reconciler")

Handler = Callable[[argparse.Namespace], int]


class ExitCode(enum.IntEnum):
    """The exit codes of every verb (README "Exit codes"). 0-2 are Terraform's ``plan
    -detailed-exitcode``; usage and configuration errors take the sysexits.h numbers so that they never
    read as "changes"; 3 is "could not look" (Nagios' UNKNOWN)."""

    OK = 0
    """Success: everything that should have been done was done (``status``: healthy)."""
    FAILED = 1
    """The operation failed: something that should have been done was not (``status``: unhealthy)."""
    CHANGES = 2
    """Only with ``--detailed-exitcode``: ``plan`` found changes to make, ``apply`` made them."""
    INCOMPLETE = 3
    """Something could not be observed: ``plan --detailed-exitcode`` with an unreachable host or
    repository; ``status`` without status data."""
    USAGE = 64
    """The command line is wrong (EX_USAGE): unknown option, bad value, unknown name given."""
    SOFTWARE = 70
    """A bug (EX_SOFTWARE): one line asks for ``-v``, which shows the traceback."""
    CONFIG = 78
    """The configuration is missing or invalid, or a secret cannot be read (EX_CONFIG)."""
    INTERRUPTED = 130
    """Stopped by SIGINT (Ctrl-C); SIGTERM gives 143."""
    PIPE = 141
    """The reader of the output went away (``history | head``): nothing more written, no traceback; the
    shell's code for a process ended by SIGPIPE."""


EXIT_CODES_HELP = """\
exit codes: 0 success; 1 the operation failed; 2 changes (plan/apply --detailed-exitcode);
3 incomplete: a host or repository could not be observed (plan --detailed-exitcode), no
status data (status); 64 usage error; 70 internal error (run again with -v); 78 configuration
error; 130/143 interrupted by SIGINT/SIGTERM; 141 the reader of the output went away
(| head). See README "Exit codes"."""


class UsageParser(argparse.ArgumentParser):
    """argparse with the usage error code of :class:`ExitCode` (64, not argparse's 2, which would read as
    "changes" to a script running ``plan --detailed-exitcode``)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def _kind_code(kind: str) -> ExitCode:
    codes = {"config": ExitCode.CONFIG, "usage": ExitCode.USAGE, "incomplete": ExitCode.INCOMPLETE}
    return codes.get(kind, ExitCode.FAILED)


def fail(message: str, code: str = "failed", kind: str = "failed") -> NoReturn:
    """Stop the verb with an expected failure: :func:`reconciler.cli.main` reports it in one line (or as
    the JSON error object) and exits with the code of ``kind`` (failed 1, usage 64, config 78)."""
    from reconciler.operations.failures import Failure

    raise Failure(message, code, kind)  # type: ignore[arg-type]


def error_document(command: str, code: str, message: str, exit_code: int, **detail: Any) -> dict[str, Any]:
    """The JSON error object every verb prints with ``--json`` on an expected failure
    (``reconciler/commands/json_schemas/error.schema.json``)."""
    doc: dict[str, Any] = {
        "ok": False,
        "command": command,
        "error": {"code": code, "message": message, "exit_code": int(exit_code)},
    }
    if detail:
        doc["error"]["detail"] = detail
    return doc


_json_stream: list[TextIO] = []
"""Where :func:`emit_json` writes: the real stdout while :func:`json_mode` sends the rest to stderr."""


@contextlib.contextmanager
def json_mode(enabled: bool) -> Iterator[None]:
    """With ``--json``, stdout holds only the JSON document: whatever else a verb prints for people
    (progress, per-VM lines) goes to stderr while it runs."""
    if not enabled:
        yield
        return
    _json_stream.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _json_stream.pop()


def emit_json(doc: Any) -> None:
    """Print one JSON document on stdout (the only thing a verb prints there with ``--json``)."""
    stream = _json_stream[-1] if _json_stream else sys.stdout
    print(json.dumps(doc, indent=2, ensure_ascii=False, default=str), file=stream, flush=True)


def command_name(args: argparse.Namespace) -> str:
    """``backup``, ``repo gc``, ``repo key passwd``, ``points forget``, ``notify test``: how messages name
    the verb."""
    names = ("repo_command", "key_command", "points_command", "notify_command")
    subs = (getattr(args, name, None) for name in names)
    return " ".join(str(part) for part in (args.command, *subs) if part)


def failure_line(exc: BaseException) -> str:
    """The one line an exception that ended a verb is reported with (for the history)."""
    from reconciler.operations.failures import explain

    explained = explain(exc)
    return explained.message if explained is not None else f"internal error: {type(exc).__name__}: {exc}"


def report_failure(args: argparse.Namespace, exc: BaseException) -> int:
    """Report an exception that ended a verb and return its exit code: an expected failure in one line
    on stderr (and, with ``--json``, as the error object on stdout); anything else as a bug, whose
    traceback ``-v`` shows."""
    from reconciler.operations.failures import explain
    from reconciler.printable import printable

    command = command_name(args)
    explained = explain(exc)
    if explained is None:
        code = ExitCode.SOFTWARE
        message = (
            f"internal error: {type(exc).__name__}: {exc}; this is a bug: run again with -v to see the"
            " traceback, and report it"
        )
        if getattr(args, "log_level", "info") == "debug":
            traceback.print_exception(exc, file=sys.stderr)
        word = "internal-error"
    else:
        code, message, word = _kind_code(explained.kind), explained.message, explained.code
    print(f"esxi-reconciler {command}: {printable(message)}", file=sys.stderr, flush=True)
    if getattr(args, "json", False):
        emit_json(error_document(command, word, message, code))
    return int(code)


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
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="machine-readable output: one JSON document on stdout (docs/cli-json.md), also for errors",
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
    "json": False,
}


def global_options_parent() -> argparse.ArgumentParser:
    parent = UsageParser(add_help=False)
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
        epilog=f"{epilog.rstrip()}\n\n{EXIT_CODES_HELP}\n" if "exit codes:" not in epilog else epilog,
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


def load_desired(args: argparse.Namespace) -> DesiredState:
    """The validated desired state of ``--config``; an invalid or missing config prints every error on
    stderr and stops the verb with exit code 78 (:data:`ExitCode.CONFIG`)."""
    from reconciler.config import ConfigError, load_config

    try:
        return load_config(config_dir(args))
    except ConfigError as error:
        if len(error.issues) > 1 or getattr(args, "json", False):
            for issue in error.issues:
                print(issue, file=sys.stderr)
        raise


def unknown_name(command: str, kind: str, name: str, known: list[str]) -> NoReturn:
    """Stop with a usage error for a name given on the command line that the config does not have."""
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" (configured: {', '.join(known) or 'none'})"
    fail(f"no {kind} named {name!r}{hint}", "unknown-name", "usage")


def repository_config(args: argparse.Namespace, command: str) -> RepositoryConfig:
    """The named Repository of the config; an unknown name stops the verb (usage error, 64)."""
    desired = load_desired(args)
    if args.repository not in desired.repositories:
        unknown_name(command, "Repository", args.repository, sorted(desired.repositories))
    return desired.repositories[args.repository]


RECORDED_VERBS = ("backup", "restore", "export", "verify")
"""Verbs whose runs go into the history (``esxi-reconciler history``) next to the daemon's own work."""


def record_command(
    args: argparse.Namespace, code: int, error: str | None = None, started: datetime | None = None
) -> None:
    """Add a run of a data verb (:data:`RECORDED_VERBS`) to the history of the state directory: what was
    asked (from the command line, which holds no secret), when, and how it ended. Best effort: a user who
    cannot write the state directory still gets the verb's work, without a record. Only where a status
    file exists (the daemon's or ``apply``'s state directory), and not for a usage or configuration error
    (nothing was attempted)."""
    if args.command not in RECORDED_VERBS or code in (ExitCode.USAGE, ExitCode.CONFIG):
        return
    from reconciler.status.history import Event, EventOutcome
    from reconciler.status.store import StatusStore, status_path

    path = status_path(state_dir(args))
    if not path.exists():
        return
    vm: str | None = getattr(args, "vm", None)
    host: str | None = getattr(args, "from_host", None)
    policy: str | None = getattr(args, "policy", None)
    repository: str | None = getattr(args, "repository", None)
    repositories = getattr(args, "repositories", None)
    if args.command == "verify":
        subject = ", ".join(repositories or ()) or "every repository"
    elif args.command == "backup":
        subject = f"policy {policy}" + (f", VM {vm}" if vm else "")
    else:
        subject = f"{host}/{vm}" if host and vm else str(vm)
    asked = {
        k: v if isinstance(v, str | int | float | bool) or v is None else str(v)
        for k, v in sorted(vars(args).items())
        if k not in ("handler", "json", "log_format", "log_level", "config", "state_dir")
    }
    outcome: EventOutcome = "ok" if code in (ExitCode.OK, ExitCode.CHANGES) else "failed"
    event = Event(
        time=datetime.now(timezone.utc),
        kind=args.command,
        subject=subject,
        outcome=outcome,
        message=error or f"{command_name(args)} from the command line: done (exit {int(code)})",
        started=started,
        host=host,
        vm=vm,
        policy=policy,
        repository=repository,
        detail={"command_line": asked, "exit_code": int(code)},
    )
    try:
        with StatusStore.open(path) as store:
            store.events.record(event)
    except Exception:  # noqa: S110, BLE001  the record is a courtesy; the verb's output says what happened
        pass


def add_point_selection(parser: argparse.ArgumentParser) -> None:
    """``VM``, ``--point``, ``--from-host`` and ``--repository``: how every verb that reads one restore
    point (restore, export, files) names it (resolved by ``commands.restore.find_repository``)."""
    parser.add_argument("vm", metavar="VM", help="the VM's name as backed up (see `points`)")
    parser.add_argument("--point", metavar="ID", default="latest", help="restore point id; default: latest")
    parser.add_argument(
        "--from-host",
        metavar="H",
        help="the VM named VM as backed up on host H, when VMs of that name were backed up on several"
        " hosts (`points --vm VM` lists them)",
    )
    parser.add_argument("--repository", metavar="R", help="repository (default: the one holding the VM)")


def add_yes_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--yes``/``-y`` for a verb that destroys or replaces something (``what`` it does)."""
    parser.add_argument(
        "--yes", "-y", action="store_true", help=f"do not ask before {what} (needed without a terminal)"
    )


def ask(args: argparse.Namespace, question: str, nothing_done: str) -> None:
    """Go on only when ``--yes`` was given or the person answers yes to ``question`` on the terminal
    (asked on stderr). Otherwise stop the verb, saying ``nothing_done``: without a terminal, or with
    ``--json``, a usage error (64: add ``--yes``); answered no, ``declined`` (1)."""
    from reconciler.printable import printable

    if getattr(args, "yes", False):
        return
    if getattr(args, "json", False) or not sys.stdin.isatty():
        fail(
            f"not asking without a terminal (or with --json): pass --yes; {nothing_done}",
            "not-confirmed",
            "usage",
        )
    print(printable(question) + " [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        fail(f"not confirmed; {nothing_done}", "declined")


def since_argument(text: str) -> datetime:
    """An argparse ``type`` for ``--since``: an age such as ``7d`` or ``24h``, or an ISO date/time
    (``2026-11-01``, ``2026-11-01T02:00``; UTC unless it has an offset)."""
    from reconciler.config import parse_interval

    try:
        return datetime.now(timezone.utc) - parse_interval(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an age (7d, 24h) nor a date/time (2026-11-01, 2026-11-01T02:00Z)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
