"""Config directory watching: file events only mark the config dirty; a quiet period ends a burst.

An editor save, a ``git pull`` or a checkout produces dozens of events within milliseconds; reading the
tree in the middle of one would see half a change. So events only move a deadline forward
(:class:`Debouncer`); the loop re-reads everything once nothing has happened for the quiet period.
Events that cannot change the config are dropped: reads (opened, closed without writing, attribute
changes, which our own reload causes) and git internals other than ``HEAD`` and refs (a commit changes
the recorded revision; object writes do not).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = structlog.get_logger(__name__)

RELEVANT_EVENTS = frozenset({"created", "modified", "deleted", "moved", "closed"})
_GIT_KEEP = ("HEAD", "refs", "packed-refs")


class Debouncer:
    """Collapses a burst of events into one: :meth:`due` turns true ``quiet`` seconds after the last.

    Times are passed in (a monotonic clock), so the rule is tested without sleeping. Thread-safe: the
    watcher thread notes events, the loop asks.
    """

    def __init__(self, quiet: float) -> None:
        self.quiet = quiet
        self._last: float | None = None
        self._lock = threading.Lock()

    def note(self, now: float) -> None:
        with self._lock:
            self._last = now

    @property
    def deadline(self) -> float | None:
        """When the pending burst ends (None: nothing pending)."""
        with self._lock:
            return None if self._last is None else self._last + self.quiet

    def take(self, now: float) -> bool:
        """True (once) when a burst has been quiet long enough; the caller then reloads."""
        with self._lock:
            if self._last is None or now < self._last + self.quiet:
                return False
            self._last = None
            return True


def relevant(path: str, root: Path, event_type: str) -> bool:
    """Whether an event may change the loaded config or its revision."""
    if event_type not in RELEVANT_EVENTS:
        return False
    try:
        parts = PurePath(path).relative_to(root).parts
    except ValueError:
        return True
    if ".git" in parts:
        inside = parts[parts.index(".git") + 1 :]
        return bool(inside) and inside[0] in _GIT_KEEP
    return True


class _Handler(FileSystemEventHandler):
    def __init__(self, root: Path, on_change: Callable[[str], None]) -> None:
        self.root = root
        self.on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = [event.src_path, getattr(event, "dest_path", "") or ""]
        for raw in paths:
            path = raw.decode() if isinstance(raw, bytes) else str(raw)
            if path and relevant(path, self.root, event.event_type):
                log.debug("config.event", type=event.event_type, path=path)
                self.on_change(path)
                return


class ConfigWatcher:
    """Watches ``directory`` recursively (a single config file: its directory) with watchdog."""

    def __init__(self, directory: Path, on_change: Callable[[str], None]) -> None:
        single_file = directory.exists() and not directory.is_dir()
        self.root = directory.resolve().parent if single_file else directory.resolve()
        self._observer: Any = None
        self._on_change = on_change

    def start(self) -> bool:
        """Start watching; False (logged) when it cannot, e.g. the directory does not exist yet (the
        periodic resync still picks changes up)."""
        observer = Observer()
        observer.daemon = True
        try:
            observer.schedule(_Handler(self.root, self._on_change), str(self.root), recursive=True)
            observer.start()
        except OSError as exc:
            log.warning("config.watch_failed", directory=str(self.root), error=str(exc))
            return False
        self._observer = observer
        log.info("config.watching", directory=str(self.root))
        return True

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
