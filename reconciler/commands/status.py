"""``esxi-reconciler status``: what the daemon concluded, per object, from the status store."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

from reconciler.commands.common import add_command, plural, state_dir
from reconciler.printable import printable

_STATUS_EXAMPLES = """\
examples:
  esxi-reconciler status                    conditions of every host, VM, policy and repository
  esxi-reconciler status --json             the same as JSON (for scripts and monitoring)
  esxi-reconciler --state-dir /srv/state status

Reads the status file of the state directory (status.db) read-only, so it works
while the daemon runs. Exit code: 0 nothing stalled, 1 something is Stalled (or
no status has been recorded yet): suitable for a monitoring check.
"""

MESSAGE_WIDTH = 70
RECENT_FAILURES = 10


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "status",
        help="show the state of every object the daemon reconciles",
        description="Show the conditions (Ready, Reconciling, Stalled) the daemon recorded for the config, "
        "every host, VM, policy and repository, the last plan and the recent failures.",
        epilog=_STATUS_EXAMPLES,
        handler=cmd_status,
    )


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M}Z" if value else "-"


def _short_revision(revision: str | None) -> str:
    """``git:3f2a1b2c4d5e+dirty`` instead of forty hex digits (JSON keeps the full one)."""
    if not revision:
        return "-"
    scheme, _, rest = revision.partition(":")
    ident, plus, flag = rest.partition("+")
    return f"{scheme}:{ident[:12]}{plus}{flag}"


def _clip(text: str, width: int) -> str:
    text = printable(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_status(args: argparse.Namespace) -> int:
    from reconciler.daemon.lock import running_daemon
    from reconciler.status.store import StatusStore, StatusStoreError, status_path

    directory = state_dir(args)
    try:
        store = StatusStore.open(status_path(directory), readonly=True)
    except StatusStoreError as exc:
        print(
            f"esxi-reconciler status: {exc} (has the daemon run with --state-dir {directory}?)",
            file=sys.stderr,
        )
        return 1
    with store:
        conditions = store.conditions()
        last_plan = store.last_plan()
        failures = store.actions(limit=RECENT_FAILURES, status="failed")
    running, pid = running_daemon(directory)
    stalled = sum(c.status == "Stalled" for c in conditions)

    if args.json:
        doc: dict[str, Any] = {
            "daemon": {"running": running, "pid": pid},
            "conditions": [c.to_dict() for c in conditions],
            "last_plan": None,
            "recent_failures": [f.to_dict() for f in failures],
            "stalled": stalled,
        }
        if last_plan is not None:
            doc["last_plan"] = {
                "time": last_plan.time.isoformat(),
                "revision": last_plan.revision,
                "actions": last_plan.actions,
                "notices": last_plan.notices,
                "next_due": last_plan.next_due.isoformat() if last_plan.next_due else None,
            }
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 1 if stalled else 0

    print(f"daemon: {'running' + (f' (PID {pid})' if pid else '') if running else 'not running'}")
    header = ("KIND", "NAME", "STATUS", "REASON", "MESSAGE", "LAST-SUCCESS", "NEXT-DUE", "REVISION")
    table: list[tuple[str, ...]] = [header]
    for c in conditions:
        table.append(
            (
                c.kind,
                printable(c.name),
                c.status,
                c.reason,
                _clip(c.message, MESSAGE_WIDTH),
                _when(c.last_success),
                _when(c.next_due),
                _short_revision(c.revision),
            )
        )
    if conditions:
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    else:
        print("no conditions recorded yet")
    if last_plan is not None:
        print(
            f"\nlast plan: {_when(last_plan.time)} at {_short_revision(last_plan.revision)}: "
            f"{plural(last_plan.actions, 'action')}, {plural(last_plan.notices, 'notice')}, "
            f"next due {_when(last_plan.next_due)}"
        )
    if failures:
        print("\nrecent failures:")
        for f in failures:
            print(f"  {_when(f.time)}  {f.kind} {printable(f.subject)}: {_clip(f.error or 'failed', 100)}")
    print(f"\n{plural(len(conditions), 'object')}, {stalled} stalled")
    return 1 if stalled else 0
