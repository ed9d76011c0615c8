"""``esxi-reconciler apply [PLANFILE]``: make reality match the config, once, now.

Without PLANFILE it observes, plans, shows the plan and asks before acting (``--yes`` for scripts). With
a plan saved by ``plan --out`` it executes exactly that plan, but only if the config and the observed
state are still what the plan was made from: a stale plan is refused without touching anything.
"""

from __future__ import annotations

import argparse
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from reconciler.commands.common import ExitCode, add_command, emit_json, fail, load_desired, plural, state_dir
from reconciler.printable import printable
from reconciler.units import human_size

if TYPE_CHECKING:
    from reconciler.config.model import DesiredState
    from reconciler.planning.actions import Outcome, Plan
    from reconciler.planning.observed import ObservedState

log = structlog.get_logger("reconciler.cli")

_APPLY_EXAMPLES = """\
examples:
  esxi-reconciler apply                     plan, show it, ask, then do it
  esxi-reconciler apply --yes               the same without asking (cron, scripts)
  esxi-reconciler plan --out tonight.plan   review a plan (e.g. in a pull request) ...
  esxi-reconciler apply tonight.plan        ... and run exactly it, unless reality changed since

Prints one line per action as it finishes (ok, FAILED, skipped, with the reason) and a summary.
Transient faults (connection lost, timeouts, a busy repository) are retried with backoff; terminal
ones (foreign snapshot, no space, licence, bad credentials) are not. SIGTERM/Ctrl-C stop the run:
running backups remove their snapshots, the remaining actions are skipped.

Exit 0 every action ok (with --detailed-exitcode: 0 nothing to do, 2 changes applied); 1 an
action failed, the saved plan is stale, or a host or repository could not be observed (what it
needed was not done); 64 no terminal to ask and no --yes. With --json: the plan and one outcome
per action (docs/cli-json.md); --json never asks, so it needs --yes or a saved plan.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "apply",
        help="execute the plan now: switch CBT, run due backups, prune, collect garbage, verify",
        description="Observe, plan and execute the actions that bring reality to the desired state, or"
        " execute a plan saved by `plan --out` if nothing changed since it was made.",
        epilog=_APPLY_EXAMPLES,
        handler=cmd_apply,
    )
    parser.add_argument(
        "planfile", metavar="PLANFILE", nargs="?", type=Path, help="a plan saved by plan --out"
    )
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    parser.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help="exit 0 when there was nothing to do, 2 when changes were applied, 1 on any failure"
        " (also when a host or repository could not be observed)",
    )


def _err(message: str) -> None:
    print(f"esxi-reconciler apply: {printable(message)}", file=sys.stderr)


def _load_plan(path: Path) -> Plan | str:
    from reconciler.planning.actions import Plan

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    try:
        return Plan.from_json(text)
    except ValueError as exc:
        return f"{path}: {exc}"


def staleness(saved: Plan, desired: DesiredState, observed: ObservedState) -> str | None:
    """Why ``saved`` may no longer be applied (None: it is current): the config revision or the
    observed facts it was made from changed. Names the actions a new plan would do differently."""
    from reconciler.planning.fingerprint import fingerprint
    from reconciler.planning.plan import plan
    from reconciler.planning.render import action_line

    if saved.revision != desired.revision.id:
        return f"the config changed since it was made (revision {saved.revision} -> {desired.revision.id})"
    if saved.observed_fingerprint == fingerprint(desired, observed):
        return None
    fresh = plan(desired, observed)
    gone = [a for a in saved.actions if a not in fresh.actions]
    new = [a for a in fresh.actions if a not in saved.actions]
    lines = [f"\n  no longer planned: {action_line(a)}" for a in gone[:5]]
    lines += [f"\n  now also planned:  {action_line(a)}" for a in new[:5]]
    more = len(gone) + len(new) - len(lines)
    what = "".join(lines) + (f"\n  and {more} more" if more > 0 else "")
    return "the hosts, repositories or run history changed since it was made" + (
        f"; a new plan differs:{what}" if what else ""
    )


def _detail_text(outcome: Outcome) -> str:
    d: dict[str, Any] = outcome.detail
    kind = outcome.action.kind
    if kind == "backup" and d.get("point_id"):
        return (
            f" -> point {d['point_id']} ({d.get('mode')}, read {human_size(int(d.get('bytes_read', 0)))},"
            f" stored {human_size(int(d.get('bytes_stored', 0)))}, {float(d.get('seconds', 0.0)):.1f}s)"
        )
    if kind == "gc" and "chunks_freed" in d:
        return (
            f" -> freed {plural(int(d['chunks_freed']), 'chunk')}, {human_size(int(d.get('bytes_freed', 0)))}"
        )
    if kind == "verify" and "points" in d:
        return f" -> {plural(int(d['points']), 'point')} checked, no problems"
    return ""


def _show(outcome: Outcome) -> None:
    mark = {"ok": "ok     ", "failed": "FAILED ", "skipped": "skipped"}[outcome.status]
    text = f"{mark} {outcome.action.kind} {outcome.action.subject}"
    if outcome.ok:
        text += _detail_text(outcome)
    else:
        tries = f" after {plural(outcome.attempts, 'attempt')}" if outcome.attempts > 1 else ""
        text += f"{tries}: {outcome.error}"
    print(printable(text), flush=True)


def _confirm(count: int) -> bool | None:
    """True/False as answered; None when there is no terminal to ask on."""
    if not sys.stdin.isatty():
        return None
    try:
        answer = input(f"Apply these {plural(count, 'action')}? [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def cmd_apply(args: argparse.Namespace) -> int:  # noqa: C901  the verb's steps in the order the user meets them (saved plan, stale check, question, apply, exit code), each with its own exit
    """Execute the (saved or fresh) plan; see the exit status in the epilog."""
    from reconciler.esxi.signals import sigterm_raises
    from reconciler.operations.apply import apply
    from reconciler.operations.observe import load_history, observe
    from reconciler.planning.plan import plan
    from reconciler.planning.render import render_text

    saved: Plan | None = None
    if args.planfile is not None:
        loaded = _load_plan(args.planfile)
        if isinstance(loaded, str):
            fail(loaded, "plan-unreadable")
        saved = loaded
    desired = load_desired(args)
    try:
        history = load_history(state_dir(args), desired.revision.id)
    except Exception as exc:  # noqa: BLE001  a broken store must not be mistaken for "never ran"
        fail(f"cannot read the run history in {state_dir(args)}: {exc}", "state-directory")
    observed = observe(desired, now=datetime.now(timezone.utc), history=history)
    unobserved = observed.unobserved()
    if saved is not None:
        stale = staleness(saved, desired, observed)
        if stale is not None:
            fail(
                f"saved plan is stale: {stale}; nothing was done; run `esxi-reconciler plan` again",
                "stale-plan",
            )
        the_plan = saved
    else:
        the_plan = plan(desired, observed)
        if not args.json:
            sys.stdout.write(render_text(the_plan, color=sys.stdout.isatty(), unobserved=unobserved))
    for line in unobserved:
        _err(f"incomplete: {line}")

    def result(outcomes: list[Outcome], ok: bool) -> None:
        if args.json:
            emit_json(
                {
                    "ok": ok,
                    "plan": the_plan.to_dict(),
                    "complete": not unobserved,
                    "unobserved": list(unobserved),
                    "outcomes": [o.to_dict() for o in outcomes],
                    "counts": {s: sum(o.status == s for o in outcomes) for s in ("ok", "failed", "skipped")},
                }
            )

    if not the_plan.actions:
        print("Nothing to do." if not unobserved else "Nothing could be done for what was observed.")
        result([], not unobserved)
        return ExitCode.FAILED if unobserved else ExitCode.OK
    if saved is None and not args.yes:
        answer = None if args.json else _confirm(len(the_plan.actions))
        if answer is None:
            fail(
                "not asking without a terminal (or with --json): review the plan and pass --yes, or apply a"
                " saved plan",
                "not-confirmed",
                "usage",
            )
        if not answer:
            print("Nothing was applied.")
            result([], True)
            return ExitCode.OK

    store = _open_store(args)
    revision = desired.revision.id
    cancel = threading.Event()

    def on_outcome(outcome: Outcome) -> None:
        _show(outcome)
        if store is not None:
            try:
                store.record_outcome(outcome, revision)
            except Exception as exc:  # noqa: BLE001  the outcome is printed; losing the record must not stop the run
                log.warning("apply.record_failed", error=str(exc))

    print(f"\nApplying {plural(len(the_plan.actions), 'action')} ...", flush=True)
    try:
        with sigterm_raises():
            outcomes = apply(the_plan, desired, cancel=cancel, on_outcome=on_outcome)
    except KeyboardInterrupt:
        _err("interrupted; running backups removed their snapshots, the rest was skipped")
        return ExitCode.INTERRUPTED
    except SystemExit as exc:  # SIGTERM (sigterm_raises)
        _err("terminated; running backups removed their snapshots, the rest was skipped")
        return exc.code if isinstance(exc.code, int) else 143
    finally:
        if store is not None:
            _compact_history(store)
            store.close()
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("ok", "failed", "skipped")}
    print(f"Applied: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped.", flush=True)
    failed = counts["failed"] > 0 or bool(unobserved)
    result(outcomes, not failed)
    if failed:
        return ExitCode.FAILED
    return ExitCode.CHANGES if args.detailed_exitcode else ExitCode.OK


def _compact_history(store: Any) -> None:
    """Once a day, as the daemon does: a cron job running ``apply`` keeps the event log bounded too."""
    from datetime import datetime, timezone

    try:
        report = store.events.compact_daily(datetime.now(timezone.utc))
    except Exception as exc:  # noqa: BLE001  the work is done; a full disk or a lock must not fail it
        log.warning("apply.history_not_compacted", error=str(exc))
        return
    if report is not None:
        log.info("history.compacted", deleted=report.deleted, compacted=report.compacted)


def _open_store(args: argparse.Namespace) -> Any:
    """The status store of the state directory (outcomes feed ``status`` and the daemon's backoff),
    or None with a warning when it cannot be written (e.g. a user without access to /var/lib)."""
    try:
        from reconciler.status.store import StatusStore, status_path
    except ImportError:  # pragma: no cover - a build without the status store
        return None
    path = status_path(state_dir(args))
    try:
        return StatusStore.open(path)
    except Exception as exc:  # noqa: BLE001  without a status store apply still runs, and says the outcomes go unrecorded
        log.warning("apply.no_status_store", path=str(path), error=str(exc))
        print(f"warning: outcomes are not recorded ({path}: {exc})", file=sys.stderr)
        return None
