"""``esxi-reconciler plan``: observe the hosts and repositories, and show what ``apply`` would do.

Read-only: nothing on a host or in a repository changes (repositories are read under a shared lock).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import structlog

from reconciler.commands.common import add_command, load_desired, state_dir

log = structlog.get_logger("reconciler.cli")

_PLAN_EXAMPLES = """\
examples:
  esxi-reconciler plan                          what would be done now, and why
  esxi-reconciler plan --detailed-exitcode      exit 2 when there is something to do (for CI)
  esxi-reconciler plan --format json | jq '.actions[] | .kind + " " + .vm'
  esxi-reconciler plan --out tonight.plan       save it; `apply tonight.plan` runs exactly this plan,
                                                or refuses if reality changed in between

symbols: + create (backup, verification)  ~ change in place (CBT)  - delete (restore point,
orphaned snapshot, unreferenced data); notices: ! warning  … pending  i info

exit status: 0 success (with --detailed-exitcode: nothing to do), 2 changes planned (only with
--detailed-exitcode), 1 error (also an invalid config)
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "plan",
        help="show what apply would do (backups due, CBT changes, points to prune) without doing it",
        description="Observe every host and repository of the config and print the plan: the actions that"
        " would bring reality to the desired state, each with its reason, and what will not be done and"
        " why. Nothing is changed.",
        epilog=_PLAN_EXAMPLES,
        handler=cmd_plan,
    )
    parser.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help="exit 0 when there is nothing to do, 2 when there are changes, 1 on error",
    )
    parser.add_argument(
        "--format", choices=("text", "json"), default="text", help="output format (default: text)"
    )
    parser.add_argument(
        "--out", metavar="FILE", type=Path, help="also save the plan as JSON, for `apply FILE`"
    )


def _color() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def _write_atomically(path: Path, text: str) -> None:
    directory = path.parent if str(path.parent) else Path()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan; see the exit status in the epilog."""
    from reconciler.operations.observe import load_history, observe
    from reconciler.planning.plan import plan
    from reconciler.planning.render import render_text

    desired = load_desired(args)
    if desired is None:
        print("esxi-reconciler plan: the config is invalid; nothing was planned", file=sys.stderr)
        return 1
    try:
        history = load_history(state_dir(args), desired.revision.id)
    except Exception as exc:  # a broken store must not be mistaken for "never ran"
        print(f"esxi-reconciler plan: cannot read the run history: {exc}", file=sys.stderr)
        return 1
    now = datetime.now(timezone.utc)
    log.info("plan.observe", hosts=len(desired.hosts), repositories=len(desired.repositories))
    observed = observe(desired, now=now, history=history)
    result = plan(desired, observed)
    log.info(
        "plan.done",
        actions=len(result.actions),
        notices=len(result.notices),
        revision=result.revision,
        fingerprint=result.observed_fingerprint[:16],
    )
    if args.out is not None:
        try:
            _write_atomically(args.out, result.to_json())
        except OSError as exc:
            print(f"esxi-reconciler plan: cannot save the plan to {args.out}: {exc}", file=sys.stderr)
            return 1
    if args.format == "json":
        sys.stdout.write(result.to_json())
    else:
        sys.stdout.write(render_text(result, color=_color()))
        if args.out is not None:
            print(f"\nSaved the plan to {args.out}. Apply exactly this plan with:")
            print(f"  esxi-reconciler apply {args.out}")
    if args.detailed_exitcode and result.has_changes:
        return 2
    return 0
