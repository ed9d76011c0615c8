"""The git source in the daemon: a thread that fetches on the interval and on ``SIGHUP``, keeps the
applied revision, records every verdict in the status store and tells the loop when a new revision is
in force.

The loop loads only the applied revision's config (``<state dir>/source/applied``), which this thread
has already fetched, verified, loaded and, where needed, seen approved (:mod:`reconciler.gitsource.sync`):
a broken, unsigned, older or unapproved head never reaches it, and the last trusted revision keeps
running meanwhile. Each verdict is logged once (not at every poll while it stays the same) and stored
as the ``source`` record and condition that ``status`` shows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import structlog

from reconciler.config.source import GitSourceSpec
from reconciler.gitsource.sync import AppliedRevision, PollResult, Syncer
from reconciler.status.source import SourceStatus, source_condition
from reconciler.status.store import StatusStore

log = structlog.get_logger(__name__)

STOP_TIMEOUT = 10.0


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class SourceTracker:
    """Follows one :class:`GitSourceSpec`; :attr:`config_dir` is where the loop reads the applied config."""

    def __init__(
        self,
        spec: GitSourceSpec,
        state_dir: Path,
        *,
        clock: Callable[[], datetime] = _utcnow,
        syncer: Syncer | None = None,
    ) -> None:
        self.spec = spec
        self.syncer = syncer if syncer is not None else Syncer(spec, state_dir)
        self.config_dir = self.syncer.clone.applied_link
        self.clock = clock
        self.status = SourceStatus(spec.name, spec.display_url, spec.ref_name, spec.path, spec.verify)
        self.polls = 0
        """Polls finished so far (tests wait on it)."""
        self._applied: AppliedRevision | None = None
        self._store: StatusStore | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._last_verdict: tuple[str | None, str, str] | None = None

    # -- state -------------------------------------------------------------------------------------

    @property
    def applied(self) -> AppliedRevision | None:
        with self._lock:
            return self._applied

    def has_applied(self) -> bool:
        """Whether a trusted revision is in force (else the loop has nothing to run)."""
        return self.applied is not None

    def open(self, store: StatusStore | None) -> None:
        """Prepare the clone and bring back the applied revision. Raises :class:`GitError` or
        :class:`TrustError` (the daemon cannot follow the source at all)."""
        self._store = store
        previous = self._read_status(store)
        if previous is not None and (previous.url, previous.ref) == (self.status.url, self.status.ref):
            self.status = previous
        applied, problem = self.syncer.open()
        now = self.clock()
        with self._lock:
            self._applied = applied
        if applied is not None:
            self.status = self.status.now_applied(applied.commit, applied.signer, now)
            log.info(
                "source.restored", commit=applied.commit, url=self.spec.display_url, ref=self.spec.ref_name
            )
        else:
            self.status = self.status.unapplied()
        if problem is not None:
            log.error("source.applied_refused", url=self.spec.display_url, message=problem)
            self.status = self.status.warn(problem, now)
        self._record()

    @staticmethod
    def _read_status(store: StatusStore | None) -> SourceStatus | None:
        if store is None:
            return None
        try:
            return store.source_status()
        except Exception:
            log.exception("status.read_failed", what="source")
            return None

    # -- polling -----------------------------------------------------------------------------------

    def poll_once(self) -> bool:
        """Fetch and judge the head now; True when a new revision was put in force."""
        result = self.syncer.poll(self.applied)
        changed = self._handle(result)
        self.polls += 1
        return changed

    def _handle(self, result: PollResult) -> bool:
        now = self.clock()
        status = self.status
        if result.reason == "FetchFailed":
            if status.fetch_error != result.message:
                log.warning(
                    "source.fetch_failed",
                    url=self.spec.display_url,
                    ref=self.spec.ref_name,
                    error=result.message,
                    applied=status.applied,
                )
            self.status = status.fetch_failed(result.message, now)
            self._record()
            return False
        if status.fetch_error is not None:
            log.info(
                "source.fetch_recovered", url=self.spec.display_url, failing_since=status.fetch_failing_since
            )
        assert result.head is not None
        status = status.fetch_ok(result.head, now)
        if result.rewritten and status.warning != result.rewritten:
            log.warning(
                "source.history_rewritten", head=result.head, applied=status.applied, message=result.rewritten
            )
            status = status.warn(result.rewritten, now)
        changed = False
        if result.accepted is not None:
            revision = self.syncer.accept(result.accepted)
            with self._lock:
                previous, self._applied = self._applied, revision
            status = status.now_applied(revision.commit, revision.signer, now)
            log.info(
                "source.applied",
                commit=revision.commit,
                previous=previous.commit if previous else None,
                signer=revision.signer,
                message=result.message,
            )
            changed = True
        elif result.reason != "UpToDate":
            status = status.refused(result.head, result.reason, result.message, now)
            self._log_refusal(result)
        self.status = status
        self._record()
        return changed

    def _log_refusal(self, result: PollResult) -> None:
        verdict = (result.head, result.reason, result.message)
        if verdict == self._last_verdict:
            return
        self._last_verdict = verdict
        applied = self.applied
        for issue in result.issues:
            log.error(
                "source.invalid_config",
                commit=result.head,
                file=issue.file,
                line=issue.line,
                column=issue.column,
                field=issue.path,
                message=issue.message,
            )
        for change in result.review.destructive if result.review and result.review.needs_approval else ():
            log.warning("source.needs_approval", commit=result.head, rule=change.rule, message=change.message)
        log.error(
            "source.refused",
            commit=result.head,
            reason=result.reason,
            message=result.message,
            applied=applied.commit if applied else None,
            action="keeping the applied revision" if applied else "nothing runs until a revision is accepted",
        )

    def _record(self) -> None:
        if self._store is None:
            return
        try:
            now = self.clock()
            self._store.record_source(self.status, now, source_condition(self.status, now))
        except Exception:  # a failing status store must not stop the source
            log.exception("status.write_failed", what="source")

    # -- the thread --------------------------------------------------------------------------------

    def start(self, on_applied: Callable[[], None]) -> None:
        """Poll now and then every interval (or when :meth:`poll_now` is called) in a thread; call
        ``on_applied`` after each newly applied revision."""
        self._thread = threading.Thread(target=self._run, args=(on_applied,), name="git-source", daemon=True)
        self._thread.start()

    def _run(self, on_applied: Callable[[], None]) -> None:
        interval = self.spec.interval.total_seconds()
        while not self._stopping.is_set():
            try:
                if self.poll_once():
                    on_applied()
            except Exception:  # a bug must not end the polling for the daemon's whole life
                log.exception("source.poll_failed")
            self._wake.wait(interval)
            self._wake.clear()

    def poll_now(self) -> None:
        """``SIGHUP``: fetch now instead of at the end of the interval."""
        self._wake.set()

    def stop(self) -> None:
        """End the thread (a running fetch is bounded by the source's timeout; the thread is a daemon
        thread, so the process does not wait for it past :data:`STOP_TIMEOUT`)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
