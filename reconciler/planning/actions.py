"""What a plan is made of: actions to execute, notices to show, and the plan itself.

The planner (:mod:`reconciler.planning.plan`, pure) produces a :class:`Plan`; ``plan`` prints it,
``plan --out FILE`` saves it as JSON, ``apply`` (:mod:`reconciler.operations.apply`) executes it. Every
action says *why* (``reason``), so the printed plan reads like a review comment, and carries what its
executor needs without looking anything up again except the config (secrets are never in a plan).

Order of execution (the planner emits actions in it): orphaned snapshots removed, CBT switched,
backups, copies to other repositories, points pruned, garbage collected, verifications, test restores.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any, ClassVar, Literal

PLAN_FORMAT_VERSION = 1


class Change(str, enum.Enum):
    """How an action shows in the diff: ``+`` creates, ``~`` changes in place, ``-`` deletes."""

    CREATE = "+"
    UPDATE = "~"
    DELETE = "-"


@dataclass(frozen=True)
class Action:
    """Base of every action. ``kind`` names the subclass in JSON; ``reason`` is for people."""

    kind: ClassVar[str] = ""
    change: ClassVar[Change] = Change.UPDATE
    reason: str

    @property
    def subject(self) -> str:
        """What the action is about, as shown in the plan (``esxi1/web01``, ``nas``, ...)."""
        raise NotImplementedError

    @property
    def host(self) -> str | None:
        """The host it touches, for per-host limits (None: repository-only work)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for key, value in asdict(self).items():
            out[key] = value.isoformat() if isinstance(value, datetime) else value
        return out


@dataclass(frozen=True)
class RemoveSnapshot(Action):
    """Remove a snapshot of ours left behind by a crashed or killed run."""

    kind: ClassVar[str] = "remove-snapshot"
    change: ClassVar[Change] = Change.DELETE
    host_name: str
    vm: str
    vmid: str
    snapshot_id: str
    snapshot_name: str

    @property
    def subject(self) -> str:
        return f"{self.host_name}/{self.vm}"

    @property
    def host(self) -> str | None:
        return self.host_name


CbtMethod = Literal["reconfigure", "reconfigure+stun", "vmx-edit", "power-cycle"]
"""How CBT is switched: ``reconfigure`` (licensed, VM off), ``reconfigure+stun`` (licensed, VM running:
ReconfigVM then a snapshot create + remove), ``vmx-edit`` (free, VM off: .vmx edited over SSH and
reloaded), ``power-cycle`` (free, VM running, allowed by the policy inside its window: guest shutdown,
edit, reload, power on)."""


@dataclass(frozen=True)
class SetCbt(Action):
    """Switch Changed Block Tracking of a VM."""

    kind: ClassVar[str] = "cbt"
    host_name: str
    vm: str
    vmid: str
    enabled: bool
    method: CbtMethod
    policy: str
    shutdown_timeout_seconds: float = 600.0

    @property
    def subject(self) -> str:
        return f"{self.host_name}/{self.vm}"

    @property
    def host(self) -> str | None:
        return self.host_name


@dataclass(frozen=True)
class RunBackup(Action):
    """Back up one VM under one policy."""

    kind: ClassVar[str] = "backup"
    change: ClassVar[Change] = Change.CREATE
    policy: str
    host_name: str
    vm: str
    vmid: str
    repository: str
    due_since: datetime | None = None
    full: bool = False

    @property
    def subject(self) -> str:
        return f"{self.host_name}/{self.vm}"

    @property
    def host(self) -> str | None:
        return self.host_name


@dataclass(frozen=True)
class RunCopy(Action):
    """Copy restore points from one repository to another under a copy policy (an off-site copy)."""

    kind: ClassVar[str] = "copy"
    change: ClassVar[Change] = Change.CREATE
    copy_policy: str
    source: str
    destination: str
    point_ids: tuple[str, ...]
    """The points of ``source`` the destination lacks and its retention would keep, oldest first."""

    @property
    def subject(self) -> str:
        return f"{self.source} -> {self.destination}"


@dataclass(frozen=True)
class PrunePoint(Action):
    """Delete a restore point the retention no longer keeps (its data is freed by GC)."""

    kind: ClassVar[str] = "prune"
    change: ClassVar[Change] = Change.DELETE
    repository: str
    point_id: str
    policy: str
    vm: str
    time: datetime

    @property
    def subject(self) -> str:
        return f"{self.vm}@{self.time.strftime('%Y-%m-%dT%H:%MZ')}"


@dataclass(frozen=True)
class CollectGarbage(Action):
    """Free chunks, indexes and files no restore point references any more."""

    kind: ClassVar[str] = "gc"
    change: ClassVar[Change] = Change.DELETE
    repository: str

    @property
    def subject(self) -> str:
        return self.repository


@dataclass(frozen=True)
class RunVerify(Action):
    """Check a repository under a verify policy."""

    kind: ClassVar[str] = "verify"
    verify_policy: str
    repository: str
    read_data_percent: float

    @property
    def subject(self) -> str:
        return self.repository


@dataclass(frozen=True)
class RunTestRestore(Action):
    """Restore a VM's latest point as a temporary VM, check it boots, remove it."""

    kind: ClassVar[str] = "test-restore"
    change: ClassVar[Change] = Change.CREATE
    verify_policy: str
    repository: str
    vm: str
    point_id: str
    host_name: str
    datastore: str | None = None

    @property
    def subject(self) -> str:
        return f"{self.host_name}/{self.vm}"

    @property
    def host(self) -> str | None:
        return self.host_name


ACTION_TYPES: dict[str, type[Action]] = {
    cls.kind: cls
    for cls in (
        RemoveSnapshot,
        SetCbt,
        RunBackup,
        RunCopy,
        PrunePoint,
        CollectGarbage,
        RunVerify,
        RunTestRestore,
    )
}


def action_from_dict(data: dict[str, Any]) -> Action:
    """The inverse of :meth:`Action.to_dict` (raises ValueError on an unknown kind or field)."""
    data = dict(data)
    kind = data.pop("kind", None)
    cls = ACTION_TYPES.get(str(kind))
    if cls is None:
        raise ValueError(f"unknown action kind {kind!r}")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"action {kind}: unknown fields {sorted(unknown)}")
    for f in fields(cls):
        if f.name in data and isinstance(data[f.name], str) and "datetime" in str(f.type):
            data[f.name] = datetime.fromisoformat(data[f.name])
        elif f.name in data and isinstance(data[f.name], list) and str(f.type).startswith("tuple"):
            data[f.name] = tuple(data[f.name])  # JSON has lists only
    return cls(**data)


NoticeLevel = Literal["pending", "warning", "info"]


@dataclass(frozen=True)
class Notice:
    """Something the plan will *not* do now, and why (``pending``: it will happen by itself later, e.g.
    CBT at the VM's next power-off; ``warning``: needs a person; ``info``: worth knowing)."""

    level: NoticeLevel
    subject: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """An ordered list of actions with notices, tied to what was observed.

    ``observed_fingerprint`` is a digest of the observed facts the plan depends on
    (:func:`reconciler.planning.fingerprint.fingerprint`); ``apply FILE`` refuses a saved plan whose
    fingerprint or config revision no longer matches ("saved plan is stale").
    """

    created: datetime
    revision: str
    observed_fingerprint: str
    actions: tuple[Action, ...] = ()
    notices: tuple[Notice, ...] = ()
    next_due: datetime | None = field(default=None)
    """The earliest time a scheduled job becomes due again after ``created``, a job due now counting from
    this run (for the daemon's timer and the "Next scheduled job" line)."""

    @property
    def has_changes(self) -> bool:
        return bool(self.actions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT_VERSION,
            "created": self.created.isoformat(),
            "revision": self.revision,
            "observed_fingerprint": self.observed_fingerprint,
            "next_due": self.next_due.isoformat() if self.next_due else None,
            "actions": [a.to_dict() for a in self.actions],
            "notices": [n.to_dict() for n in self.notices],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse a saved plan (ValueError with a clear message when it is not one)."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a saved plan (invalid JSON: {exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT_VERSION:
            raise ValueError(f"not a saved plan of format {PLAN_FORMAT_VERSION}")
        try:
            return cls(
                created=datetime.fromisoformat(doc["created"]),
                revision=str(doc["revision"]),
                observed_fingerprint=str(doc["observed_fingerprint"]),
                next_due=datetime.fromisoformat(doc["next_due"]) if doc.get("next_due") else None,
                actions=tuple(action_from_dict(a) for a in doc["actions"]),
                notices=tuple(Notice(**n) for n in doc["notices"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a saved plan (missing or bad field: {exc})") from None


OutcomeStatus = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class Outcome:
    """What became of one action when applied. ``skipped``: not attempted (cancelled, a guard, a
    dependency failed), with the reason in ``error``; ``detail`` holds action-specific results (point
    id, bytes, chunks freed, ...) as JSON-able values; ``transient`` tells the status store whether a
    failure is worth retrying with backoff."""

    action: Action
    status: OutcomeStatus
    started: datetime
    finished: datetime
    attempts: int = 1
    error: str | None = None
    transient: bool = False
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action.to_dict(),
            "status": self.status,
            "started": self.started.isoformat(),
            "finished": self.finished.isoformat(),
            "attempts": self.attempts,
            "error": self.error,
            "transient": self.transient,
            "detail": self.detail,
        }
