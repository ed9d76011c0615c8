"""``esxi-reconciler history``: the event log and job history of the status store."""

from __future__ import annotations

import argparse
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from reconciler.commands.common import (
    ExitCode,
    add_command,
    emit_json,
    fail,
    plural,
    since_argument,
    state_dir,
)
from reconciler.printable import printable

if TYPE_CHECKING:
    from reconciler.status.history import Event

_HISTORY_EXAMPLES = """\
examples:
  esxi-reconciler history                   the newest 50 events
  esxi-reconciler history --vm web01        every backup of web01 (mode, bytes, duration, each disk)
  esxi-reconciler history --policy web-daily --since 7d
  esxi-reconciler history --failed --since 2026-11-01
  esxi-reconciler history --kind notify     what was sent to the notifiers, and what not
  esxi-reconciler history --json --since 24h

Reads the status file of the state directory (status.db) read-only, so it works while
the daemon runs. Kinds: backup, prune, gc, cbt, remove-snapshot, verify, test-restore,
restore, export, config, condition, notify, daemon, error. The history is kept for
`run --keep-history` (default 400 days; per-disk detail `--keep-history-detail`, 90 days).
Exit 0; 3 when there is no status data (has the daemon run with this --state-dir?).
"""

DEFAULT_LIMIT = 50
MESSAGE_WIDTH = 90


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (no limit) or more")
    return value


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from reconciler.status.history import EVENT_KINDS

    parser = add_command(
        commands,
        "history",
        help="show the event log: backups, prunes, verifications, config reloads, notifications",
        description="Show what happened, newest first: every backup (per VM and disk: mode and why, bytes "
        "read, sent and stored, duration), prune, GC, CBT change, restore, verification, config reload, "
        "condition change, notification and error, with its time, config revision and outcome.",
        epilog=_HISTORY_EXAMPLES,
        handler=cmd_history,
    )
    parser.add_argument("--vm", metavar="NAME", help="only this VM (display name, or HOST/NAME)")
    parser.add_argument("--policy", metavar="NAME", help="only this backup or verify policy")
    parser.add_argument("--repository", metavar="NAME", help="only this repository")
    parser.add_argument(
        "--kind",
        metavar="KIND",
        action="append",
        choices=EVENT_KINDS,
        help="only events of KIND (repeatable)",
    )
    parser.add_argument("--failed", action="store_true", help="only what failed")
    parser.add_argument(
        "--since",
        metavar="WHEN",
        type=since_argument,
        help="only since WHEN: a duration ago (7d, 24h) or a date",
    )
    parser.add_argument(
        "--limit",
        metavar="N",
        type=_limit,
        default=DEFAULT_LIMIT,
        help=f"at most N events, newest first (0: all); default: {DEFAULT_LIMIT}",
    )


def _when(value: datetime) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}Z"


def _clip(text: str, width: int) -> str:
    text = printable(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _duration(event: Event) -> str:
    from reconciler.rules.durations import format_duration

    seconds = event.seconds
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.0f}s"
    return format_duration(timedelta(seconds=round(seconds)))


def _disk_lines(event: Event) -> list[str]:
    from reconciler.units import human_size

    lines = []
    for disk in event.detail.get("disks", ()):
        if not isinstance(disk, dict):
            continue
        reasons = "; ".join(str(r) for r in disk.get("reasons", ())) or disk.get("fallback_reason") or ""
        lines.append(
            f"    {printable(str(disk.get('label', '?')))}: {disk.get('mode', '?')},"
            f" {human_size(int(disk.get('bytes_read', 0)))} read,"
            f" {human_size(int(disk.get('bytes_stored', 0)))} stored"
            + (f" ({printable(reasons)})" if reasons else "")
        )
    return lines


def cmd_history(args: argparse.Namespace) -> int:
    from reconciler.status.history import HistoryQuery
    from reconciler.status.store import StatusStore, StatusStoreError, status_path

    directory = state_dir(args)
    try:
        store = StatusStore.open(status_path(directory), readonly=True)
    except StatusStoreError as exc:
        fail(
            f"no status data: {exc} (has the daemon run with --state-dir {directory}?)",
            "no-status",
            "incomplete",
        )
    query = HistoryQuery(
        since=args.since,
        kinds=tuple(args.kind or ()),
        vm=args.vm,
        policy=args.policy,
        repository=args.repository,
        outcomes=("failed",) if args.failed else (),
        limit=args.limit or None,
    )
    with store:
        events = store.events.events(query)

    if args.json:
        doc: dict[str, Any] = {
            "query": {
                "since": args.since.isoformat() if args.since else None,
                "kinds": list(query.kinds),
                "vm": args.vm,
                "policy": args.policy,
                "repository": args.repository,
                "failed": args.failed,
                "limit": query.limit,
            },
            "count": len(events),
            "events": [e.to_dict() for e in events],
        }
        emit_json(doc)
        return ExitCode.OK

    if not events:
        filtered = any((args.since, args.kind, args.vm, args.policy, args.repository, args.failed))
        print("no events recorded" + (" that match" if filtered else " yet"))
        return ExitCode.OK
    rows = [("TIME", "KIND", "SUBJECT", "OUTCOME", "TOOK", "WHAT")]
    extra: dict[int, list[str]] = {}
    for event in events:
        rows.append(
            (
                _when(event.time),
                event.kind,
                _clip(event.subject, 40),
                event.outcome,
                _duration(event),
                _clip(event.message, MESSAGE_WIDTH),
            )
        )
        if event.kind == "backup" and args.vm:
            extra[len(rows) - 1] = _disk_lines(event)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        for line in extra.get(index, ()):
            print(line)
    more = (
        " (the newest; --limit 0 shows all)" if query.limit is not None and len(events) == query.limit else ""
    )
    print(f"\n{plural(len(events), 'event')}{more}")
    return ExitCode.OK
