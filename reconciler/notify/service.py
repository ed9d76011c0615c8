"""The daemon's notifications: the rules (:mod:`.rules`) fed from the status store after each cycle and
each config load, each notifier's memory kept in the store, messages handed to the sender
(:mod:`.send`), and every send's result recorded in the history (``kind: notify``).

Nothing here may stop a backup: every method is called guarded by the daemon, sending happens in the
sender thread, and a notifier that cannot be used (a secret missing, a URL apprise does not know) is
reported once per config, in the log and the history.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime

import structlog

from reconciler.config.model import DesiredState, Notifier
from reconciler.notify.rules import (
    CONFIG_SCOPE,
    CYCLE_SCOPE,
    Check,
    Facts,
    Message,
    NotifierState,
    Period,
    decide,
    problems,
    summary_due,
    summary_message,
)
from reconciler.notify.send import RETRY_DELAYS, Dispatcher, NotifierError, Send, SendResult, check, send_once
from reconciler.planning.observed import ObservedState
from reconciler.status.conditions import Condition
from reconciler.status.history import Event
from reconciler.status.store import StatusStore

log = structlog.get_logger(__name__)

STATE_PREFIX = "notify/"


def state_key(notifier: str) -> str:
    return f"{STATE_PREFIX}{notifier}"


def record_send(
    store: StatusStore, when: datetime, notifier: Notifier, message: Message, result: SendResult
) -> None:
    """The history's record of one message: sent or not, why not (no secret: :func:`send.redact`)."""
    store.events.record(
        Event(
            time=when,
            kind="notify",
            subject=notifier.name,
            outcome="ok" if result.ok else "failed",
            message=message.title if result.ok else f"{message.title}: not sent: {result.error}",
            attempts=result.attempts,
            detail={
                "message_kind": message.kind,
                "events": list(message.events),
                "title": message.title,
                "error": result.error,
                "seconds": round(result.seconds, 3),
            },
        )
    )


class Notifications:
    """One per daemon. ``use`` at each config load; ``after_cycle`` and ``after_config`` evaluate;
    ``close`` lets queued messages leave (bounded) and stops the sender."""

    def __init__(
        self,
        store: StatusStore,
        clock: Callable[[], datetime],
        *,
        origin: str | None = None,
        send: Send = send_once,
        delays: Sequence[float] = RETRY_DELAYS,
    ) -> None:
        self.store = store
        self.clock = clock
        self.origin = origin if origin is not None else socket.gethostname()
        self.dispatcher = Dispatcher(self._sent, send=send, delays=delays)
        self._notifiers: dict[str, Notifier] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        self.dispatcher.start()

    def close(self, timeout: float = 10.0) -> None:
        """Give queued messages up to ``timeout`` seconds, then stop (what is left: recorded, not sent)."""
        self.dispatcher.wait_idle(timeout)
        self.dispatcher.stop(timeout=2.0)

    @property
    def notifiers(self) -> Mapping[str, Notifier]:
        return dict(self._notifiers)

    def use(self, notifiers: Mapping[str, Notifier]) -> None:
        """The notifiers of the config in force. A changed or new one is checked (its secrets can be read,
        apprise knows its URL); one no longer configured forgets what it was told."""
        with self._lock:
            now = self.clock()
            for name, notifier in notifiers.items():
                if self._notifiers.get(name) == notifier:
                    continue
                try:
                    check(notifier)
                except NotifierError as exc:
                    log.error("notify.unusable", notifier=name, error=str(exc))
                    self._record(Event(now, "notify", name, "failed", f"notifier cannot send: {exc}"))
            for name in set(self._notifiers) - set(notifiers):
                self._guarded(lambda n=name: self.store.events.delete_state(state_key(n)))  # type: ignore[misc]
            self._notifiers = dict(notifiers)

    # -- evaluation -------------------------------------------------------------------------------------

    def after_cycle(
        self, desired: DesiredState, observed: ObservedState, conditions: Sequence[Condition], now: datetime
    ) -> None:
        """Every event, from what the cycle concluded; then the summaries that are due."""
        facts = Facts(
            now=now,
            conditions=tuple(conditions),
            history=self.store.history(desired.revision.id),
            checks=self._checks(),
            observed=observed,
            desired=desired,
        )
        with self._lock:
            for notifier in self._notifiers.values():
                self._evaluate(notifier, facts, CYCLE_SCOPE)
                self._summary(notifier, facts)

    def after_config(self, conditions: Sequence[Condition], now: datetime) -> None:
        """The config's own event (rejected, fixed), right after a load, without waiting for a cycle."""
        facts = Facts(now=now, conditions=tuple(c for c in conditions if c.kind == "config"))
        with self._lock:
            for notifier in self._notifiers.values():
                self._evaluate(notifier, facts, CONFIG_SCOPE)

    def _checks(self) -> dict[tuple[str, str], Check]:
        latest = self.store.events.latest(("verify", "test-restore"), command_line=False)
        return {
            key: Check(e.outcome, e.message, bool(e.detail.get("transient", False)))
            for key, e in latest.items()
        }

    def _state(self, notifier: Notifier) -> NotifierState:
        return NotifierState.from_dict(self.store.events.get_state(state_key(notifier.name)))

    def _save(self, notifier: Notifier, state: NotifierState, now: datetime) -> None:
        self.store.events.put_state(state_key(notifier.name), state.to_dict(), now)

    def _evaluate(self, notifier: Notifier, facts: Facts, scope: frozenset[str]) -> None:
        state = self._state(notifier)
        found = problems(facts, notifier)
        decision = decide(notifier, state, found, facts.now, scope=scope, origin=self.origin)
        if decision.held and state.held_since is None:
            log.warning(
                "notify.rate_limited",
                notifier=notifier.name,
                messages=notifier.rate_limit.messages,
                per_seconds=notifier.rate_limit.per.total_seconds(),
            )
            self._record(
                Event(facts.now, "notify", notifier.name, "warning",
                      "rate limit reached: what happens next is sent together once the period allows")
            )  # fmt: skip
        self._save(notifier, decision.state, facts.now)
        if decision.message is not None:
            self.dispatcher.submit(notifier, decision.message)

    def _summary(self, notifier: Notifier, facts: Facts) -> None:
        if notifier.summary is None:
            return
        state = self._state(notifier)
        due, state = summary_due(notifier, state, facts.now)
        if due and state.last_summary is not None:
            period = Period(
                since=state.last_summary,
                counts=self.store.events.counts(state.last_summary, facts.now),
                totals=self.store.events.totals(state.last_summary, facts.now),
            )
            message = summary_message(
                notifier.name, facts, period, problems(facts, notifier), origin=self.origin
            )
            if not notifier.suspend:
                self.dispatcher.submit(notifier, message)
            state = replace(state, last_summary=facts.now)
        self._save(notifier, state, facts.now)

    # -- results ----------------------------------------------------------------------------------------

    def _sent(self, notifier: Notifier, message: Message, result: SendResult) -> None:
        self._guarded(lambda: record_send(self.store, self.clock(), notifier, message, result))

    def _record(self, event: Event) -> None:
        self._guarded(lambda: self.store.events.record(event))

    @staticmethod
    def _guarded(write: Callable[[], None]) -> None:
        try:
            write()
        except Exception:
            log.exception("status.write_failed", what="notify")
