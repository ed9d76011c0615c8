"""The single-instance lock: one daemon per state directory (two would back up the same VMs twice).

An ``flock`` on ``<state dir>/daemon.lock``, held for the life of the process and released by the
kernel however it ends (no stale lock after a crash). The holder writes its PID into the file so the
refusal can name it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

LOCK_FILE = "daemon.lock"


class AlreadyRunning(Exception):
    """Another process holds the lock; ``pid`` is its PID when it could be read."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        who = f"PID {pid}" if pid else "another process"
        super().__init__(f"another esxi-reconciler daemon is running ({who} holds {path})")


class InstanceLock:
    """``with InstanceLock(state_dir):`` — raises :class:`AlreadyRunning` if it is taken."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise AlreadyRunning(self.path, int(holder) if holder.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race)
            self._fd = None

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def running_daemon(state_dir: Path) -> tuple[bool, int | None]:
    """Whether a daemon holds the lock of ``state_dir`` (and its PID): for ``status``, read-only."""
    path = state_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return (False, None)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            return (True, int(holder) if holder.isdigit() else None)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return (False, None)
    finally:
        os.close(fd)
