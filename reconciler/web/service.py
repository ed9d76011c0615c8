"""What the daemon calls (:class:`Monitor`): the listener of the config's Monitoring document (started,
restarted when its settings change, stopped), and after every cycle the records of
:mod:`reconciler.web.record` and the node_exporter text file. Nothing here may stop the daemon: a port
in use or an unwritable text file is logged in one line and the backups go on."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from reconciler.config.model import DesiredState, Monitoring
from reconciler.planning.observed import ObservedState
from reconciler.status.store import StatusStore
from reconciler.web.read import load_snapshot, read_snapshot
from reconciler.web.record import RepoOpener, record_cycle
from reconciler.web.server import Listener, Routes
from reconciler.web.view import DaemonState, Snapshot

log = structlog.get_logger(__name__)

DEFAULT_READY_AFTER = timedelta(minutes=30)


class Monitor:
    """The daemon's listener and text file. ``daemon_state`` is read on every request (from the
    listener's threads); ``poll_source`` is the git source's "fetch now" (None without one)."""

    def __init__(
        self,
        store_path: Path,
        *,
        daemon_state: Callable[[], DaemonState | None],
        clock: Callable[[], datetime],
        poll_source: Callable[[], None] | None = None,
        repo_opener: RepoOpener | None = None,
    ) -> None:
        self.store_path = store_path
        self.daemon_state = daemon_state
        self.clock = clock
        self.poll_source = poll_source
        self.repo_opener = repo_opener
        self.config: Monitoring | None = None
        self.listener: Listener | None = None

    def snapshot(self) -> Snapshot:
        """The status store as of now (its own read-only connection)."""
        return load_snapshot(self.store_path, self.clock(), self.daemon_state())

    def use(self, config: Monitoring | None) -> None:
        """The Monitoring document now in force (None: no listener, no text file)."""
        self.config = config
        listen = config.listen if config is not None else None
        if self.listener is not None and (listen is None or listen != self.listener.listen):
            self.listener.stop()
            log.info("web.stopped", url=self.listener.url)
            self.listener = None
        if listen is not None and self.listener is None:
            routes = Routes(
                snapshot=self.snapshot,
                daemon=self.daemon_state,
                ready_after=self._ready_after,
                clock=self.clock,
                poll_source=self.poll_source,
            )
            listener = Listener(listen, routes)
            try:
                listener.start()
            except (OSError, ValueError) as exc:  # port in use, address not ours, unreadable TLS files
                where = f"{listen.address}:{listen.port}"
                log.error(
                    "web.listen_failed",
                    address=where,
                    error=str(exc),
                    fix="free the port, or change spec.listen of the Monitoring document",
                )
                return
            self.listener = listener

    def _ready_after(self) -> timedelta:
        return self.config.ready_after if self.config is not None else DEFAULT_READY_AFTER

    def after_cycle(self, store: StatusStore, desired: DesiredState, observed: ObservedState) -> None:
        """Record what the page and the metrics need (the cycle's worker thread, after apply), then
        rewrite the text file."""
        from reconciler.operations.repositories import open_repository

        now = self.clock()
        record_cycle(store, desired, observed, now, self.repo_opener or open_repository)
        config = desired.monitoring
        if config is not None and config.textfile is not None:
            from reconciler.web.metrics import write_textfile

            path = Path(config.textfile)
            try:
                write_textfile(path, read_snapshot(store, now, self.daemon_state()))
            except OSError as exc:
                log.error(
                    "web.textfile_failed",
                    path=str(path),
                    error=str(exc),
                    fix="create the directory and let the daemon's user write to it, or change spec.textfile",
                )

    def close(self) -> None:
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
