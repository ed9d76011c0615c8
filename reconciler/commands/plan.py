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

from reconciler.commands.common import ExitCode, add_command, emit_json, fail, load_desired, state_dir

log = structlog.get_logger("reconciler.cli")

_PLAN_EXAMPLES = """\
examples:
  esxi-reconciler plan                          what would be done now, and why
  esxi-reconciler plan --detailed-exitcode      exit 2 when there is something to do (for CI)
  esxi-reconciler plan --json | jq '.actions[] | .kind + " " + .vm'
  esxi-reconciler plan --out tonight.plan       save it; `apply tonight.plan` runs exactly this plan,
                                                or refuses if reality changed in between

symbols: + create (backup, verification)  ~ change in place (CBT)  - delete (restore point,
orphaned snapshot, unreferenced data); notices: ! warning  … pending  i info

A host or repository that cannot be observed (unreachable, wrong TLS thumbprint, wrong passphrase,
volume not mounted) makes the plan INCOMPLETE, never "No changes": exit 3 with --detailed-exitcode,
1 without.
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
        help="exit 0 when there is nothing to do, 2 when there are changes, 3 when a host or repository"
        " could not be observed (the plan is incomplete), 1 on error",
    )
    parser.add_argument(
        "--format", choices=("text", "json"), default="text", help="--format json: the same as --json"
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

    if args.format == "json":
        args.json = True
    desired = load_desired(args)
    try:
        history = load_history(state_dir(args), desired.revision.id)
    except Exception as exc:  # a broken store must not be mistaken for "never ran"
        fail(f"cannot read the run history in {state_dir(args)}: {exc}", "state-directory")
    now = datetime.now(timezone.utc)
    log.info("plan.observe", hosts=len(desired.hosts), repositories=len(desired.repositories))
    observed = observe(desired, now=now, history=history)
    result = plan(desired, observed)
    unobserved = observed.unobserved()
    log.info(
        "plan.done",
        actions=len(result.actions),
        notices=len(result.notices),
        revision=result.revision,
        fingerprint=result.observed_fingerprint[:16],
        unobserved=len(unobserved),
    )
    if args.out is not None:
        try:
            _write_atomically(args.out, result.to_json())
        except OSError as exc:
            fail(f"cannot save the plan to {args.out}: {exc.strerror or exc}", "write-failed")
    if args.json:
        emit_json({**result.to_dict(), "complete": not unobserved, "unobserved": list(unobserved)})
    else:
        sys.stdout.write(render_text(result, color=_color(), unobserved=unobserved))
        if args.out is not None:
            print(f"\nSaved the plan to {args.out}. Apply exactly this plan with:")
            print(f"  esxi-reconciler apply {args.out}")
    if unobserved:
        for line in unobserved:
            print(f"esxi-reconciler plan: incomplete: {line}", file=sys.stderr)
        return ExitCode.INCOMPLETE if args.detailed_exitcode else ExitCode.FAILED
    if args.detailed_exitcode and result.has_changes:
        return ExitCode.CHANGES
    return ExitCode.OK
