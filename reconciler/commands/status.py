"""``esxi-reconciler status``: what the daemon concluded, per object, from the status store."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.commands.common import ExitCode, add_command, config_dir, emit_json, fail, plural, state_dir
from reconciler.printable import printable

if TYPE_CHECKING:
    from collections.abc import Mapping

    from reconciler.daemon.heartbeat import Heartbeat
    from reconciler.planning.observed import RunRecord
    from reconciler.status.conditions import Condition
    from reconciler.status.history import Event
    from reconciler.status.source import SourceStatus
    from reconciler.status.store import PlanRecord

_STATUS_EXAMPLES = """\
examples:
  esxi-reconciler status                    conditions of every host, VM, policy and repository
  esxi-reconciler status --json             the same as JSON (for scripts and monitoring)
  esxi-reconciler --state-dir /srv/state status

Reads the status file of the state directory (status.db) read-only, so it works
while the daemon runs, and the config for the policies' recovery-point objectives.
A monitoring check: exit 0 healthy; 1 unhealthy, with one line per reason:
  daemon-not-running  a daemon has used this state directory (daemon.json) and is not
                      running now (--no-daemon: none is expected, e.g. cron runs `run --once`)
  stale               the data is older than the daemon's resync interval allows
                      (1.1 x resync + 1 min after the last cycle; --max-age overrides)
  stalled             an object is Stalled (its REASON and MESSAGE say why)
  rpo-missed          a VM has no successful backup within its policy's RPO (spec.rpo;
                      default: twice the longest interval between scheduled runs)
  rpo-unchecked       the config cannot be loaded, so the RPOs could not be checked
  notify-failed       a Notifier's last message was not sent (`history --kind notify`)
3 when there is no status data at all (has the daemon run with this --state-dir?).
"""

STALE_GRACE = timedelta(minutes=1)
"""Beyond the resync interval (with its jitter), how late a cycle may start before the data is stale."""
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
    parser.add_argument(
        "--no-daemon",
        action="store_true",
        help="no daemon is expected to run (runs come from cron: `run --once` or `apply --yes`)",
    )
    parser.add_argument(
        "--max-age",
        metavar="DURATION",
        type=_duration,
        help="the status data is stale when the last cycle ended longer ago than this; default: from the"
        " daemon's resync interval (1.1 x resync + 1m); without a daemon: not checked",
    )


def _duration(text: str) -> timedelta:
    from reconciler.config import parse_interval

    try:
        value = parse_interval(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= timedelta(0):
        raise argparse.ArgumentTypeError(f"{text!r} must be longer than zero")
    return value


@dataclass(frozen=True)
class Problem:
    """One reason ``status`` is unhealthy: a stable word and one line for people."""

    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def _age(delta: timedelta) -> str:
    from reconciler.rules.durations import format_duration

    return format_duration(delta)


def daemon_problems(
    now: datetime,
    beat: Heartbeat | None,
    running: bool,
    last_plan: PlanRecord | None,
    *,
    expect_daemon: bool,
    max_age: timedelta | None,
) -> list[Problem]:
    """Whether the daemon that should run does, and whether the data it left is fresh (pure)."""
    from reconciler.daemon.loop import RESYNC_JITTER

    problems = []
    daemon_used = beat is not None and not beat.once
    if expect_daemon and daemon_used and not running:
        assert beat is not None
        problems.append(
            Problem(
                "daemon-not-running",
                f"the daemon is not running (it last started {beat.started:%Y-%m-%d %H:%M}Z as PID"
                f" {beat.pid}); start it (systemctl start esxi-reconciler), or pass --no-daemon if runs"
                " come from cron",
            )
        )
    allowed = max_age
    if allowed is None and daemon_used and expect_daemon:
        assert beat is not None
        allowed = timedelta(seconds=beat.resync_seconds * (1 + RESYNC_JITTER)) + STALE_GRACE
    if allowed is None:
        return problems
    if running and beat is not None and beat.cycle_running:
        return problems  # a cycle is renewing the data now (a backup may take hours)
    candidates = [
        t for t in ((beat.cycle_finished if beat else None), last_plan.time if last_plan else None) if t
    ]
    last = max(candidates) if candidates else None
    if last is None:
        problems.append(Problem("stale", "no cycle has finished yet"))
    elif now - last > allowed:
        problems.append(
            Problem(
                "stale",
                f"the status data is {_age(now - last)} old (last cycle {last:%Y-%m-%d %H:%M}Z); it may be"
                f" at most {_age(allowed)} old",
            )
        )
    return problems


def rpo_problems(now: datetime, policies: Any, history: dict[str, RunRecord]) -> list[Problem]:
    """VMs whose last successful backup is older than their policy's recovery-point objective (pure):
    ``policies`` maps names to BackupPolicy, ``history`` is the run records of the status store. The
    notifications judge alike (``stale``: :func:`reconciler.notify.rules.stale_vms`)."""
    from reconciler.notify.rules import stale_vms

    problems = []
    for policy_name, host, vm, record, rpo in stale_vms(now, policies, history):
        last = (
            f"last success {record.last_succeeded:%Y-%m-%d %H:%M}Z"
            if record.last_succeeded
            else "never succeeded"
        )
        problems.append(
            Problem(
                "rpo-missed",
                f"VM {host}/{vm} (policy {policy_name}): {last}, older than its RPO of {_age(rpo)}"
                + (f"; last error: {record.last_error}" if record.last_error else ""),
            )
        )
    return problems


def notify_problems(notifiers: Any, sends: Mapping[tuple[str, str], Event]) -> list[Problem]:
    """Notifiers of the config whose last message was not sent (pure): the owner would not hear of the
    next failure. ``sends``: the newest ``notify`` event per notifier, from the history."""
    problems = []
    for name in sorted(notifiers):
        last = sends.get(("notify", name))
        if last is not None and last.outcome == "failed":
            problems.append(
                Problem(
                    "notify-failed",
                    f"notifier {name}: the last message was not sent ({last.time:%Y-%m-%d %H:%M}Z:"
                    f" {last.detail.get('error') or last.message}); try `esxi-reconciler notify test {name}`",
                )
            )
    return problems


def _stalled_problems(conditions: list[Condition]) -> list[Problem]:
    stalled = [c for c in conditions if c.status == "Stalled"]
    if not stalled:
        return []
    shown = "; ".join(f"{c.kind} {c.name}: {c.reason}" for c in stalled[:3])
    more = f"; and {len(stalled) - 3} more" if len(stalled) > 3 else ""
    return [Problem("stalled", f"{plural(len(stalled), 'object')} Stalled: {shown}{more}")]


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


def source_lines(source: SourceStatus) -> list[str]:
    """The git source block: what was fetched, what is applied, what was refused and why."""
    from reconciler.status.source import short

    where = f" (path {printable(source.path)})" if source.path else ""
    signed = ", signed commits only" if source.verify else ""
    lines = [f"source: {printable(source.url)} {printable(source.ref)}{where}{signed}"]
    lines.append(f"  fetched      {short(source.fetched)}  {_when(source.fetched_at)}")
    if source.fetch_error is not None:
        since = _when(source.fetch_failing_since)
        lines.append(f"  fetch        FAILING since {since}: {_clip(source.fetch_error, 200)}")
    by = f"  signed by {printable(source.applied_signer)}" if source.applied_signer else ""
    lines.append(f"  applied      {short(source.applied)}  {_when(source.applied_at)}{by}")
    if source.failed is not None:
        lines.append(
            f"  last failed  {short(source.failed)}  {_when(source.failed_at)}  {source.failed_reason}:"
            f" {_clip(source.failed_message or '', 300)}"
        )
    if source.warning is not None:
        lines.append(f"  warning      {_when(source.warning_at)}  {_clip(source.warning, 300)}")
    return lines


def cmd_status(args: argparse.Namespace) -> int:  # noqa: C901  the verb's sources (store, daemon lock, heartbeat, config) each fail soft with their own line
    from reconciler.config import ConfigError, load_config
    from reconciler.config.loader import CONFIG_ENV
    from reconciler.daemon.heartbeat import read_heartbeat
    from reconciler.daemon.lock import running_daemon
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
    with store:
        source = store.source_status()
        conditions = store.conditions()
        last_plan = store.last_plan()
        failures = store.actions(limit=RECENT_FAILURES, status="failed")
        history = store.history()
        sends = store.events.latest(("notify",))
    running, pid = running_daemon(directory)
    beat = read_heartbeat(directory)
    now = datetime.now(timezone.utc)
    stalled = sum(c.status == "Stalled" for c in conditions)
    problems = daemon_problems(
        now, beat, running, last_plan, expect_daemon=not args.no_daemon, max_age=args.max_age
    )
    problems += _stalled_problems(conditions)
    path = config_dir(args)
    if source is not None and args.config is None:
        from reconciler.gitsource.clone import source_dir

        path = source_dir(directory) / "applied"  # the daemon follows a git source: its applied config
    explicit = args.config is not None or CONFIG_ENV in os.environ or Path(path).exists()
    rpo_checked = False
    try:
        desired = load_config(path)
    except ConfigError as error:
        if explicit:
            first = error.issues[0] if error.issues else error
            problems.append(
                Problem("rpo-unchecked", f"the config cannot be loaded, so RPOs were not checked: {first}")
            )
    else:
        rpo_checked = True
        problems += rpo_problems(now, desired.policies, history)
        problems += notify_problems(desired.notifiers, sends)
    code = ExitCode.FAILED if problems else ExitCode.OK

    if args.json:
        doc: dict[str, Any] = {
            "healthy": not problems,
            "problems": [p.to_dict() for p in problems],
            "daemon": {
                "running": running,
                "pid": pid,
                "expected": not args.no_daemon and beat is not None and not beat.once,
                "heartbeat": beat.to_dict() if beat else None,
            },
            "rpo_checked": rpo_checked,
            "conditions": [c.to_dict() for c in conditions],
            "last_plan": None,
            "recent_failures": [f.to_dict() for f in failures],
            "stalled": stalled,
            "source": source.to_dict() if source is not None else None,
        }
        if last_plan is not None:
            doc["last_plan"] = {
                "time": last_plan.time.isoformat(),
                "revision": last_plan.revision,
                "actions": last_plan.actions,
                "notices": last_plan.notices,
                "next_due": last_plan.next_due.isoformat() if last_plan.next_due else None,
            }
        emit_json(doc)
        return code

    print(f"daemon: {'running' + (f' (PID {pid})' if pid else '') if running else 'not running'}")
    if source is not None:
        print("\n".join(source_lines(source)) + "\n")
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
    if not rpo_checked:
        print(f"RPOs not checked: no config at {path} (give --config)")
    if problems:
        print("UNHEALTHY:")
        for p in problems:
            print(f"  {p.code}: {printable(p.message)}")
    else:
        print("healthy")
    return code
