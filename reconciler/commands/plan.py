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

from reconciler.commands.common import (
    ExitCode,
    add_command,
    config_dir,
    emit_json,
    fail,
    load_desired,
    state_dir,
)
from reconciler.printable import printable

log = structlog.get_logger("reconciler.cli")

_PLAN_EXAMPLES = """\
examples:
  esxi-reconciler plan                          what would be done now, and why
  esxi-reconciler plan --detailed-exitcode      exit 2 when there is something to do (for CI)
  esxi-reconciler plan --json | jq '.actions[] | .kind + " " + .vm'
  esxi-reconciler plan --out tonight.plan       save it; `apply tonight.plan` runs exactly this plan,
                                                or refuses if reality changed in between
  esxi-reconciler plan --revision origin/feature --against origin/main --format markdown
                                                review a branch of the config repository: its plan
                                                against reality, what it changes, whether it needs
                                                approval (a pull-request comment)
  esxi-reconciler plan --source /etc/esxi-reconciler/source.yaml
                                                the daemon's fetched head against its applied revision

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
        "--format",
        choices=("text", "json", "markdown"),
        default="text",
        help="--format json: the same as --json; markdown: a summary for a pull-request comment",
    )
    parser.add_argument(
        "--revision",
        metavar="REF",
        help="plan the config of this commit, branch or tag (of the git repository holding --config, or of"
        " the daemon's clone with --source) against reality now; no work tree is touched",
    )
    parser.add_argument(
        "--against",
        metavar="BASE",
        help="compare with the config of BASE: the objects the change adds, removes or changes, and whether"
        " its destructive changes need approval before the daemon applies it",
    )
    parser.add_argument(
        "--source",
        metavar="FILE",
        type=Path,
        help="read revisions from the daemon's clone of this GitSource file (--revision defaults to the"
        " fetched head, --against to the applied revision)",
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
    if args.revision is not None or args.against is not None or args.source is not None:
        return _plan_revision(args)
    desired = load_desired(args)
    try:
        history = load_history(state_dir(args), desired.revision.id)
    except Exception as exc:  # noqa: BLE001  a broken store must not be mistaken for "never ran"
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
    elif args.format == "markdown":
        from reconciler.planning.review import plan_markdown

        sys.stdout.write(plan_markdown(result, revision=result.revision, unobserved=unobserved))
    else:
        sys.stdout.write(render_text(result, color=_color(), unobserved=unobserved))
        if args.out is not None:
            print(f"\nSaved the plan to {args.out}. Apply exactly this plan with:")
            print(f"  esxi-reconciler apply {args.out}")
    return _exit_code(args, result.has_changes, unobserved)


def _exit_code(args: argparse.Namespace, changes: bool, unobserved: tuple[str, ...]) -> int:
    if unobserved:
        for line in unobserved:
            print(f"esxi-reconciler plan: incomplete: {line}", file=sys.stderr)
        return ExitCode.INCOMPLETE if args.detailed_exitcode else ExitCode.FAILED
    if args.detailed_exitcode and changes:
        return ExitCode.CHANGES
    return ExitCode.OK


def _plan_revision(args: argparse.Namespace) -> int:  # noqa: C901  the verb's steps in order (source or refs, each load's own error, one observe, review); split, the error paths would be passed around
    """``plan --revision REF [--against BASE]`` / ``plan --source FILE``: another revision's config,
    planned against reality observed now, with the review of the change when there is a base."""
    from reconciler.config import ConfigError
    from reconciler.config.source import load_source
    from reconciler.gitsource.approve import RepositoryReader
    from reconciler.gitsource.git import GitError
    from reconciler.gitsource.preview import LoadedRevision, Revisions
    from reconciler.gitsource.trust import TrustError
    from reconciler.operations.observe import load_history, observe
    from reconciler.planning.plan import plan
    from reconciler.planning.render import render_text
    from reconciler.planning.review import plan_markdown, review_text

    if args.out is not None:
        fail(
            "--out saves a plan of the config in force (for apply FILE);"
            " not with --revision, --against or --source",
            "usage",
            "usage",
        )
    try:
        if args.source is not None:
            revisions = Revisions.of_source(load_source(args.source), state_dir(args))
        else:
            revisions = Revisions.around(config_dir(args))
    except ConfigError as error:
        for issue in error.issues:
            print(issue, file=sys.stderr)
        raise
    except (GitError, TrustError) as exc:
        fail(str(exc), "git")
    with revisions:
        ref = args.revision or revisions.default_revision
        if ref is None:
            fail(
                "--against needs the revision to review: --revision REF (e.g. --revision HEAD)",
                "usage",
                "usage",
            )
        base_ref = args.against or revisions.default_base
        loaded: list[LoadedRevision] = []
        for which, name in (("revision", ref), ("base", base_ref)):
            if name is None:
                continue
            try:
                loaded.append(revisions.load(name))
            except GitError as exc:
                fail(str(exc), "unknown-revision", "usage")
            except ConfigError as error:
                for issue in error.issues:
                    print(issue, file=sys.stderr)
                fail(
                    f"the config of the {which} {name} is invalid; nothing was planned",
                    "config-invalid",
                    "config",
                )
        proposed, base = loaded[0], (loaded[1] if len(loaded) > 1 else None)
        try:
            history = load_history(state_dir(args), proposed.desired.revision.id)
        except Exception as exc:  # noqa: BLE001  a broken store must not be mistaken for "never ran"
            fail(f"cannot read the run history in {state_dir(args)}: {exc}", "state-directory")
        log.info("plan.observe", revision=proposed.label, hosts=len(proposed.desired.hosts))
        observed = observe(proposed.desired, now=datetime.now(timezone.utc), history=history)
        result = plan(proposed.desired, observed)
        unobserved = observed.unobserved()
        review = None
        if base is not None:
            reader = RepositoryReader()
            reader.seed(proposed.desired, observed.repositories)
            try:
                review = revisions.review(base, proposed, reader)
            except GitError as exc:
                fail(str(exc), "git")
    if args.json:
        emit_json(
            {
                **result.to_dict(),
                "complete": not unobserved,
                "unobserved": list(unobserved),
                "planned_revision": proposed.label,
                "review": review.to_dict() if review is not None else None,
            }
        )
    elif args.format == "markdown":
        sys.stdout.write(plan_markdown(result, revision=proposed.label, review=review, unobserved=unobserved))
    else:
        print(f"Planning {printable(proposed.label)} against reality observed now.\n")
        sys.stdout.write(render_text(result, color=_color(), unobserved=unobserved))
        if review is not None:
            sys.stdout.write("\n" + review_text(review))
        if args.source is not None:
            _print_daemon_verdict(state_dir(args), proposed.commit)
    return _exit_code(args, result.has_changes, unobserved)


def _print_daemon_verdict(directory: Path, commit: str) -> None:
    """With ``--source``: what the daemon last concluded about this commit, if it refused it."""
    from reconciler.status.store import StatusStore, StatusStoreError, status_path

    try:
        with StatusStore.open(status_path(directory), readonly=True) as store:
            source = store.source_status()
    except StatusStoreError:
        return
    if source is not None and source.failed == commit:
        why = printable(source.failed_message or "")
        print(f"\nThe daemon refused this revision: {source.failed_reason}: {why}")
