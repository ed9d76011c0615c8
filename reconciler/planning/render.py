"""A plan as text for people: a diff a reviewer reads in a pull request, Terraform style.

``+`` creates (a backup, a verification), ``~`` changes in place (CBT), ``-`` deletes (a restore
point, an orphaned snapshot, unreferenced data); notices follow (``!`` warning, ``…`` pending, ``i``
info), then one summary line. Names come from VM inventories and may hold anything, so control
characters are shown escaped (:func:`reconciler.printable.printable`): a VM name cannot add a line,
move the cursor or recolour the terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timezone

from reconciler.planning.actions import (
    Action,
    Change,
    CollectGarbage,
    Notice,
    Plan,
    PrunePoint,
    RemoveSnapshot,
    RunBackup,
    RunCopy,
    RunTestRestore,
    RunVerify,
    SetCbt,
)
from reconciler.printable import printable

_COLORS: dict[object, str] = {
    Change.CREATE: "\x1b[32m",
    Change.UPDATE: "\x1b[33m",
    Change.DELETE: "\x1b[31m",
    "warning": "\x1b[1;33m",
    "pending": "\x1b[36m",
    "info": "\x1b[2m",
}
_RESET = "\x1b[0m"
_NOTICE_MARK = {"warning": "!", "pending": "…", "info": "i"}


def _paint(text: str, key: object, color: bool) -> str:
    code = _COLORS.get(key) if color else None
    return f"{code}{text}{_RESET}" if code else text


def _onoff(enabled: bool) -> str:
    return "enabled" if enabled else "disabled"


def action_line(action: Action) -> str:
    """One action without its ``+``/``~``/``-`` mark, e.g. ``backup esxi1/web01 -> nas (due since ...)``."""
    reason = printable(action.reason)
    subject = printable(action.subject)
    if isinstance(action, SetCbt):
        return f"{subject}  cbt: {_onoff(not action.enabled)} -> {_onoff(action.enabled)} ({reason})"
    if isinstance(action, RunBackup):
        return f"backup {subject} -> {printable(action.repository)} ({reason})"
    if isinstance(action, RunCopy):
        n = len(action.point_ids)
        return f"copy {subject} by {printable(action.copy_policy)}: {_count(n, 'point', 'points')} ({reason})"
    if isinstance(action, PrunePoint):
        return f"point {subject} of {printable(action.policy)} in {printable(action.repository)} ({reason})"
    if isinstance(action, RemoveSnapshot):
        return f"snapshot {subject} '{printable(action.snapshot_name)}' ({reason})"
    if isinstance(action, CollectGarbage):
        return f"unreferenced data in {subject} ({reason})"
    if isinstance(action, RunVerify):
        return (
            f"verify {subject} by {printable(action.verify_policy)},"
            f" reading {action.read_data_percent:g} % of the data ({reason})"
        )
    if isinstance(action, RunTestRestore):
        return f"test restore {subject} from {printable(action.repository)} ({reason})"
    return f"{action.kind} {subject} ({reason})"


def notice_line(notice: Notice) -> str:
    """One notice without its mark, e.g. ``warning esxi1/web01: foreign snapshot 'x' blocks ...``."""
    return f"{notice.level} {printable(notice.subject)}: {printable(notice.message)}"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def summary(plan: Plan, unobserved: Sequence[str] = ()) -> str:
    """The last line: what the plan does, in counts, and what it leaves; ``unobserved``
    (:meth:`ObservedState.unobserved`) makes it an incomplete plan, never "No changes"."""
    kinds = [a.kind for a in plan.actions]
    parts = [
        (kinds.count("remove-snapshot"), "orphaned snapshot to remove", "orphaned snapshots to remove"),
        (kinds.count("cbt"), "CBT change", "CBT changes"),
        (kinds.count("backup"), "backup", "backups"),
        (kinds.count("copy"), "copy", "copies"),
        (kinds.count("prune"), "point to prune", "points to prune"),
        (kinds.count("gc"), "garbage collection", "garbage collections"),
        (kinds.count("verify"), "verification", "verifications"),
        (kinds.count("test-restore"), "test restore", "test restores"),
    ]
    levels = [n.level for n in plan.notices]
    left = [
        (levels.count("pending"), "pending", "pending"),
        (levels.count("warning"), "warning", "warnings"),
        (levels.count("info"), "note", "notes"),
    ]
    did = ", ".join(_count(n, one, many) for n, one, many in parts if n)
    rest = ", ".join(_count(n, one, many) for n, one, many in left if n)
    if unobserved:
        what = _count(len(unobserved), "host or repository", "hosts or repositories")
        head = f"Plan INCOMPLETE: {what} could not be observed, so what they need is not planned"
        return head + "".join(f"; {part}" for part in (did, rest) if part) + "."
    if not did:
        if not rest:
            return "No changes. Reality matches the desired state."
        return f"No changes; {rest}."
    return f"Plan: {did}; {rest}." if rest else f"Plan: {did}."


def render_text(plan: Plan, *, color: bool, unobserved: Sequence[str] = ()) -> str:
    """The whole plan as text (ends with a newline); ``unobserved`` as in :func:`summary`."""
    lines: list[str] = []
    for action in plan.actions:
        lines.append(_paint(f"  {action.change.value} {action_line(action)}", action.change, color))
    if plan.notices:
        if lines:
            lines.append("")
        for notice in plan.notices:
            mark = _NOTICE_MARK.get(notice.level, "?")
            lines.append(_paint(f"  {mark} {notice_line(notice)}", notice.level, color))
    if lines:
        lines.append("")
    if plan.next_due is not None:
        lines.append(
            f"Next scheduled job: {plan.next_due.astimezone(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"
        )
    lines.append(summary(plan, unobserved))
    return "\n".join(lines) + "\n"
