"""The git source's revisions as the status shows them, and its condition. Pure: no I/O.

The daemon's source thread (:mod:`reconciler.daemon.source`) keeps one :class:`SourceStatus` up to date
and stores it (:meth:`reconciler.status.store.StatusStore.record_source`); ``status`` prints it. Its
condition (kind ``source``) follows the same meaning as the others: **Ready** the fetched head is the
applied revision; **Reconciling** a new head was accepted and is being loaded; **Stalled** the remote
cannot be fetched, or its head is refused (signature, rollback, invalid config) or held for approval —
the applied revision stays in force meanwhile, and the message says which one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

from reconciler.status.conditions import Condition


@dataclass(frozen=True)
class SourceStatus:
    """What the daemon knows of its source: fetched, applied and last refused revision, fetch health."""

    name: str
    url: str
    ref: str
    """``branch main`` or ``tag v1``."""
    path: str = ""
    verify: bool = False
    """Whether only signed commits are applied."""
    fetched: str | None = None
    fetched_at: datetime | None = None
    """The last successful fetch."""
    fetch_error: str | None = None
    fetch_failing_since: datetime | None = None
    applied: str | None = None
    applied_at: datetime | None = None
    applied_signer: str | None = None
    failed: str | None = None
    """The last head that was not applied (refused or held), while it is the fetched head."""
    failed_reason: str | None = None
    failed_message: str | None = None
    failed_at: datetime | None = None
    warning: str | None = None
    """The last thing worth a person's look that did not stop anything (a force-push)."""
    warning_at: datetime | None = None

    def fetch_ok(self, head: str, now: datetime) -> SourceStatus:
        return replace(self, fetched=head, fetched_at=now, fetch_error=None, fetch_failing_since=None)

    def fetch_failed(self, error: str, now: datetime) -> SourceStatus:
        since = self.fetch_failing_since or now
        return replace(self, fetch_error=error, fetch_failing_since=since)

    def refused(self, head: str, reason: str, message: str, now: datetime) -> SourceStatus:
        same = (self.failed, self.failed_reason, self.failed_message) == (head, reason, message)
        when = self.failed_at if same and self.failed_at else now
        return replace(self, failed=head, failed_reason=reason, failed_message=message, failed_at=when)

    def now_applied(self, commit: str, signer: str | None, now: datetime) -> SourceStatus:
        when = self.applied_at if self.applied == commit and self.applied_at else now
        done = replace(self, applied=commit, applied_at=when, applied_signer=signer)
        if self.failed in (commit, None):
            done = replace(done, failed=None, failed_reason=None, failed_message=None, failed_at=None)
        return done

    def unapplied(self) -> SourceStatus:
        return replace(self, applied=None, applied_at=None, applied_signer=None)

    def warn(self, message: str, now: datetime) -> SourceStatus:
        return replace(self, warning=message, warning_at=now)

    def to_dict(self) -> dict[str, Any]:
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceStatus:
        times = {"fetched_at", "fetch_failing_since", "applied_at", "failed_at", "warning_at"}
        values: dict[str, Any] = {
            k: datetime.fromisoformat(v) if k in times and v else v for k, v in data.items()
        }
        return cls(**values)


def short(commit: str | None) -> str:
    """The first 12 hex digits of a commit (``-`` for none)."""
    return commit[:12] if commit else "-"


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M}Z" if value else "-"


def source_condition(status: SourceStatus, now: datetime) -> Condition:
    """The ``source`` condition: Stalled while fetching fails or the head is refused or held, else Ready."""
    applied = f"git:{status.applied}" if status.applied else None
    keeping = f"{short(status.applied)} stays applied" if status.applied else "nothing is applied yet"
    if status.fetch_error is not None:
        return Condition(
            "source",
            status.name,
            "Stalled",
            "FetchFailed",
            f"fetch failing since {_when(status.fetch_failing_since)}: {status.fetch_error}; {keeping}",
            revision=applied,
            updated=now,
        )
    if status.failed is not None and status.failed == status.fetched:
        return Condition(
            "source",
            status.name,
            "Stalled",
            status.failed_reason or "Refused",
            f"{short(status.failed)} not applied: {status.failed_message}; {keeping}",
            revision=applied,
            updated=now,
        )
    if status.applied is None:
        return Condition(
            "source", status.name, "Reconciling", "Fetching", f"waiting for {status.ref}", updated=now
        )
    signed = f", signed by {status.applied_signer}" if status.applied_signer else ""
    note = f"; {status.warning}" if status.warning else ""
    return Condition(
        "source",
        status.name,
        "Ready",
        "Applied",
        f"{short(status.applied)} of {status.ref} applied{signed}{note}",
        last_success=status.fetched_at,
        revision=applied,
        updated=now,
    )
