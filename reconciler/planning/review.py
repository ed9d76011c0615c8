"""A plan for review: the text of ``plan --against BASE`` and the Markdown of ``plan --format markdown``.

The Markdown is written for a pull-request comment: what the revision would add (backups,
verifications, test restores), change (CBT) and destroy (pruned restore points, orphaned snapshots,
unreferenced data), each with its reason, and — when compared with a base — which objects the commit
changes and whether it needs approval before the daemon applies it. Names come from hosts and may hold
anything: control characters are escaped (:func:`reconciler.printable.printable`) and Markdown's
special characters are backslash-escaped, so a VM name cannot add a line, a link or HTML.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timezone

from reconciler.planning.actions import Action, Change, Plan
from reconciler.planning.approval import APPROVAL_TRAILER, Review
from reconciler.planning.render import action_line, notice_line, summary
from reconciler.printable import printable

_MARKDOWN_SPECIAL = frozenset("\\`*_[]<|~&#")
_SECTIONS: tuple[tuple[Change, str, str], ...] = (
    (Change.CREATE, "Add", "backups, verifications, test restores"),
    (Change.UPDATE, "Change", "CBT switched"),
    (Change.DELETE, "Destroy", "restore points pruned, orphaned snapshots removed, unreferenced data freed"),
)
_NOTICE_MARK = {"warning": "⚠️", "pending": "⏳", "info": "ℹ️"}


def markdown_escape(text: str) -> str:
    """``text`` safe to put in Markdown: control characters escaped, special characters backslashed."""
    return "".join(f"\\{c}" if c in _MARKDOWN_SPECIAL else c for c in printable(text))


def _code(text: str) -> str:
    """An inline code span that holds any text (a fence longer than any run of backticks inside)."""
    shown = printable(text)
    longest = run = 0
    for char in shown:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if shown.startswith("`") or shown.endswith("`") else ""
    return f"{fence}{pad}{shown}{pad}{fence}"


def approval_hint(trailer: str = f"'{APPROVAL_TRAILER}: <why>'") -> str:
    """How to approve, in one sentence (text and Markdown share it)."""
    return (
        f"a commit on top of it whose message ends with the trailer {trailer} (signed by a trusted key"
        " when signatures are required)"
    )


def review_text(review: Review) -> str:
    """The review as text lines for ``plan --against`` (ends with a newline)."""
    lines = [f"Compared with {printable(review.base)}:"]
    if review.changes:
        lines.extend(f"  {printable(str(change))}" for change in review.changes)
    else:
        lines.append("  no object changed")
    if review.destructive:
        lines.append("")
        if review.approved_by is not None:
            lines.append(f"Destructive changes, approved by {printable(review.approved_by)}:")
        else:
            lines.append(
                f"NEEDS APPROVAL: the daemon holds this revision until {approval_hint()} approves it:"
            )
        lines.extend(f"  ! {printable(d.message)}" for d in review.destructive)
    return "\n".join(lines) + "\n"


def _action_item(action: Action) -> str:
    return f"- {markdown_escape(action_line(action))}"


def plan_markdown(
    plan: Plan, *, revision: str, review: Review | None = None, unobserved: Sequence[str] = ()
) -> str:
    """The plan as Markdown for a pull-request comment; ``revision`` names what was planned (e.g.
    ``feature/x (git:3f2a1b2c4d5e)``); ``unobserved``: what could not be looked at (the plan is then
    incomplete). Ends with a newline."""
    out = [f"### esxi-reconciler plan for {_code(revision)}", ""]
    if review is not None:
        if review.needs_approval:
            trailer = _code(f"{APPROVAL_TRAILER}: <why>")
            out.append(
                "**⛔ Needs approval.** The daemon holds this revision until"
                f" {approval_hint(trailer)} approves it:"
            )
        elif review.destructive:
            out.append(f"**✅ Destructive changes approved** by {markdown_escape(review.approved_by or '')}.")
        out.extend(f"- {markdown_escape(d.message)}" for d in review.destructive)
        if review.destructive:
            out.append("")
        out.append(f"**Config changes against {_code(review.base)}:**")
        out.extend(f"- {markdown_escape(str(c))}" for c in review.changes)
        if not review.changes:
            out.append("- none")
        out.append("")
    counts = {change: sum(1 for a in plan.actions if a.change is change) for change, _, _ in _SECTIONS}
    out.append(
        f"**{counts[Change.CREATE]} to add, {counts[Change.UPDATE]} to change,"
        f" {counts[Change.DELETE]} to destroy.**"
    )
    out.append("")
    for change, title, what in _SECTIONS:
        actions = [a for a in plan.actions if a.change is change]
        if not actions:
            continue
        out.append(f"#### {title} ({len(actions)}): {what}")
        out.extend(_action_item(a) for a in actions)
        out.append("")
    if plan.notices:
        out.append(f"#### Not done, and why ({len(plan.notices)})")
        out.extend(
            f"- {_NOTICE_MARK.get(n.level, '•')} {markdown_escape(notice_line(n))}" for n in plan.notices
        )
        out.append("")
    if unobserved:
        out.append(f"#### Not observed ({len(unobserved)}): the plan is incomplete")
        out.extend(f"- {markdown_escape(line)}" for line in unobserved)
        out.append("")
    out.append(markdown_escape(summary(plan, unobserved)))
    if plan.next_due is not None:
        when = plan.next_due.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        out.append(f"Next scheduled job: {when}.")
    observed = plan.created.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out.append("")
    out.append(f"<sub>Planned against reality observed at {observed}; revision {_code(plan.revision)}.</sub>")
    return "\n".join(out) + "\n"
