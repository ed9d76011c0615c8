"""Repository locks (docs/repository-format.md §7): lock files with host, pid and time, like restic's.

Usage::

    with RepositoryLock(backend, exclusive=False, purpose="backup nightly/web01") as lock:
        ...               # a daemon thread refreshes the lock every 5 minutes
        lock.check()      # raises LockedError if the lock was lost (removed as stale)

A lock is stale — and ignored — when its time is more than 30 minutes old, or when it was taken on this
host by a process that no longer exists.
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

from reconciler.repository.backend import Backend
from reconciler.repository.errors import FormatError, LockedError, MissingObjectError

LOCK_VERSION = 1
LOCKS_DIR = "locks"
STALE_AFTER = timedelta(minutes=30)
REFRESH_INTERVAL = timedelta(minutes=5)

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

    def __init__(
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
    ) -> None:
        self.backend = backend
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
        if self.exclusive:
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
            except OSError:
                continue  # transient storage error; retry next interval (stale only after 30 min)

    def release(self) -> None:
        """Stop refreshing and remove the lock file (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            if self.info is not None:
                with contextlib.suppress(OSError):
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
