"""``esxi-reconciler run``: the daemon (see :mod:`reconciler.daemon`)."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.commands.common import add_command, config_dir, state_dir

if TYPE_CHECKING:
    from reconciler.daemon.source import SourceTracker

_RUN_EXAMPLES = """\
examples:
  esxi-reconciler run                       reconcile until stopped (what the systemd unit runs)
  esxi-reconciler run --once                one cycle (observe, plan, apply), then exit
  esxi-reconciler run --resync 15m --stop-timeout 5m
  esxi-reconciler run --source /etc/esxi-reconciler/source.yaml
                                            fetch the config from git (GitSource file): trusted
                                            commits only, the last good revision kept

signals: SIGHUP re-reads the config now (with --source: fetches now); SIGTERM or SIGINT cancels running
backups (their snapshots are removed), waits at most --stop-timeout and exits 0;
a second SIGTERM exits at once. Under systemd (Type=notify) it reports READY,
STATUS and WATCHDOG pings. One daemon per state directory (daemon.lock).

exit codes: 0 stopped by a signal (or --once and nothing failed), 1 another
daemon holds the state directory (or --once and an action failed), 2 --once
with an invalid config (or no trusted revision), an invalid --source file, or
a source that cannot be followed (git missing, a malformed signer key).
"""


def _duration(text: str) -> timedelta:
    from reconciler.config import parse_interval

    try:
        value = parse_interval(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= timedelta(0):
        raise argparse.ArgumentTypeError(f"{text!r} must be longer than zero")
    return value


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "run",
        help="run the reconciler daemon",
        description="Keep reality matching the config: watch the config directory, and on every change, "
        "SIGHUP, resync or due job observe the hosts and repositories, plan and apply what is due. "
        "An invalid config is reported and the last good one keeps running.",
        epilog=_RUN_EXAMPLES,
        handler=cmd_run,
    )
    parser.add_argument("--once", action="store_true", help="run one cycle, then exit")
    parser.add_argument(
        "--source",
        metavar="FILE",
        type=Path,
        help="follow a git remote instead of --config: the GitSource bootstrap file (URL, branch or tag,"
        " deploy key, pinned host keys, trusted signers); see README 'GitOps'",
    )
    parser.add_argument(
        "--resync",
        metavar="DURATION",
        type=_duration,
        default=timedelta(minutes=5),
        help="re-observe at least this often even without file events (jittered ±10%%); default: 5m",
    )
    parser.add_argument(
        "--stop-timeout",
        metavar="DURATION",
        type=_duration,
        default=timedelta(seconds=120),
        help="on SIGTERM, wait at most this long for running backups to unwind; default: 120s "
        "(keep systemd's TimeoutStopSec= above it)",
    )
    parser.add_argument(
        "--debounce",
        metavar="DURATION",
        type=_duration,
        default=timedelta(seconds=2),
        help="quiet period after config file events before re-reading; default: 2s",
    )


def _source(args: argparse.Namespace) -> SourceTracker | None:
    """The git source of ``--source FILE``, or None after printing why it is unusable (exit 2)."""
    from reconciler.config import ConfigError
    from reconciler.config.source import load_source
    from reconciler.daemon.source import SourceTracker

    if args.config is not None:
        print("esxi-reconciler run: give either --config DIR or --source FILE, not both", file=sys.stderr)
        return None
    try:
        spec = load_source(args.source)
    except ConfigError as error:
        for issue in error.issues:
            print(issue, file=sys.stderr)
        return None
    return SourceTracker(spec, state_dir(args))


def cmd_run(args: argparse.Namespace) -> int:
    from reconciler.daemon import Daemon

    source = None
    if args.source is not None:
        source = _source(args)
        if source is None:
            return 2
    daemon = Daemon(
        source.config_dir if source is not None else config_dir(args),
        state_dir(args),
        source=source,
        resync=args.resync.total_seconds(),
        debounce=args.debounce.total_seconds(),
        stop_timeout=args.stop_timeout.total_seconds(),
        once=args.once,
    )
    code = daemon.run()
    if daemon.abandoned:
        # A cycle thread is still inside a host call: do not let interpreter shutdown wait for it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
