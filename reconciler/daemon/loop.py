"""The loop of ``esxi-reconciler run``: keep reality matching the config, for months, whatever happens.

Level-triggered: a file event, ``SIGHUP``, the resync timer and a job becoming due all mean the same,
"re-read the config, then observe, plan and apply what is due" (:mod:`.cycle`). The loop thread does
only cheap things (config loads, timers, signals, systemd pings); a cycle runs in a worker thread, so a
backup of several hours neither blocks reloads nor starves the watchdog, while a hung loop thread does
stop the ``WATCHDOG=1`` pings and systemd restarts the service.

Never stops on a bad day: an invalid config keeps the last good one running (the first one invalid: run
with nothing until it is fixed), an exception in a cycle is logged and the next cycle runs as planned.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from reconciler.allocator import release_free_memory
from reconciler.config import ConfigError, ConfigIssue, DesiredState, load_config
from reconciler.daemon import signals
from reconciler.daemon.cycle import Cycle, CycleContext, CycleResult, reconcile
from reconciler.daemon.heartbeat import Heartbeat, write_heartbeat
from reconciler.daemon.lock import AlreadyRunning, InstanceLock
from reconciler.daemon.notify import Notifier
from reconciler.daemon.source import SourceTracker
from reconciler.daemon.watch import ConfigWatcher, Debouncer, changed_within, open_for_writing
from reconciler.status.conditions import CONFIG_NAME, Condition, config_condition
from reconciler.status.history import Event, EventOutcome, Retention
from reconciler.status.store import StatusStore, status_path

if TYPE_CHECKING:
    from reconciler.config.model import Monitoring
    from reconciler.config.model import Notifier as NotifierConfig
    from reconciler.notify.service import Notifications
    from reconciler.web.service import Monitor
    from reconciler.web.view import DaemonState

log = structlog.get_logger(__name__)

DEFAULT_RESYNC = 300.0
DEFAULT_DEBOUNCE = 2.0
DEFAULT_STOP_TIMEOUT = 120.0
RESYNC_JITTER = 0.1
"""Each resync interval is drawn from ``resync * [1 - J, 1 + J]``, so two daemons do not beat together."""
DUE_SLACK = 1.0
"""Seconds after ``next_due`` the loop wakes, so the planner sees the job as due."""
DEFAULT_MIN_INTERVAL = 10.0
"""Least time between the end of a cycle and the next one started by ``next_due`` (a planner that keeps
saying "due now" must not make the daemon hammer the hosts)."""

WRITER_RECHECK = 0.5
"""Seconds between asking the kernel again whether a config file is still open for writing."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID_CONFIG = 78  # EX_CONFIG, as every verb (commands.common.ExitCode.CONFIG)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def load_with_secrets(config_dir: Path) -> DesiredState:
    """The daemon's loader: every secret reference is read once too, so that a secret file with a bad
    mode or a missing variable is reported at its place in the config (file:line) and the last good
    config keeps running, instead of a config that fails when a cycle first needs the secret."""
    return load_config(config_dir, resolve_secrets=True)


class Daemon:
    """``Daemon(config_dir, state_dir).run()`` → exit code. Every knob is a parameter for tests:
    ``cycle`` (default :func:`~reconciler.daemon.cycle.reconcile`), ``clock`` (the "now" a cycle plans
    for), ``load`` (the config loader), ``notifier`` (systemd), ``watch`` (watchdog on the config dir)."""

    def __init__(  # noqa: PLR0913  the daemon's settings and collaborators, keyword-only with defaults; tests inject clock, cycle, load, source
        self,
        config_dir: Path,
        state_dir: Path,
        *,
        resync: float = DEFAULT_RESYNC,
        debounce: float = DEFAULT_DEBOUNCE,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        once: bool = False,
        watch: bool = True,
        cycle: Cycle = reconcile,
        clock: Callable[[], datetime] = _utcnow,
        load: Callable[[Path], DesiredState] = load_with_secrets,
        notifier: Notifier | None = None,
        rng: random.Random | None = None,
        history: Retention | None = None,
        notify_delays: Sequence[float] | None = None,
        source: SourceTracker | None = None,
    ) -> None:
        self.config_dir = config_dir
        self.state_dir = state_dir
        self.resync = resync
        self.stop_timeout = stop_timeout
        self.min_interval = min_interval
        self.once = once
        self.source = source
        """The git source (``run --source``): ``config_dir`` is then its applied revision, never watched."""
        self.watch = watch and not once and source is None
        self.cycle = cycle
        self.clock = clock
        self.load = load
        self.notifier = notifier if notifier is not None else Notifier()
        self.rng = rng or random.Random()
        self.history = history or Retention()
        self.notify_delays = notify_delays
        """Seconds between a failed notification's attempts (None: ``notify.send.RETRY_DELAYS``)."""
        self.notifications: Notifications | None = None
        self.monitor: Monitor | None = None
        """The listener and text file of the config's Monitoring document (:mod:`reconciler.web`)."""
        self.debouncer = Debouncer(debounce)
        self.cancel = threading.Event()
        self.waker = signals.Waker()

        self.desired: DesiredState | None = None
        self.config_issues: tuple[ConfigIssue, ...] = ()
        self.cycles = 0
        """Cycles started so far."""
        self.last_result: CycleResult | None = None
        self._heartbeat: Heartbeat | None = None
        self.abandoned = False
        """True when run() returned while a cycle was still running (stop timeout): the caller must end
        the process without waiting for that thread (``os._exit``)."""

        self._stop_signal: int | None = None
        self._reload_requested = False
        self._cycle_requested = True
        self._next_cycle = 0.0
        self._worker: threading.Thread | None = None
        self._result: CycleResult | None = None
        self._store: StatusStore | None = None
        self._ready_sent = False
        self._source_update = False
        self._written_since: float | None = None
        """When the kernel first said a config file was open for writing (None: nothing is)."""

    # -- requests (from signal handlers, the watcher thread or tests) -------------------------------

    def request_reload(self) -> None:
        """SIGHUP: re-read the config now and run a cycle."""
        self._reload_requested = True
        self.waker.wake()

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Cancel running work and exit (at most ``stop_timeout`` later)."""
        if self._stop_signal is None:
            self._stop_signal = signum
        self.cancel.set()
        self.waker.wake()

    def _stop_signal_received(self, signum: int) -> None:
        """SIGTERM/SIGINT: the first stops (:meth:`request_stop`), a second one exits at once."""
        if self._stop_signal is not None:
            signals.force_exit(signum)
        self.request_stop(signum)

    def config_changed(self, path: str = "", event: str | None = None) -> None:
        """A file event under the config directory (called from the watcher thread); ``event`` for a
        config file, so that one being written holds the reload back (:class:`Debouncer`)."""
        self.debouncer.note(time.monotonic(), path if event else None, event)
        self.waker.wake()

    # -- the loop -----------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (or one cycle with ``once``); return the exit code."""
        lock = InstanceLock(self.state_dir)
        try:
            lock.acquire()
        except AlreadyRunning as exc:
            log.error("daemon.already_running", pid=exc.pid, lock=str(exc.path), message=str(exc))
            return EXIT_FAILED
        restore = signals.install(self.request_reload, self._stop_signal_received)
        watcher = ConfigWatcher(self.config_dir, self.config_changed) if self.watch else None
        try:
            self._store = StatusStore.open(status_path(self.state_dir))
            self._beat(started=self.clock())
            self._start_notifications()
            self._start_monitor()
            if not self._start_source():
                return EXIT_INVALID_CONFIG
            if watcher is not None:
                watcher.start()
            log.info(
                "daemon.start",
                config=str(self.config_dir),
                state_dir=str(self.state_dir),
                resync_seconds=self.resync,
                once=self.once,
                watchdog_seconds=self.notifier.watchdog_interval,
            )
            return self._loop()
        finally:
            if watcher is not None:
                watcher.stop()
            if self.source is not None:
                self.source.stop()
            restore()
            if self.monitor is not None:
                self.monitor.close()
            self._stop_notifications()
            if self._store is not None and not self.abandoned:
                self._store.close()
            lock.release()
            self.notifier.close()

    def _beat(self, **changes: datetime) -> None:
        """Update ``daemon.json`` (:mod:`.heartbeat`), which ``status`` judges the daemon by; a failure
        to write it is logged and never stops the daemon."""
        from dataclasses import replace

        try:
            if self._heartbeat is None:
                self._heartbeat = Heartbeat(
                    os.getpid(), changes.pop("started", self.clock()), self.resync, self.once
                )
            self._heartbeat = replace(self._heartbeat, **changes)  # type: ignore[arg-type]
            write_heartbeat(self.state_dir, self._heartbeat)
        except Exception as exc:  # noqa: BLE001  a heartbeat that cannot be written must not stop the daemon
            log.warning("daemon.heartbeat_failed", state_dir=str(self.state_dir), error=str(exc))

    def _loop(self) -> int:  # noqa: C901  the loop's one wait and its wake-ups (stop, reload, source, timers, watchdog) in the order they win
        self._reload()
        if self.desired is None and self.once:
            return EXIT_INVALID_CONFIG
        next_ping = 0.0
        while True:
            now = time.monotonic()
            if self._stop_signal is not None:
                return self._shutdown()
            if self._reload_requested:
                self._reload_requested = False
                if self.source is not None:
                    self.source.poll_now()  # SIGHUP also means "fetch now"
                self.notifier.reloading()
                self._reload()
                self._cycle_requested = True  # "reload now" also means "reconcile now"
                self.notifier.ready(self._status_line())
            if self.debouncer.due(now) and not self._being_written(now) and self.debouncer.take(now):
                if self.debouncer.abandoned:
                    self._reading_anyway(self.debouncer.abandoned)
                if self._reload():
                    self._cycle_requested = True
            if self._source_update:
                self._source_update = False
                if self._reload():
                    self._cycle_requested = True
            if self._worker is not None and self._result is not None:
                self._worker.join()  # it has returned its result: only the thread's exit is left
                self._finish_cycle(now)
                if self.once:
                    return EXIT_OK if self.last_result and self.last_result.ok else EXIT_FAILED
            if self._worker is None and (self._cycle_requested or now >= self._next_cycle):
                if not self._cycle_requested and self._config_settled(now):
                    self._reload()  # a resync re-reads the config too (a commit in a parent repo)
                if self.desired is not None:
                    self._start_cycle()
                else:
                    self._cycle_requested = False
                    self._next_cycle = now + self.resync
            if not self._ready_sent:
                self.notifier.ready(self._status_line())
                self._ready_sent = True
            interval = self.notifier.watchdog_interval
            if interval is not None and now >= next_ping:
                self.notifier.watchdog()
                next_ping = now + interval
            self.waker.wait(self._sleep(now, next_ping if interval is not None else None))

    def _config_settled(self, now: float) -> bool:
        """Whether a resync may re-read the config: nothing being written, no burst of events pending
        (the debouncer reloads after it), and no file changed within the quiet period whose events may
        still be on their way from the watcher thread (a half-written file read then was seen in CI)."""
        if self.debouncer.writing() or self.debouncer.deadline is not None:
            return False
        if not self.watch:
            return True
        recent = changed_within(self.config_dir, self.debouncer.quiet, time.time())
        return not (recent or self._being_written(now))

    def _being_written(self, now: float) -> bool:
        """Whether a process has a config file open for writing (the kernel's answer: watcher events may
        be late, or missing when the directory could not be watched), for at most the debouncer's
        ``hold`` seconds, after which the files are read anyway (logged). Only for a watched directory:
        a git source's revision is written whole before it is applied."""
        files = open_for_writing(self.config_dir) if self.watch else ()
        if not files:
            self._written_since = None
            return False
        if self._written_since is None:
            self._written_since = now
            log.info("config.being_written", files=list(files), detail="reading them once they are closed")
        if now < self._written_since + self.debouncer.hold:
            return True
        self._reading_anyway(files)
        self._written_since = None
        return False

    def _reading_anyway(self, files: Sequence[str]) -> None:
        """Config files still open for writing after ``hold`` seconds are read anyway: say so."""
        log.warning(
            "config.still_being_written",
            files=list(files),
            seconds=self.debouncer.hold,
            detail="reading them anyway",
        )

    def _sleep(self, now: float, next_ping: float | None) -> float | None:
        # while a writer holds a due reload back, look again soon: its close may bring no event
        held = self._written_since is not None and self.debouncer.due(now)
        burst_end = now + WRITER_RECHECK if held else self.debouncer.deadline
        deadlines = [d for d in (next_ping, burst_end) if d is not None]
        if self._worker is None:
            deadlines.append(self._next_cycle)
        return max(0.0, min(deadlines) - now) if deadlines else None

    # -- config ---------------------------------------------------------------------------------------

    def _reload(self) -> bool:
        """Re-read the config; True when a different valid config is now in force."""
        now = self.clock()
        partial: Mapping[str, NotifierConfig] = {}
        if self.source is not None and not self.source.has_applied():
            return self._no_revision_yet(now)
        try:
            desired = self.load(self.config_dir)
        except ConfigError as error:
            issues = error.issues
            partial = {n.name: n for n in error.notifiers}
            if self.desired is None:  # nothing in force yet: the rejected config's own listener says why
                self._use_monitoring(error.monitoring)
        except Exception as exc:  # an unreadable directory or a bug must not stop the daemon
            log.exception("config.load_failed", config=str(self.config_dir))
            issues = (ConfigIssue(str(self.config_dir), 0, 0, "", f"cannot be loaded: {exc}"),)
        else:
            changed = self.desired is None or desired.revision != self.desired.revision
            self.desired, self.config_issues = desired, ()
            for warning in desired.warnings:
                log.warning("config.warning", issue=str(warning))
            (log.info if changed else log.debug)(  # a resync re-reads an unchanged config: routine
                "config.loaded" if changed else "config.unchanged",
                revision=desired.revision.id,
                hosts=len(desired.hosts),
                policies=len(desired.policies),
            )
            condition = config_condition(now, revision=desired.revision.id, desired=desired)
            self._use_monitoring(desired.monitoring)
            self._set_config_condition(condition)
            self._config_event(now, changed, condition, desired.notifiers)
            return changed
        self.config_issues = issues
        for issue in issues:
            log.error(
                "config.invalid",
                file=issue.file,
                line=issue.line,
                column=issue.column,
                field=issue.path,
                message=issue.message,
            )
        running = self.desired.revision.id if self.desired else None
        log.error(
            "config.rejected",
            errors=len(issues),
            running_revision=running,
            action="keeping the last good config" if running else "nothing runs until the config is fixed",
        )
        condition = config_condition(now, revision=running, issues=issues)
        self._set_config_condition(condition)
        self._config_event(now, True, condition, self.desired.notifiers if self.desired else partial)
        self.notifier.status(self._status_line())
        return False

    # -- history and notifications (reconciler.notify) -------------------------------------------------

    def _start_notifications(self) -> None:
        """The event log's "daemon started" and the sender of notifications (never fatal)."""
        assert self._store is not None
        self._record(Event(self.clock(), "daemon", "daemon", "info", f"started (PID {os.getpid()})"))
        try:
            from reconciler.notify.send import RETRY_DELAYS
            from reconciler.notify.service import Notifications

            delays = RETRY_DELAYS if self.notify_delays is None else self.notify_delays
            self.notifications = Notifications(self._store, self.clock, delays=delays)
            self.notifications.start()
        except Exception:
            log.exception("notify.start_failed")
            self.notifications = None

    def _stop_notifications(self) -> None:
        if self.notifications is not None:
            try:
                self.notifications.close(timeout=2.0 if self.abandoned else 10.0)
            except Exception:
                log.exception("notify.stop_failed")
        cycles = f"{self.cycles} cycle" + ("" if self.cycles == 1 else "s")
        self._record(Event(self.clock(), "daemon", "daemon", "info", f"stopped after {cycles}"))

    def _record(self, event: Event) -> None:
        if self._store is not None:
            try:
                self._store.events.record(event)
            except Exception:
                log.exception("status.write_failed", what="history")

    def _config_event(
        self, now: datetime, changed: bool, condition: Condition, notifiers: Mapping[str, NotifierConfig]
    ) -> None:
        """A config loaded (when it changed) or rejected: in the history, and told to the notifiers of
        the config in force (of the rejected one's valid Notifier documents when none is)."""
        if changed:
            outcome: EventOutcome = "failed" if condition.status == "Stalled" else "info"
            words = "rejected" if condition.status == "Stalled" else "loaded"
            self._record(
                Event(now, "config", "config", outcome, f"{words}: {condition.message}",
                      revision=condition.revision)
            )  # fmt: skip
        if self.notifications is not None:
            try:
                self.notifications.use(notifiers)
                self.notifications.after_config([condition], now)
            except Exception:
                log.exception("notify.failed", what="config")

    # -- the status page and the metrics (reconciler.web) ---------------------------------------------

    def _start_monitor(self) -> None:
        """The listener's owner (started by the first config that declares one; never fatal)."""
        try:
            from reconciler.web.service import Monitor

            poll = self.source.poll_now if self.source is not None and not self.once else None
            self.monitor = Monitor(
                status_path(self.state_dir),
                daemon_state=self.daemon_state,
                clock=self.clock,
                poll_source=poll,
            )
        except Exception:
            log.exception("web.start_failed")
            self.monitor = None

    def _use_monitoring(self, config: Monitoring | None) -> None:
        if self.monitor is None:
            return
        try:
            # --once has no listener (nothing would be there to ask it); its cycle still writes the file
            self.monitor.use(None if self.once or config is None else config)
        except Exception:
            log.exception("web.failed", what="listener")

    def daemon_state(self) -> DaemonState | None:
        """What the loop knows of itself, for /readyz, the page and the metrics (any thread)."""
        from reconciler.web.view import DaemonState

        beat = self._heartbeat
        if beat is None:
            return None
        result = self.last_result
        desired = self.desired
        return DaemonState(
            started=beat.started,
            config_loaded=desired is not None,
            revision=desired.revision.id if desired is not None else None,
            cycles=self.cycles,
            cycle_running=self._worker is not None,
            last_cycle_started=beat.cycle_started,
            last_cycle_finished=beat.cycle_finished,
            last_cycle_ok=result.ok if result is not None else None,
            git_source=self.source is not None,
        )

    # -- the git source -------------------------------------------------------------------------------

    def _start_source(self) -> bool:
        """Open the git source (``--once``: and fetch once now; else start its thread). False when it
        cannot be followed at all (logged); without a source, forget any recorded one."""
        if self.source is None:
            if self._store is not None:
                try:
                    self._store.forget_source()
                except Exception:
                    log.exception("status.write_failed", what="source")
            return True
        try:
            self.source.open(self._store)
        except Exception as exc:  # noqa: BLE001  whatever keeps the source from opening (GitError, TrustError, OSError) is logged; the daemon waits, it does not die
            log.error("source.unusable", url=self.source.spec.display_url, error=str(exc))
            return False
        if self.once:
            try:
                self.source.poll_once()
            except Exception:  # a bug must not hide the applied revision, which still runs
                log.exception("source.poll_failed")
        else:
            self.source.start(self.source_applied)
        return True

    def source_applied(self) -> None:
        """The source thread put a new revision in force: load it and reconcile."""
        self._source_update = True
        self.waker.wake()

    def _no_revision_yet(self, now: datetime) -> bool:
        """No trusted revision from the git source yet: nothing to load, the config condition says why."""
        assert self.source is not None
        message = (
            f"no trusted revision of {self.source.spec.ref_name} from {self.source.spec.display_url} yet"
        )
        self._set_config_condition(
            Condition(
                "config",
                CONFIG_NAME,
                "Stalled",
                "NoRevision",
                f"{message} (see the source condition)",
                updated=now,
            )
        )
        return False

    def _set_config_condition(self, condition: Condition) -> None:
        if self._store is not None:
            try:
                self._store.set_condition(condition)
            except Exception:
                log.exception("status.write_failed")

    # -- cycles ---------------------------------------------------------------------------------------

    def _start_cycle(self) -> None:
        assert self.desired is not None and self._store is not None
        self._cycle_requested = False
        self.cycles += 1
        ctx = CycleContext(
            desired=self.desired,
            store=self._store,
            cancel=self.cancel,
            now=self.clock(),
            state_dir=self.state_dir,
            number=self.cycles,
            clock=self.clock,
            notifications=self.notifications,
            history=self.history,
            monitor=self.monitor,
        )
        self._beat(cycle_started=ctx.now)
        log.debug("cycle.start", cycle=self.cycles, revision=self.desired.revision.id)  # cycle.done says it
        self.notifier.status(f"cycle {self.cycles} running (revision {self.desired.revision.id})")
        self._result = None
        self._worker = threading.Thread(target=self._run_cycle, args=(ctx,), name="reconcile", daemon=True)
        self._worker.start()

    def _run_cycle(self, ctx: CycleContext) -> None:
        started = time.monotonic()
        result = CycleResult(ok=False, summary="cycle ended abnormally")
        try:
            result = self.cycle(ctx)
        except Exception as exc:
            log.exception("cycle.failed", cycle=ctx.number, revision=ctx.desired.revision.id)
            result = CycleResult(ok=False, summary=f"cycle failed: {type(exc).__name__}: {exc}")
            self._record(Event(self.clock(), "error", f"cycle {ctx.number}", "failed", result.summary,
                               revision=ctx.desired.revision.id))  # fmt: skip
        finally:  # whatever happened, the loop must learn that the cycle is over
            log.info(
                "cycle.done",
                cycle=ctx.number,
                revision=ctx.desired.revision.id,
                ok=result.ok,
                summary=result.summary,
                seconds=round(time.monotonic() - started, 3),
            )
            self._result = result
            self.waker.wake()

    def _finish_cycle(self, now: float) -> None:
        self._worker = None
        self._beat(cycle_finished=self.clock())
        self.last_result = self._result
        delay = self.resync * (1 + RESYNC_JITTER * (2 * self.rng.random() - 1))
        due = self.last_result.next_due if self.last_result else None
        if due is not None:
            until_due = (due - self.clock()).total_seconds() + DUE_SLACK
            delay = min(delay, max(self.min_interval, until_due))
        self._next_cycle = now + delay
        self.notifier.status(self._status_line())
        # last: the cycle's transfer buffers, kept by the tuned allocator, go back to the kernel once the
        # result is recorded (readiness and the heartbeat must not wait for it)
        release_free_memory()

    def _status_line(self) -> str:
        """One line for ``systemctl status``: the config, the last cycle, the next one."""
        parts = []
        if self.config_issues:
            running = f"running {self.desired.revision.id}" if self.desired else "nothing runs"
            parts.append(f"config invalid ({len(self.config_issues)} errors, {running})")
        if self._worker is not None:
            parts.append(f"cycle {self.cycles} running")
        elif self.last_result is not None:
            parts.append(f"cycle {self.cycles}: {self.last_result.summary}")
            wall = self.clock() + timedelta(seconds=max(0.0, self._next_cycle - time.monotonic()))
            parts.append(f"next {wall:%Y-%m-%d %H:%M}Z")
        elif self.desired is None and not self.config_issues:
            parts.append("no config loaded")
        return "; ".join(parts) or "starting"

    # -- stopping -------------------------------------------------------------------------------------

    def _shutdown(self) -> int:
        """Cancel running work and wait for it to unwind, at most ``stop_timeout`` seconds."""
        self.notifier.stopping()
        worker = self._worker
        log.info("daemon.stopping", signal=self._stop_signal, cycle_running=worker is not None)
        if worker is not None:
            deadline = time.monotonic() + self.stop_timeout
            interval = self.notifier.watchdog_interval
            while worker.is_alive() and time.monotonic() < deadline:
                if interval is not None:
                    self.notifier.watchdog()
                remaining = deadline - time.monotonic()
                worker.join(min(remaining, interval) if interval is not None else remaining)
            if worker.is_alive():
                self.abandoned = True
                log.warning(
                    "daemon.stop_timeout",
                    seconds=self.stop_timeout,
                    detail="running work abandoned; its snapshots are removed on the next run",
                )
            else:
                self._finish_cycle(time.monotonic())
        log.info("daemon.stopped", cycles=self.cycles)
        return EXIT_OK
