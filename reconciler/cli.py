"""The single command-line entry point: one sub-command per verb (validate, plan, apply, run, ...).

Each verb lives in its own small function that parses nothing itself: argparse does the parsing here,
so ``esxi-reconciler --help`` shows every verb in one place.

Adding a verb: a module in :mod:`reconciler.commands` with ``register(commands)``, listed in
:data:`COMMANDS`; it registers itself with :func:`reconciler.commands.common.add_command` (which gives
it the global options, so they work before or after the verb name) and reads the config with
:func:`~reconciler.commands.common.load_desired`. :func:`main` has configured logging
(:mod:`reconciler.log`) before the verb runs; log with ``structlog.get_logger()``. Command output goes
to stdout, logs to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

import structlog

from reconciler import __version__
from reconciler.allocator import tune_allocator
from reconciler.commands.common import (
    EXIT_CODES_HELP,
    GLOBAL_DEFAULTS,
    ExitCode,
    Handler,
    UsageParser,
    failure_line,
    global_options_parent,
    json_mode,
    record_command,
    report_failure,
)
from reconciler.config.loader import CONFIG_ENV, DEFAULT_CONFIG_DIR
from reconciler.log import configure_logging

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
    "mount",
    "files",
    "run",
    "status",
    "history",
    "notify",
    "schema",
    "completion",
)
"""Modules of :mod:`reconciler.commands`, in the order ``--help`` lists them."""

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
  esxi-reconciler repo key export nas --out /safe/place/nas.key
                                            save its key file (keep it apart from the repository)
  esxi-reconciler repo key passwd nas       change its passphrase (key import: put a saved key back)
  esxi-reconciler repo stats                logical vs stored bytes, dedup and compression ratios
  esxi-reconciler repo gc nas --dry-run     what garbage collection would free (repo gc: free it)
  esxi-reconciler backup web-daily          back up every VM of a policy now
  esxi-reconciler points --vm web01         list the restore points of a VM
  esxi-reconciler points protect ID         keep a point whatever the retention (unprotect: undo)
  esxi-reconciler points forget ID --gc     delete a point now and free its data (asks first)
  esxi-reconciler verify                    check every repository can be restored (reads all data)
  esxi-reconciler verify nas --read-data-subset 10%
                                            ditto, reading a random tenth of the data
  esxi-reconciler history --vm web01 --since 7d
                                            its backups of the last week (mode, bytes, took)
  esxi-reconciler notify test ops-mail      send a test message through a Notifier
  esxi-reconciler restore web01             restore its newest point as a new VM
  esxi-reconciler restore web01 --overwrite
                                            put it back over web01 itself (asks first)
  esxi-reconciler export web01 --to DIR     write its newest point as local files
  esxi-reconciler run                       the daemon: reconcile until stopped (systemd runs this)
  esxi-reconciler status                    Ready/Reconciling/Stalled per host, VM, policy, repository
  esxi-reconciler schema host --path        the JSON Schema of a config kind, for editors
  esxi-reconciler completion bash           the shell completion script (make install installs it)
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

{EXIT_CODES_HELP}
"""


def build_parser() -> argparse.ArgumentParser:
    """Return the parser with every sub-command registered."""
    parser = UsageParser(
        prog="esxi-reconciler",
        description="Agentless, GitOps-style backup for VMware ESXi virtual machines.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[global_options_parent()],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.set_defaults(**GLOBAL_DEFAULTS, root_parser=parser)  # for the verbs that describe the parser
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"reconciler.commands.{name}").register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named on the command line and return its exit code (README "Exit codes").

    Every verb ends here: an expected failure it raises (:class:`reconciler.operations.failures.Failure`,
    or an exception :func:`~reconciler.operations.failures.explain` knows) is reported in one line, or as
    the JSON error object with ``--json``; anything else is a bug, reported in one line asking for ``-v``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    tune_allocator()
    log.debug("command", command=args.command, version=__version__)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return int(ExitCode.USAGE)
    error: str | None = None
    started = datetime.now(timezone.utc)
    with json_mode(args.json):
        try:
            code = int(handler(args))
        except KeyboardInterrupt:
            print(f"esxi-reconciler {args.command}: interrupted", file=sys.stderr)
            code, error = int(ExitCode.INTERRUPTED), "interrupted"
        except BrokenPipeError:
            # `| head` has read enough: stop quietly (stdout to /dev/null, so that the flush at exit
            # does not fail again)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code, error = int(ExitCode.PIPE), "the reader of the output went away"
        except Exception as exc:
            code, error = report_failure(args, exc), failure_line(exc)
        else:
            error = None if code == ExitCode.OK else f"exit code {code}"
        record_command(args, code, error, started)
        return code


if __name__ == "__main__":
    sys.exit(main())
