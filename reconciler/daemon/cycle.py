"""One reconcile cycle: history → observe → plan → record → apply → outcomes → conditions.

The daemon calls a :data:`Cycle` with a :class:`CycleContext`; :func:`reconcile` is the real one. Tests
inject their own to drive the loop without hosts. Everything a cycle learns goes to the status store
as it happens (each outcome when it arrives), so a crash loses nothing already done.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import structlog

from reconciler.config.model import DesiredState
from reconciler.killpoint import kill_point
from reconciler.planning.actions import Outcome
from reconciler.planning.observed import ObservedState
from reconciler.status.conditions import DAEMON_KINDS, Condition, derive_conditions
from reconciler.status.history import Event, EventOutcome, Retention
from reconciler.status.store import StatusStore

if TYPE_CHECKING:
    from reconciler.notify.service import Notifications
    from reconciler.web.service import Monitor

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class CycleContext:
    """What one cycle works with. ``cancel`` is set on SIGTERM: running work unwinds (snapshots are
    removed) and no new action starts."""

    desired: DesiredState
    store: StatusStore
    cancel: threading.Event
    now: datetime
    state_dir: Path
    number: int = 1
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(timezone.utc))
    """The daemon's clock: what "now" is for schedules while the cycle runs (``now`` is its start)."""
    notifications: Notifications | None = None
    """Told what the cycle concluded (:mod:`reconciler.notify`); None: nothing is sent."""
    history: Retention = field(default_factory=Retention)
    """How long the event log is kept (compacted at most once a day, at the end of a cycle)."""
    monitor: Monitor | None = None
    """Records what the status page and the metrics show (:mod:`reconciler.web`); None: nothing."""


@dataclass(frozen=True)
class CycleResult:
    """``ok``: nothing failed and nothing is Stalled (``run --once`` exits 1 otherwise). ``summary``: one
    line for ``systemctl status``. ``next_due``: when the earliest scheduled job becomes due (the loop
    wakes then, not only at the resync)."""

    ok: bool
    summary: str
    next_due: datetime | None = None


Cycle = Callable[[CycleContext], CycleResult]


def _log_changes(before: list[Condition], after: list[Condition]) -> list[Condition]:
    """One log event per object whose status or reason changed (the journal tells the story); returns
    those conditions."""
    old = {c.key: c for c in before}
    changed = []
    for condition in after:
        previous = old.get(condition.key)
        if previous is None or (previous.status, previous.reason) != (condition.status, condition.reason):
            changed.append(condition)
            level = log.warning if condition.status == "Stalled" else log.info
            level(
                "condition.changed",
                kind=condition.kind,
                name=condition.name,
                status=condition.status,
                reason=condition.reason,
                message=condition.message,
            )
    return changed


def condition_event(condition: Condition, now: datetime) -> Event:
    """The history's record of an object's condition change."""
    host, vm = condition.name.split("/", 1) if condition.kind == "vm" else (None, None)
    outcome: EventOutcome = "warning" if condition.status == "Stalled" else "info"
    return Event(
        time=now,
        kind="condition",
        subject=f"{condition.kind} {condition.name}",
        outcome=outcome,
        message=f"{condition.status} {condition.reason}: {condition.message}",
        revision=condition.revision,
        host=host if condition.kind == "vm" else (condition.name if condition.kind == "host" else None),
        vm=vm,
        policy=condition.name if condition.kind == "policy" else None,
        repository=condition.name if condition.kind == "repository" else None,
        detail={"status": condition.status, "reason": condition.reason},
    )


def _maintain_history(store: StatusStore, now: datetime, retention: Retention) -> None:
    """Compact the event log when a day has passed since the last time."""
    report = store.events.compact_daily(now, retention)
    if report is not None:
        log.info(
            "history.compacted", deleted=report.deleted, compacted=report.compacted, vacuumed=report.vacuumed
        )


def after_cycle(
    ctx: CycleContext, observed: ObservedState, before: list[Condition], after: list[Condition]
) -> None:
    """What the rest of the daemon learns from a cycle: condition changes in the history and the log,
    notifications, and the history kept small. Each step guarded: none may fail the cycle."""
    now = ctx.clock()
    changed = _log_changes(before, after)
    for condition in changed:
        _guarded("history", lambda c=condition: ctx.store.events.record(condition_event(c, now)), None)  # type: ignore[misc]
    if ctx.notifications is not None:
        notifications = ctx.notifications
        _guarded("notify", lambda: notifications.after_cycle(ctx.desired, observed, after, now), None)
    if ctx.monitor is not None:  # before compaction: the metrics' counters fold the newest events first
        monitor = ctx.monitor
        _guarded("web", lambda: monitor.after_cycle(ctx.store, ctx.desired, observed), None)
    _guarded("history", lambda: _maintain_history(ctx.store, now, ctx.history), None)


def _guarded(what: str, write: Callable[[], T], default: T) -> T:
    """Run a status-store write; its failure (disk full, a bug in a derivation) is logged and never
    keeps the backups themselves from running."""
    try:
        return write()
    except Exception:
        log.exception("status.write_failed", what=what)
        return default


def reconcile(ctx: CycleContext) -> CycleResult:
    """The daemon's cycle against real hosts and repositories."""
    from reconciler.operations.apply import apply
    from reconciler.operations.observe import observe
    from reconciler.planning.plan import plan

    desired, store = ctx.desired, ctx.store
    revision = desired.revision.id
    observed = observe(desired, now=ctx.now, history=store.history(revision))
    the_plan = plan(desired, observed)
    kill_point("cycle.planned")
    # a plan with nothing to do is routine: cycle.done says the cycle ran (keep the journal quiet)
    (log.info if the_plan.actions else log.debug)(
        "cycle.planned",
        revision=revision,
        actions=len(the_plan.actions),
        notices=len(the_plan.notices),
        next_due=the_plan.next_due.isoformat() if the_plan.next_due else None,
    )
    _guarded("plan", lambda: store.record_plan(the_plan), None)
    none: list[Condition] = []
    before = _guarded("conditions", store.conditions, none)
    due = _guarded("conditions", lambda: derive_conditions(desired, observed, plan=the_plan), none)
    _guarded("conditions", lambda: store.replace_conditions(due, keep_kinds=DAEMON_KINDS), None)

    def record(outcome: Outcome) -> None:
        _guarded("outcome", lambda: store.record_outcome(outcome, revision), None)
        kill_point("cycle.outcome-recorded")

    outcomes = apply(the_plan, desired, cancel=ctx.cancel, on_outcome=record, clock=ctx.clock)

    def conclude() -> list[Condition]:
        after = derive_conditions(
            desired, observed, plan=the_plan, outcomes=outcomes, history=store.history(revision)
        )
        store.replace_conditions(after, keep_kinds=DAEMON_KINDS)
        return after

    after = _guarded("conditions", conclude, none)
    kill_point("cycle.concluded")
    after_cycle(ctx, observed, before, after)
    failed = sum(o.status == "failed" for o in outcomes)
    done = sum(o.ok for o in outcomes)
    stalled = sum(c.status == "Stalled" for c in after)
    summary = (
        f"{done} done, {failed} failed, {len(the_plan.actions) - done - failed} not run; {stalled} stalled"
    )
    return CycleResult(ok=failed == 0 and stalled == 0, summary=summary, next_due=the_plan.next_due)
