"""Which events notify, and when: pure, like the planner (no I/O, no clock; ``now`` is given).

Level-triggered, like the rest of the daemon. After each cycle (and each config load) the daemon states
what is wrong now, :func:`problems` turns that into :class:`Problem` values with stable keys, and
:func:`decide` compares them with what a notifier was already told (its :class:`NotifierState`, kept in
the status store):

* a problem that appears is told once (``backup-failed``, ``stale`` …), after its delay (a CBT change
  is worth a message only once it has been pending for ``cbt_pending_after``);
* a problem that stays says nothing more, however many cycles it lasts and however its message changes
  (a retry time, a new error text): **one message per condition change, not per cycle**;
* a problem that goes away after it was told is a ``recovered`` message; one that goes away before it
  was told (it waited for its delay or for the rate limit) is never mentioned;
* everything due at once goes in one message; at most ``rate_limit.messages`` messages leave per
  ``rate_limit.per``, what is held waits (still due) and leaves together once the period allows;
* the summary is due on the notifier's own schedule (:func:`summary_due`), counted from the last one.

The words of the messages are made here too (:func:`alert_message`, :func:`summary_message`), so what
a person reads is tested with plain values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from reconciler.config.model import BackupPolicy, DesiredState, Notifier
from reconciler.planning.observed import ObservedState, RunRecord
from reconciler.rules import schedule
from reconciler.rules.durations import format_duration
from reconciler.status.conditions import Condition
from reconciler.units import human_size

PROBLEM_EVENTS = (
    "backup-failed",
    "stale",
    "low-space",
    "cbt-pending",
    "verify-damage",
    "test-restore-failed",
    "config-invalid",
    "error",
)
"""The events that are a state (a problem that holds until it goes away); ``recovered`` is its end."""

TITLES: dict[str, str] = {
    "backup-failed": "Backup failed",
    "stale": "No recent backup",
    "low-space": "Low on space",
    "cbt-pending": "CBT change pending",
    "verify-damage": "Verification found damage",
    "test-restore-failed": "Test restore failed",
    "config-invalid": "Config rejected",
    "error": "Needs attention",
}

LOW_SPACE_WORDS = ("too full", "not accessible")
"""A VM held back by its datastore (the planner's words): told as ``low-space`` of the datastore."""

POLICY_WORDS_TOLD_ELSEWHERE = ("is unreachable", "not found on host")
"""A policy's warning about its unreachable host or repository, or a missing VM (the planner's words):
told as that host, repository or VM, not twice."""

MessageLevel = Literal["failure", "warning", "success", "info"]


@dataclass(frozen=True)
class Problem:
    """Something wrong now. ``key`` is its identity across cycles (``backup-failed/vm/esxi1/web01``);
    ``subject`` names the object for people; ``message`` the cause; ``delay`` how long it must last
    before it is worth a message."""

    key: str
    event: str
    subject: str
    message: str
    delay: timedelta = timedelta(0)


@dataclass(frozen=True)
class Check:
    """The newest verify or test restore of one subject, from the history: its outcome and words."""

    outcome: str
    message: str
    transient: bool = False


@dataclass(frozen=True)
class Facts:
    """What the daemon knows at one instant. ``observed`` is None outside a cycle (a config load): the
    events that need it (space, CBT) are then not evaluated (see ``scope`` of :func:`decide`)."""

    now: datetime
    conditions: Sequence[Condition] = ()
    history: Mapping[str, RunRecord] = field(default_factory=dict)
    checks: Mapping[tuple[str, str], Check] = field(default_factory=dict)
    """(``verify``, repository) and (``test-restore``, host/vm) → the newest such check."""
    observed: ObservedState | None = None
    desired: DesiredState | None = None


CYCLE_SCOPE = frozenset(PROBLEM_EVENTS)
"""After a cycle every event is evaluated."""
CONFIG_SCOPE = frozenset({"config-invalid"})
"""After a config load (outside a cycle) only the config's own."""


# -- what is wrong now ------------------------------------------------------------------------------


def _rpo(policy: BackupPolicy, now: datetime) -> timedelta | None:
    return policy.rpo or schedule.default_rpo(policy.schedule, now)


def stale_vms(
    now: datetime, policies: Mapping[str, BackupPolicy], history: Mapping[str, RunRecord]
) -> list[tuple[str, str, str, RunRecord, timedelta]]:
    """(policy, host, vm, record, rpo) of every VM whose last successful backup is older than its
    policy's recovery-point objective (``status`` and the notifications judge alike)."""
    out = []
    for key, record in sorted(history.items()):
        parts = key.split("/", 3)
        if len(parts) != 4 or parts[0] != "backup":
            continue
        _, policy_name, host, vm = parts
        policy = policies.get(policy_name)
        if policy is None or policy.suspend or policy.host != host:
            continue
        rpo = _rpo(policy, now)
        since = record.last_succeeded or record.last_started
        if rpo is None or since is None or now - since <= rpo:
            continue
        out.append((policy_name, host, vm, record, rpo))
    return out


def _when(value: datetime) -> str:
    return f"{value:%Y-%m-%d %H:%M}Z"


def _condition_problems(conditions: Sequence[Condition]) -> list[Problem]:
    out: list[Problem] = []
    down_hosts = {c.name for c in conditions if c.kind == "host" and c.reason == "HostUnreachable"}
    vms_of: dict[str, list[str]] = {}
    for c in conditions:
        if c.kind == "vm":
            host, _, vm = c.name.partition("/")
            vms_of.setdefault(host, []).append(vm)
    for c in conditions:
        if c.status != "Stalled":
            continue
        if c.kind == "config":
            out.append(Problem("config-invalid/config", "config-invalid", "the config", c.message))
        elif c.kind == "host" and c.reason == "HostUnreachable":
            vms = vms_of.get(c.name, [])
            shown = f"; its VMs are not backed up: {', '.join(vms)}" if vms else ""
            out.append(
                Problem(f"backup-failed/host/{c.name}", "backup-failed", f"host {c.name}",
                        f"unreachable: {c.message}{shown}")
            )  # fmt: skip
        elif c.kind == "vm":
            host = c.name.partition("/")[0]
            if c.reason == "HostUnreachable" and host in down_hosts:
                continue  # told with its host
            if c.reason == "NeedsAttention" and any(w in c.message for w in LOW_SPACE_WORDS):
                continue  # told as low-space of the datastore
            event = "backup-failed" if c.reason in _BACKUP_REASONS else "error"
            out.append(Problem(f"{event}/vm/{c.name}", event, f"VM {c.name}", c.message))
        elif c.kind == "repository" and c.reason == "RepositoryUnreachable":
            out.append(
                Problem(f"backup-failed/repository/{c.name}", "backup-failed", f"repository {c.name}",
                        f"unreachable: {c.message}")
            )  # fmt: skip
        elif c.reason in ("VerifyFailed", "TestRestoreFailed", "BackupFailed"):
            continue  # told from the newest check, and per VM
        elif c.kind == "policy" and any(w in c.message for w in POLICY_WORDS_TOLD_ELSEWHERE):
            continue  # told as its host, repository or VM
        elif c.kind in ("repository", "policy", "host", "source"):
            out.append(Problem(f"error/{c.kind}/{c.name}", "error", f"{c.kind} {c.name}", c.message))
    return out


_BACKUP_REASONS = frozenset({"BackupFailed", "HostUnreachable", "VmNotFound", "NeedsAttention"})
"""A VM Stalled for one of these is not being backed up: ``backup-failed``."""


def _cbt_problems(conditions: Sequence[Condition], notifier: Notifier) -> list[Problem]:
    return [
        Problem(f"cbt-pending/{c.name}", "cbt-pending", f"VM {c.name}", c.message, notifier.cbt_pending_after)
        for c in conditions
        if c.kind == "vm" and c.reason == "Pending" and c.message.startswith("CBT ")
    ]


def _space_problems(facts: Facts, notifier: Notifier) -> list[Problem]:
    out: list[Problem] = []
    observed, desired = facts.observed, facts.desired
    if observed is None or desired is None:
        return out
    for host in observed.hosts.values():
        cfg = desired.hosts.get(host.name)
        if cfg is None or not host.reachable:
            continue
        for ds in host.datastores:
            if ds.accessible and not cfg.limits.datastore_has_room(ds.capacity, ds.free):
                words = (
                    f"{human_size(ds.free)} of {human_size(ds.capacity)} free, below the host's floor: no"
                    " snapshot (so no backup) of its VMs"
                )
                where = f"datastore {ds.name} of host {host.name}"
                out.append(Problem(f"low-space/datastore/{host.name}/{ds.name}", "low-space", where, words))
    for repo in observed.repositories.values():
        if repo.capacity_bytes is None or repo.free_bytes is None:
            continue
        if not notifier.repository_has_room(repo.capacity_bytes, repo.free_bytes):
            words = f"{human_size(repo.free_bytes)} of {human_size(repo.capacity_bytes)} free on its volume"
            out.append(
                Problem(f"low-space/repository/{repo.name}", "low-space", f"repository {repo.name}", words)
            )
    return out


def _check_problems(checks: Mapping[tuple[str, str], Check]) -> list[Problem]:
    out = []
    for (kind, subject), check in sorted(checks.items()):
        if check.outcome != "failed":
            continue
        if kind == "verify":
            event = "error" if check.transient else "verify-damage"
            out.append(Problem(f"{event}/verify/{subject}", event, f"repository {subject}", check.message))
        elif kind == "test-restore":
            out.append(
                Problem(
                    f"test-restore-failed/{subject}", "test-restore-failed", f"VM {subject}", check.message
                )
            )
    return out


def problems(facts: Facts, notifier: Notifier) -> list[Problem]:
    """Everything wrong now, as ``notifier`` sees it (its thresholds and delays)."""
    out = _condition_problems(facts.conditions)
    out += _cbt_problems(facts.conditions, notifier)
    out += _space_problems(facts, notifier)
    out += _check_problems(facts.checks)
    if facts.desired is not None:
        for policy, host, vm, record, rpo in stale_vms(facts.now, facts.desired.policies, facts.history):
            last = (
                f"last success {_when(record.last_succeeded)}" if record.last_succeeded else "never succeeded"
            )
            error = f"; last error: {record.last_error}" if record.last_error else ""
            out.append(
                Problem(f"stale/{policy}/{host}/{vm}", "stale", f"VM {host}/{vm}",
                        f"{last}, older than the RPO of policy {policy} ({format_duration(rpo)}){error}")
            )  # fmt: skip
    return out


# -- what a notifier was told ------------------------------------------------------------------------


@dataclass(frozen=True)
class Tracked:
    """A problem a notifier knows of: since when, whether it was told, and (``cleared``) when it went
    away while its recovery is still to be told."""

    event: str
    subject: str
    message: str
    since: datetime
    told: bool = False
    cleared: datetime | None = None
    delay: timedelta = timedelta(0)
    """How long it must last before it is told (kept: an evaluation of other events must not tell it
    early)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "subject": self.subject,
            "message": self.message,
            "since": self.since.isoformat(),
            "told": self.told,
            "cleared": self.cleared.isoformat() if self.cleared else None,
            "delay_seconds": self.delay.total_seconds(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tracked:
        cleared = data.get("cleared")
        return cls(
            str(data["event"]),
            str(data["subject"]),
            str(data["message"]),
            datetime.fromisoformat(data["since"]),
            bool(data.get("told")),
            datetime.fromisoformat(cleared) if cleared else None,
            timedelta(seconds=float(data.get("delay_seconds", 0))),
        )


@dataclass(frozen=True)
class NotifierState:
    """A notifier's memory: the problems it knows of, when its last messages left (for the rate limit),
    and when its last summary was sent (or its counting started)."""

    problems: Mapping[str, Tracked] = field(default_factory=dict)
    sent: tuple[datetime, ...] = ()
    last_summary: datetime | None = None
    held_since: datetime | None = None
    """When the rate limit first held a message back (None: nothing held)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "problems": {k: v.to_dict() for k, v in sorted(self.problems.items())},
            "sent": [t.isoformat() for t in self.sent],
            "last_summary": self.last_summary.isoformat() if self.last_summary else None,
            "held_since": self.held_since.isoformat() if self.held_since else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> NotifierState:
        if not data:
            return cls()

        def when(key: str) -> datetime | None:
            value = data.get(key)
            return datetime.fromisoformat(value) if value else None

        return cls(
            problems={k: Tracked.from_dict(v) for k, v in dict(data.get("problems", {})).items()},
            sent=tuple(datetime.fromisoformat(t) for t in data.get("sent", ())),
            last_summary=when("last_summary"),
            held_since=when("held_since"),
        )


@dataclass(frozen=True)
class Message:
    """One message to one notifier. ``kind``: ``alert``, ``summary`` or ``test``."""

    notifier: str
    kind: str
    title: str
    body: str
    level: MessageLevel
    events: tuple[str, ...] = ()
    """The events it tells (``backup-failed``, ``recovered`` …), for the history."""


@dataclass(frozen=True)
class Decision:
    """What to send now (None: nothing), the notifier's new memory, and whether the rate limit held
    something back this time."""

    message: Message | None
    state: NotifierState
    held: bool = False


def _track(
    state: NotifierState, found: Mapping[str, Problem], now: datetime, scope: frozenset[str], recover: bool
) -> dict[str, Tracked]:
    tracked: dict[str, Tracked] = {}
    for key, old in state.problems.items():
        if old.event not in scope:
            tracked[key] = old  # not evaluated this time: unchanged
        elif key in found:
            p = found[key]
            tracked[key] = replace(old, subject=p.subject, message=p.message, cleared=None, delay=p.delay)
        elif old.cleared is not None:
            tracked[key] = old  # its recovery is still to be told
        elif old.told and recover:
            tracked[key] = replace(old, cleared=now)
        # else: gone before it was told (or recoveries are not wanted): nothing to say
    for key, p in found.items():
        if key not in tracked:
            tracked[key] = Tracked(p.event, p.subject, p.message, now, delay=p.delay)
    return tracked


def decide(
    notifier: Notifier,
    state: NotifierState,
    found: Iterable[Problem],
    now: datetime,
    *,
    scope: frozenset[str] = CYCLE_SCOPE,
    origin: str = "",
) -> Decision:
    """The message ``notifier`` gets now (if any) and its new state. ``found``: :func:`problems`;
    ``scope``: the events evaluated this time (others keep their state)."""
    wanted = {p.key: p for p in found if p.event in scope and notifier.wants(p.event)}
    tracked = _track(state, wanted, now, scope, notifier.wants("recovered"))
    due_problems = sorted(
        (k for k, t in tracked.items()
         if not t.told and t.cleared is None and now - t.since >= t.delay),
        key=lambda k: (PROBLEM_EVENTS.index(tracked[k].event), k),
    )  # fmt: skip
    due_recoveries = sorted(k for k, t in tracked.items() if t.cleared is not None)
    window = notifier.rate_limit.per
    sent = tuple(t for t in state.sent if now - t < window)
    if not due_problems and not due_recoveries:
        return Decision(None, replace(state, problems=tracked, sent=sent, held_since=None))

    def settle() -> dict[str, Tracked]:
        done = {k: v for k, v in tracked.items() if k not in due_recoveries}
        for k in due_problems:
            done[k] = replace(done[k], told=True)
        return done

    if notifier.suspend:  # nothing is sent; nothing piles up for later either
        return Decision(None, replace(state, problems=settle(), sent=sent, held_since=None))
    if len(sent) >= notifier.rate_limit.messages:
        return Decision(None, replace(state, problems=tracked, sent=sent, held_since=state.held_since or now),
                        held=True)  # fmt: skip
    message = alert_message(
        notifier.name,
        [tracked[k] for k in due_problems],
        [tracked[k] for k in due_recoveries],
        now,
        origin=origin,
        held_since=state.held_since,
    )
    return Decision(message, NotifierState(settle(), (*sent, now), state.last_summary, None))


# -- the words ---------------------------------------------------------------------------------------

SIGNATURE = "esxi-reconciler"


def _footer(origin: str) -> str:
    where = f" on {origin}" if origin else ""
    return (
        f"-- \n{SIGNATURE}{where}. `esxi-reconciler status` shows every object;"
        " `esxi-reconciler history` what ran."
    )


def alert_message(
    notifier: str,
    told: Sequence[Tracked],
    recovered: Sequence[Tracked],
    now: datetime,
    *,
    origin: str = "",
    held_since: datetime | None = None,
) -> Message:
    """The message of problems that appeared and of problems that went away. One item: the title says
    what and where; several: the title counts them and the body lists each."""
    items = len(told) + len(recovered)
    if items == 1 and told:
        title = f"[{SIGNATURE}] {TITLES[told[0].event]}: {told[0].subject}"
    elif items == 1:
        title = f"[{SIGNATURE}] Recovered: {recovered[0].subject}"
    else:
        parts = []
        if told:
            parts.append(f"{len(told)} problem{'s' if len(told) != 1 else ''}")
        if recovered:
            parts.append(f"{len(recovered)} recovered")
        title = f"[{SIGNATURE}] " + ", ".join(parts)
    lines: list[str] = []
    if told:
        lines.append("Needs attention:")
        for t in told:
            lines.append(f"- {TITLES[t.event]}: {t.subject}: {t.message} (since {_when(t.since)})")
    if recovered:
        if lines:
            lines.append("")
        lines.append("Recovered:")
        for t in recovered:
            lines.append(
                f"- {t.subject}: OK again (was: {TITLES[t.event].lower()}: {t.message}; from"
                f" {_when(t.since)} to {_when(t.cleared or now)})"
            )
    if held_since is not None:
        lines += ["", f"(held back by the rate limit since {_when(held_since)})"]
    lines += ["", _footer(origin)]
    events = tuple(dict.fromkeys([*(t.event for t in told), *(["recovered"] if recovered else [])]))
    level: MessageLevel = "failure" if told else "success"
    return Message(notifier, "alert", title, "\n".join(lines), level, events)


# -- the summary -------------------------------------------------------------------------------------


def summary_due(notifier: Notifier, state: NotifierState, now: datetime) -> tuple[bool, NotifierState]:
    """Whether the summary is due now, and the state with its counting started (a notifier's first
    summary comes at its schedule's next fire time, not at once)."""
    if notifier.summary is None:
        return False, state
    if state.last_summary is None:
        return False, replace(state, last_summary=now)
    try:
        result = schedule.due(
            notifier.summary, now, state.last_summary, jitter_key=f"summary/{notifier.name}"
        )
    except ValueError:
        return False, state
    return isinstance(result, schedule.Due), state


@dataclass(frozen=True)
class Period:
    """What the history says of the time since the last summary."""

    since: datetime
    counts: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """(kind, outcome) → how many."""
    totals: Mapping[str, int] = field(default_factory=dict)
    """Bytes read, sent and stored by the successful backups."""


def summary_message(
    notifier: str, facts: Facts, period: Period, found: Sequence[Problem], *, origin: str = ""
) -> Message:
    """What is protected, what ran since the last summary, what needs attention."""
    vms = [c for c in facts.conditions if c.kind == "vm"]
    stalled = [c for c in facts.conditions if c.status == "Stalled"]
    problem_count = len(found)
    title = (
        f"[{SIGNATURE}] Summary: {len(vms)} VM{'s' if len(vms) != 1 else ''},"
        f" {'all well' if not problem_count else f'{problem_count} need attention'}"
    )
    count = period.counts.get
    lines = [f"Since {_when(period.since)}:"]
    for kind, word in (
        ("backup", "backups"),
        ("prune", "restore points pruned"),
        ("gc", "garbage collections"),
        ("verify", "verifications"),
        ("test-restore", "test restores"),
        ("restore", "restores"),
    ):
        ok, failed = count((kind, "ok"), 0), count((kind, "failed"), 0)
        if ok or failed:
            lines.append(f"- {word}: {ok} ok" + (f", {failed} failed" if failed else ""))
    if len(lines) == 1:
        lines.append("- nothing ran")
    if period.totals.get("bytes_read"):
        lines.append(
            f"- data: {human_size(period.totals.get('bytes_read', 0))} read,"
            f" {human_size(period.totals.get('bytes_stored', 0))} newly stored"
        )
    lines += ["", "Protected VMs (last successful backup):"]
    for c in vms:
        last = _when(c.last_success) if c.last_success else "never"
        lines.append(f"- {c.name}: {last} ({c.status}{'' if c.status == 'Ready' else ': ' + c.reason})")
    if not vms:
        lines.append("- none")
    lines += ["", "Needs attention:" if found else "Nothing needs attention."]
    for p in found:
        lines.append(f"- {TITLES[p.event]}: {p.subject}: {p.message}")
    if stalled and not found:
        lines.append(f"({len(stalled)} object(s) Stalled: `esxi-reconciler status`)")
    lines += ["", _footer(origin)]
    return Message(notifier, "summary", title, "\n".join(lines), "warning" if found else "info", ("summary",))


def message_for_test(notifier: str, now: datetime, *, origin: str = "") -> Message:
    """The message of ``esxi-reconciler notify test``."""
    return Message(
        notifier,
        "test",
        f"[{SIGNATURE}] Test message from notifier {notifier}",
        f"This is a test of notifier {notifier}, sent at {_when(now)}. If you read this, the daemon can reach"
        f" you here.\n\n{_footer(origin)}",
        "info",
        ("test",),
    )
