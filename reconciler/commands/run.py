"""``esxi-reconciler run``: the daemon (see :mod:`reconciler.daemon`)."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.commands.common import (
    ExitCode,
    add_command,
    config_dir,
    emit_json,
    fail,
    load_desired,
    state_dir,
)

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

Exit 0 stopped by a signal, or --once and its cycle left nothing failed and
nothing Stalled; 1 another daemon holds the state directory, the state directory
is unusable, or --once and an action failed or an object is Stalled (`status`
says which); 64 --config with --source; 78 --once with an invalid config (or
with --source and no trusted revision), an invalid --source file, or a source
that cannot be followed (git missing, a signer key gpg cannot read). With
--json (only with --once): the cycle's result (docs/cli-json.md).
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
        "--keep-history",
        metavar="DURATION",
        type=_duration,
        default=timedelta(days=400),
        help="keep the event log (`esxi-reconciler history`) this long; default: 400d",
    )
    parser.add_argument(
        "--keep-history-detail",
        metavar="DURATION",
        type=_duration,
        default=timedelta(days=90),
        help="keep each backup's per-disk detail this long (the totals stay); default: 90d",
    )
    parser.add_argument(
        "--debounce",
        metavar="DURATION",
        type=_duration,
        default=timedelta(seconds=2),
        help="quiet period after config file events before re-reading; default: 2s",
    )


def _check_state_dir(directory: Path) -> None:
    """Stop with one line when the state directory cannot be used (a file, no permission, read-only),
    or another daemon holds it (who, since when)."""
    from datetime import datetime, timezone

    from reconciler.daemon.lock import LOCK_FILE, running_daemon
    from reconciler.operations.failures import explain

    if directory.exists() and not directory.is_dir():
        fail(
            f"state directory {directory} is a file, not a directory; give a directory with --state-dir",
            "state-directory",
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        explained = explain(exc, path_is=str(directory))
        assert explained is not None
        text = (
            explained.message.removeprefix(f"{exc.filename}: ")
            if exc.filename == str(directory)
            else explained.message
        )
        fail(f"state directory {directory}: {text}; or choose another with --state-dir", "state-directory")
    running, pid = running_daemon(directory)
    if running:
        lock = directory / LOCK_FILE
        try:
            since = datetime.fromtimestamp(lock.stat().st_mtime, timezone.utc).strftime(
                " since %Y-%m-%d %H:%M UTC"
            )
        except OSError:
            since = ""
        who = f"PID {pid}" if pid else "another process"
        fail(
            f"state directory {directory}: another esxi-reconciler daemon is running ({who}{since}, holding"
            f" {lock}); stop it (systemctl stop esxi-reconciler) or give another --state-dir",
            "daemon-running",
        )


def _source(args: argparse.Namespace) -> SourceTracker:
    """The git source of ``--source FILE``; a bad file stops the verb (every issue, exit 78)."""
    from reconciler.config.source import load_source
    from reconciler.daemon.source import SourceTracker

    if args.config is not None:
        fail("give either --config DIR or --source FILE, not both", "usage", "usage")
    from reconciler.config import ConfigError

    try:
        spec = load_source(args.source)
    except ConfigError as error:
        if len(error.issues) > 1 or args.json:
            for issue in error.issues:
                print(issue, file=sys.stderr)
        raise
    return SourceTracker(spec, state_dir(args))


def cmd_run(args: argparse.Namespace) -> int:
    from reconciler.daemon import Daemon
    from reconciler.status.history import Retention
    from reconciler.status.store import StatusStore, status_path

    directory = state_dir(args)
    if args.json and not args.once:
        fail("--json needs --once (the daemon reports through its log and `status --json`)", "usage", "usage")
    source = _source(args) if args.source is not None else None
    _check_state_dir(directory)
    if args.once and source is None:
        load_desired(args)  # an invalid config: every error and exit 78 now, as every verb
    daemon = Daemon(
        source.config_dir if source is not None else config_dir(args),
        directory,
        source=source,
        resync=args.resync.total_seconds(),
        debounce=args.debounce.total_seconds(),
        stop_timeout=args.stop_timeout.total_seconds(),
        once=args.once,
        history=Retention(
            keep=args.keep_history, keep_detail=min(args.keep_history_detail, args.keep_history)
        ),
    )
    code = daemon.run()
    if args.json and args.once:
        result = daemon.last_result
        stalled: list[dict[str, object]] = []
        try:
            with StatusStore.open(status_path(directory), readonly=True) as store:
                stalled = [c.to_dict() for c in store.conditions() if c.status == "Stalled"]
        except Exception as exc:  # noqa: BLE001  the cycle's own result still says what happened
            print(f"esxi-reconciler run: cannot list the Stalled objects: {exc}", file=sys.stderr)
        emit_json(
            {
                "ok": code == ExitCode.OK,
                "exit_code": code,
                "summary": result.summary if result else "no cycle ran",
                "next_due": result.next_due.isoformat() if result and result.next_due else None,
                "stalled": stalled,
            }
        )
    if daemon.abandoned:
        # A cycle thread is still inside a host call: do not let interpreter shutdown wait for it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code == ExitCode.FAILED and args.once and not args.json:
        print(
            "esxi-reconciler run: the cycle left something failed or Stalled:"
            " `esxi-reconciler status` says what",
            file=sys.stderr,
        )
    return code
