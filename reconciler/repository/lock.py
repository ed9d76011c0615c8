"""Repository locks (docs/repository-format.md §7): lock files with host, pid and time, like restic's.

Usage::

    with RepositoryLock(backend, exclusive=False, purpose="backup nightly/web01") as lock:
        ...               # a daemon thread refreshes the lock every 5 minutes
        lock.check()      # raises LockedError if the lock was lost (removed as stale)

A lock is stale — and ignored — when its time is more than 30 minutes old, or when it was taken on this
host by a process that no longer exists.

The same rules tell which files in ``tmp/`` are leftovers: :func:`stale_staged_files` lists the staged
files whose writer is gone (docs/repository-format.md §7.1), so a run can remove what a killed run left
without touching what a live writer in another process is still staging.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import TracebackType

from reconciler.repository.backend import TMP_DIR, Backend, ObjectInfo, host_tag, staged_owner
from reconciler.repository.errors import FormatError, LockedError, MissingObjectError, RepositoryError

LOCK_VERSION = 1
LOCKS_DIR = "locks"
STALE_AFTER = timedelta(minutes=30)
REFRESH_INTERVAL = timedelta(minutes=5)
STAGING_GRACE = timedelta(minutes=10)
"""A staged file this young is kept when its writer cannot be checked (another host, or an older
version's name): a writer stages a lock file *before* its lock exists, and one put takes that long at
most even on a slow NAS."""

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LockInfo:
    """One lock file's content."""

    id: str
    exclusive: bool
    host: str
    pid: int
    time: datetime
    purpose: str = ""

    @property
    def name(self) -> str:
        return f"{LOCKS_DIR}/{self.id}.json"

    def describe(self) -> str:
        kind = "exclusively" if self.exclusive else "shared"
        what = f" ({self.purpose})" if self.purpose else ""
        since = self.time.isoformat(timespec="seconds")
        return f"{kind} by pid {self.pid} on {self.host} since {since}{what}"

    def to_json(self) -> bytes:
        doc = {
            "version": LOCK_VERSION,
            "id": self.id,
            "exclusive": self.exclusive,
            "host": self.host,
            "pid": self.pid,
            "time": self.time.isoformat(timespec="microseconds"),
            "purpose": self.purpose,
        }
        return json.dumps(doc).encode("utf-8")

    @classmethod
    def from_json(cls, name: str, data: bytes) -> LockInfo:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise TypeError("not an object")
            if doc.get("version") != LOCK_VERSION:
                raise FormatError(f"{name}: unsupported lock version {doc.get('version')!r}")
            moment = datetime.fromisoformat(str(doc["time"]))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return cls(
                str(doc["id"]),
                bool(doc["exclusive"]),
                str(doc["host"]),
                int(doc["pid"]),
                moment,
                str(doc.get("purpose", "")),
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise FormatError(f"{name}: malformed lock file ({exc.__class__.__name__})") from None

    def is_stale(
        self,
        now: datetime,
        host: str,
        alive: Callable[[int], bool] = pid_alive,
        stale_after: timedelta = STALE_AFTER,
    ) -> bool:
        """Stale: not refreshed for ``stale_after``, or taken on ``host`` by a process that is gone."""
        if now - self.time > stale_after:
            return True
        return self.host == host and not alive(self.pid)


def list_locks(backend: Backend) -> list[LockInfo]:
    """All readable lock files (unreadable or vanished ones are skipped)."""
    found = []
    for name in backend.list(LOCKS_DIR):
        if not name.endswith(".json"):
            continue
        try:
            found.append(LockInfo.from_json(name, backend.get(name)))
        except (MissingObjectError, FormatError):
            continue
    return found


class RepositoryLock:
    """A shared or exclusive lock on one repository; a context manager.

    ``clock``, ``host``, ``pid`` and ``alive`` exist for tests (fake time and processes).
    """

    def __init__(  # noqa: PLR0913  the lock's settings, keyword-only with defaults (tests inject clock, pid, alive); it carries them
        self,
        backend: Backend,
        *,
        exclusive: bool,
        purpose: str = "",
        clock: Clock = _utcnow,
        host: str | None = None,
        pid: int | None = None,
        alive: Callable[[int], bool] = pid_alive,
        stale_after: timedelta = STALE_AFTER,
        refresh_interval: timedelta = REFRESH_INTERVAL,
        remove_stale: bool = True,
    ) -> None:
        self.backend = backend
        self.remove_stale = remove_stale
        """An exclusive locker deletes the stale lock files it finds (§7); False for a dry run."""
        self.exclusive = exclusive
        self.purpose = purpose
        self._clock = clock
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self._alive = alive
        self.stale_after = stale_after
        self.refresh_interval = refresh_interval
        self.info: LockInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: LockedError | None = None
        self._mutex = threading.Lock()

    def __repr__(self) -> str:
        state = self.info.describe() if self.info else "not held"
        return f"RepositoryLock({state})"

    @property
    def held(self) -> bool:
        return self.info is not None

    def acquire(self) -> LockInfo:
        """Create the lock file, then look for conflicting live locks; :class:`LockedError` naming them."""
        if self.info is not None:
            raise RuntimeError("lock already held")
        info = LockInfo(
            secrets.token_hex(16), self.exclusive, self.host, self.pid, self._clock(), self.purpose
        )
        self.backend.put(info.name, [info.to_json()])
        now = self._clock()
        conflicts = []
        stale = []
        for other in list_locks(self.backend):
            if other.id == info.id:
                continue
            if other.is_stale(now, self.host, self._alive, self.stale_after):
                stale.append(other)
            elif self.exclusive or other.exclusive:
                conflicts.append(other)
        if conflicts:
            self.backend.delete(info.name)
            holder = min(conflicts, key=lambda c: c.time)
            raise LockedError(f"repository is locked {holder.describe()}")
        if self.exclusive and self.remove_stale:
            for other in stale:
                self.backend.delete(other.name)
        self.info = info
        self._lost = None
        return info

    def refresh(self) -> None:
        """Rewrite the lock's time; :class:`LockedError` if the lock file was removed meanwhile."""
        with self._mutex:
            if self.info is None:
                raise RuntimeError("lock not held")
            if not self.backend.exists(self.info.name):
                self._lost = LockedError(f"lock {self.info.id} was removed by another process (stale?)")
                raise self._lost
            info = LockInfo(self.info.id, self.exclusive, self.host, self.pid, self._clock(), self.purpose)
            self.backend.replace(info.name, [info.to_json()])
            self.info = info

    def check(self) -> None:
        """Raise the :class:`LockedError` recorded by the refresh thread, if the lock was lost."""
        if self._lost is not None:
            raise self._lost

    def start_refresher(self) -> None:
        """Refresh in a daemon thread every ``refresh_interval`` until :meth:`release`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh_loop, name="repo-lock-refresh", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_interval.total_seconds()):
            try:
                self.refresh()
            except LockedError:
                return
            except (OSError, RepositoryError):
                continue  # storage error (even a full volume); retry next interval (stale only after 30 min)

    def release(self) -> None:
        """Stop refreshing and remove the lock file (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            if self.info is not None:
                with contextlib.suppress(OSError, RepositoryError):
                    self.backend.delete(self.info.name)
                self.info = None

    def __enter__(self) -> RepositoryLock:
        self.acquire()
        self.start_refresher()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def remove_stale_locks(
    backend: Backend,
    *,
    clock: Clock = _utcnow,
    host: str | None = None,
    alive: Callable[[int], bool] = pid_alive,
) -> list[LockInfo]:
    """Delete stale lock files (``unlock``); returns what was removed."""
    now = clock()
    here = host or socket.gethostname()
    removed = []
    for info in list_locks(backend):
        if info.is_stale(now, here, alive):
            backend.delete(info.name)
            removed.append(info)
    return removed


def stale_staged_files(
    backend: Backend,
    *,
    own: LockInfo | None = None,
    clock: Clock = _utcnow,
    host: str | None = None,
    alive: Callable[[int], bool] = pid_alive,
    grace: timedelta = STAGING_GRACE,
) -> list[ObjectInfo]:
    """The files in ``tmp/`` no live writer owns: safe to delete, by the lock rules (§7.1).

    A staged file names its writer (host, pid, process token). It is kept when the writer is on this host
    and its process exists (and is not an earlier process that had the same pid as the caller), or when
    a live lock of that host and pid exists; a file of another host without a live lock, or of an older
    version (no owner in the name), is kept while younger than ``grace`` — and one of an older version
    also while any live lock other than ``own`` (the caller's) exists, since it may be that writer's.
    ``tmp/`` is listed *before* the locks are read, so a writer that appears in between cannot lose a
    file. The result is unsorted; nothing is deleted here.
    """
    names = list(backend.list(TMP_DIR))
    if not names:
        return []
    now = clock()
    here = host or socket.gethostname()
    here_tag = host_tag(here)
    live = [
        info
        for info in list_locks(backend)
        if not info.is_stale(now, here, alive) and (own is None or info.id != own.id)
    ]
    live_writers = {(host_tag(info.host), info.pid) for info in live}
    stale = []
    for name in names:
        try:
            info = backend.stat(name)
        except MissingObjectError:
            continue
        young = now.timestamp() - info.mtime < grace.total_seconds()
        owner = staged_owner(name)
        if owner is None:
            keep = young or bool(live)
        elif owner.host == here_tag:
            # this host: the process table is the truth (a file of an earlier process that had our pid
            # is not ours: the token differs)
            keep = owner.ours or (owner.pid != os.getpid() and alive(owner.pid))
        else:
            keep = (owner.host, owner.pid) in live_writers or young
        if not keep:
            stale.append(info)
    return stale
