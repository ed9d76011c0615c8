"""Config directory watching: file events only mark the config dirty; a quiet period ends a burst.

An editor save, a ``git pull`` or a checkout produces dozens of events within milliseconds; reading the
tree in the middle of one would see half a change. So events only move a deadline forward
(:class:`Debouncer`); the loop re-reads everything once nothing has happened for the quiet period.
Events that cannot change the config are dropped: reads (opened, closed without writing, attribute
changes, which our own reload causes) and git internals other than ``HEAD`` and refs (a commit changes
the recorded revision; object writes do not).

A writer that pauses longer than the quiet period (a slow copy, a script writing a file in parts, an
editor without atomic saves) would still leave a half-written file to read, and a file cut at a line
end is often valid YAML that says less than its author meant. So a config file (what the loader reads:
``*.yaml``/``*.yml``, no dot-names) that was written to (``modified``) is *being written* until it is
closed after writing (``closed``), deleted or renamed away; the burst is not over while one is, for at
most ``hold`` seconds (a writer that never closes must not stop reloads for good). Files written
elsewhere and renamed into place (atomic saves) are complete when they appear.

Events can be late (a busy machine) or missing (no inotify instance left, so nothing is watched), so
before reading, the loop also asks the kernel (:func:`open_for_writing`): a read lease is refused while
any process has the file open for writing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from reconciler.config.documents import YAML_SUFFIXES, find_files
from reconciler.directio import filesystem_type

log = structlog.get_logger(__name__)

RELEVANT_EVENTS = frozenset({"created", "modified", "deleted", "moved", "closed"})
_GIT_KEEP = ("HEAD", "refs", "packed-refs")
DEFAULT_HOLD = 60.0
"""Longest a file being written holds a reload back."""


class Debouncer:
    """Collapses a burst of events into one: :meth:`take` turns true ``quiet`` seconds after the last,
    once no config file is being written (or the oldest has been for ``hold`` seconds).

    Times are passed in (a monotonic clock), so the rule is tested without sleeping. Thread-safe: the
    watcher thread notes events, the loop asks.
    """

    def __init__(self, quiet: float, hold: float = DEFAULT_HOLD) -> None:
        self.quiet = quiet
        self.hold = hold
        self._last: float | None = None
        self._writing: dict[str, float] = {}
        self._lock = threading.Lock()
        self.abandoned: tuple[str, ...] = ()
        """Files still being written when the last :meth:`take` gave up waiting for them."""

    def note(self, now: float, path: str | None = None, event: str | None = None) -> None:
        """An event at ``now``; with ``path`` and ``event`` (of a config file) also whether it is being
        written: ``modified`` starts that, ``closed``, ``deleted`` and ``moved`` (from it) end it."""
        with self._lock:
            self._last = now
            if path is None:
                return
            if event == "modified":
                self._writing.setdefault(path, now)
            elif event in ("closed", "deleted", "moved"):
                self._writing.pop(path, None)

    def writing(self) -> tuple[str, ...]:
        """The config files being written now."""
        with self._lock:
            return tuple(sorted(self._writing))

    @property
    def deadline(self) -> float | None:
        """When the pending burst ends (None: nothing pending); while a file is being written, when
        waiting for it gives up (its close wakes the loop earlier)."""
        with self._lock:
            return self._deadline()

    def _deadline(self) -> float | None:
        if self._last is None:
            return None
        end = self._last + self.quiet
        if self._writing:
            end = max(end, min(self._writing.values()) + self.hold)
        return end

    def due(self, now: float) -> bool:
        """Whether :meth:`take` would be true now, i.e. the deadline has passed (the caller may still
        hold the reload back)."""
        with self._lock:
            deadline = self._deadline()
        return deadline is not None and now >= deadline

    def take(self, now: float) -> bool:
        """True (once) when a burst has been quiet long enough and nothing is being written (or has been
        for ``hold``); the caller then reloads."""
        with self._lock:
            deadline = self._deadline()
            if deadline is None or now < deadline:
                return False
            self.abandoned = tuple(sorted(self._writing))
            self._writing.clear()
            self._last = None
            return True


def changed_within(root: Path, seconds: float, now: float) -> bool:
    """Whether a config file under ``root`` was modified less than ``seconds`` before ``now`` (wall
    clock). The watcher's events arrive in another thread, possibly late on a busy machine: a file
    written a moment ago may not be known as *being written* yet, so a resync must not read it now."""
    for path in find_files(root) if root.exists() else ():
        try:
            if path.stat().st_mtime > now - seconds:
                return True
        except OSError:  # removed meanwhile: that is a change too
            return True
    return False


LEASE_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "tmpfs", "overlay"})
"""Local filesystems whose refused read lease means a local writer. Elsewhere it means nothing or
something else: NFS refuses every lease (``EINVAL``), SMB refuses a read lease with ``EAGAIN`` whenever
the server has not granted a read oplock, which would hold every reload back."""


def open_for_writing(root: Path) -> tuple[str, ...]:
    """The config files under ``root`` that some process has open for writing, as the kernel says: a
    read lease (``F_SETLEASE``) is refused with ``EAGAIN`` while a writer has the file open, whatever
    events the watcher did or did not see. A file the kernel will not answer for (not on one of
    :data:`LEASE_FILESYSTEMS`, not ours and no ``CAP_LEASE``, leases disabled) is not listed: its events
    decide."""
    found = []
    kinds: dict[Path, str | None] = {}  # the mount table read once per directory, not once per file
    for path in find_files(root) if root.exists() else ():
        directory = path.resolve().parent
        if directory not in kinds:
            kinds[directory] = filesystem_type(directory)
        if kinds[directory] not in LEASE_FILESYSTEMS:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # gone or unreadable meanwhile: the reload says so
            continue
        try:
            # a writer opening the file while the lease is held would make the kernel signal us
            # (SIGIO, which ends a process): SIGURG is ignored unless handled, and we drop the lease
            # at once, so the writer waits microseconds
            fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                found.append(str(path))
        else:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        finally:
            os.close(fd)
    return tuple(found)


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


def config_file(path: str, root: Path) -> bool:
    """Whether the loader reads ``path`` (``*.yaml``/``*.yml`` under ``root``, no dot-name on the way):
    only such a file, half-written, could be taken for config."""
    try:
        parts = PurePath(path).relative_to(root).parts
    except ValueError:
        return False
    return bool(parts) and not any(p.startswith(".") for p in parts) and parts[-1].endswith(YAML_SUFFIXES)


OnChange = Callable[[str, "str | None"], None]
"""``(path, event)``: ``event`` is the event type for a config file (see :meth:`Debouncer.note`), None
for anything else that may change the config (a git ref, a directory)."""


class _Handler(FileSystemEventHandler):
    def __init__(self, root: Path, on_change: OnChange) -> None:
        self.root = root
        self.on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = [event.src_path, getattr(event, "dest_path", "") or ""]
        for i, raw in enumerate(paths):
            path = raw.decode() if isinstance(raw, bytes) else str(raw)
            if path and relevant(path, self.root, event.event_type):
                log.debug("config.event", type=event.event_type, path=path)
                # the destination of a rename is a whole file: only its source stops being written
                kind = event.event_type if i == 0 and not event.is_directory else "created"
                self.on_change(path, kind if config_file(path, self.root) else None)


class ConfigWatcher:
    """Watches ``directory`` recursively (a single config file: its directory) with watchdog."""

    def __init__(self, directory: Path, on_change: OnChange) -> None:
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
