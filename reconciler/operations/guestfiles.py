"""The guest filesystems inside ``mount --files``: ``vms/<vm>/<point>/files/sda1/etc/hosts``.

A point's ``files/`` directory costs nothing until someone looks inside it. Then the point's filesystems
are mounted read-only exactly as ``files`` mounts them (:func:`reconciler.operations.files.start_point_files`:
a ``mount --only-point`` child serving the disk images, read-only loop devices, mounts that never write)
in a private directory below ``<state dir>/files/``, and the FUSE callbacks pass lookups, listings,
links and reads through to them (``lstat``, ``listdir``, ``readlink``, ``pread`` on our own fds).
Passing through, not mounting into our tree: the kernel holds the dentry being looked up while a FUSE
callback runs, so mounting on a directory of our own tree from inside one deadlocks.

Each path is walked one component at a time from the filesystem's root with ``O_NOFOLLOW``: a guest
symlink is shown as a link (its text, for the reader's own system to follow or not) and never followed
by us, and ``..`` is refused, so nothing outside the guest's tree is ever read on the caller's behalf.

At most :data:`MAX_OPEN_POINTS` points are open at once (:class:`SessionPool`): the least recently used
idle one is released for a new one; a point with open files is never released (a new point is then
``EBUSY``). Sessions are started from one long-lived thread of the pool, itself started by the
caller before the FUSE loop: a FUSE child dies with the thread that started it (``PR_SET_PDEATHSIG``),
libfuse ends idle worker threads, and its threads block the signals a child then inherits. Everything is
released by :meth:`GuestFiles.close` when the mount ends; a mount killed outright leaves the cleanup
records of ``files``, which the next ``files`` or ``mount --files`` uses.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from reconciler.facts.points import RestorePoint
from reconciler.operations.files import (
    FilesError,
    FilesSession,
    filesystem_line,
    filesystem_rows,
    unreadable_message,
)
from reconciler.operations.restore import describe_source

log = structlog.get_logger(__name__)
T = TypeVar("T")

MAX_OPEN_POINTS = 4
"""Points whose filesystems are mounted at once (each holds a FUSE child, loop devices and mounts)."""
RETRY_AFTER = 30.0
"""Seconds a point whose filesystems could not be mounted answers EIO before it is tried again."""
README = "README.txt"

OnError = Callable[[str], None]


class PointsBusy(FilesError):
    """Every open point has files open: no room for another one."""


def checked_parts(parts: Sequence[str]) -> list[str]:
    """The components of a path below ``files/``, each a plain name: ``..``, ``.``, empty names, ``/``
    and NUL are ``ENOENT`` (the kernel never sends them; nothing we are handed may leave the tree)."""
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\0" in part:
            raise OSError(errno.ENOENT, f"not a name inside the guest: {part!r}")
    return list(parts)


def open_parent(root: Path, parts: Sequence[str]) -> int:
    """An ``O_PATH`` fd of the directory holding ``parts[-1]`` (of ``root`` itself for no parts),
    reached from ``root`` without following a symlink: a link in the middle is ``ENOTDIR``."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in checked_parts(parts)[:-1]:
            inner = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def in_parent(root: Path, parts: Sequence[str], act: Callable[[int, str], T]) -> T:
    """``act(parent_fd, name)`` on the last of ``parts``, its directory reached by :func:`open_parent`
    (closed again afterwards)."""
    parent = open_parent(root, parts)
    try:
        return act(parent, parts[-1])
    finally:
        os.close(parent)


def _attributes(st: os.stat_result) -> dict[str, Any]:
    """The guest's own mode, owner, size and times (ns), for mfusepy's ``getattr``."""
    return {
        "st_mode": st.st_mode,
        "st_nlink": st.st_nlink,
        "st_size": st.st_size,
        "st_uid": st.st_uid,
        "st_gid": st.st_gid,
        "st_rdev": st.st_rdev,
        "st_blocks": st.st_blocks,
        "st_atime": st.st_atime_ns,
        "st_mtime": st.st_mtime_ns,
        "st_ctime": st.st_ctime_ns,
    }


# -- the sessions ---------------------------------------------------------------------------------


@dataclass
class _Slot:
    future: Future[FilesSession]
    users: int = 0


class SessionPool:
    """The open points: started on first use, at most ``limit`` at once, the least recently used idle
    one released first, a point in use never; a point that failed answers with its reason for
    :data:`RETRY_AFTER` seconds before it is tried again."""

    def __init__(
        self,
        start: Callable[[RestorePoint], FilesSession],
        *,
        limit: int = MAX_OPEN_POINTS,
        on_error: OnError | None = None,
    ) -> None:
        self._start = start
        self.limit = limit
        self._on_error = on_error
        self._lock = threading.Lock()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        """Point id → its session (or its start under way), least recently used first."""
        self._failed: dict[str, tuple[float, str]] = {}
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="files-sessions")
        self._starter.submit(int).result()  # its thread started now, by the caller, not by libfuse's
        self._closed = False

    def open_points(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def acquire(self, point: RestorePoint) -> FilesSession:
        """The point's session, started if need be; in use until :meth:`release`."""
        idle: list[_Slot] = []
        with self._lock:
            if self._closed:
                raise FilesError("the mount is ending")
            slot = self._slots.get(point.id)
            if slot is None:
                failed = self._failed.get(point.id)
                if failed is not None and time.monotonic() - failed[0] < RETRY_AFTER:
                    raise FilesError(failed[1])
                idle = self._make_room(point)
                slot = _Slot(self._starter.submit(self._started, point))
                self._slots[point.id] = slot
            slot.users += 1
            self._slots.move_to_end(point.id)
        for old in idle:
            old.future.result().close()
        try:
            return slot.future.result()
        except BaseException:
            with self._lock:
                slot.users -= 1
                if self._slots.get(point.id) is slot:
                    del self._slots[point.id]
            raise

    def release(self, point: RestorePoint) -> None:
        with self._lock:
            slot = self._slots.get(point.id)
            if slot is not None:
                slot.users -= 1

    @contextlib.contextmanager
    def using(self, point: RestorePoint) -> Iterator[FilesSession]:
        session = self.acquire(point)
        try:
            yield session
        finally:
            self.release(point)

    def _make_room(self, point: RestorePoint) -> list[_Slot]:
        """Under the lock: take out the least recently used idle sessions beyond ``limit - 1``."""
        taken = []
        for point_id, slot in list(self._slots.items()):
            if len(self._slots) < self.limit:
                break
            if slot.users == 0 and slot.future.done() and slot.future.exception() is None:
                del self._slots[point_id]
                taken.append(slot)
        if len(self._slots) >= self.limit:
            raise PointsBusy(
                f"restore point {point.id}: the filesystems of {self.limit} points are open and in use"
                f" ({', '.join(self._slots)}); close the files open below one of their files/ directories"
            )
        return taken

    def _started(self, point: RestorePoint) -> FilesSession:
        """In the pool's thread: start the session; a failure is reported once and remembered."""
        try:
            session = self._start(point)
        except Exception as exc:
            message = str(exc)
            prefix = f"restore point {point.id}"
            if not message.startswith(prefix):
                message = f"{prefix} of {describe_source(point)}: {message}"
            message = f"{message} (files/ of this point is unreadable)"
            with self._lock:
                self._failed[point.id] = (time.monotonic(), message)
            log.error("mount.files_failed", point=point.id, error=message)
            if self._on_error is not None:
                self._on_error(message)
            raise FilesError(message) from exc
        with self._lock:
            self._failed.pop(point.id, None)
        for problem in session.problems:
            log.warning("files.problem", point=point.id, problem=problem)
        log.info("mount.files_opened", point=point.id, filesystems=sorted(session.mounted))
        return session

    def close(self) -> None:
        """Release every session (waiting for those being started); no new ones afterwards."""
        with self._lock:
            self._closed = True
            slots = list(self._slots.values())
            self._slots.clear()
        for slot in slots:
            with contextlib.suppress(Exception):
                slot.future.result().close()
        self._starter.shutdown(wait=True)


# -- the passthrough ------------------------------------------------------------------------------


@dataclass
class GuestHandle:
    """An open guest file: our fd on the read-only mount, or the README's text."""

    point: RestorePoint
    session: FilesSession
    path: str
    """Inside the point, as ``files`` names it: ``sda1/home/ann/report.ods``."""
    fd: int | None = None
    data: bytes | None = None


class GuestFiles:
    """The part of the FUSE tree below each point's ``files/`` (the ``GuestTree`` of
    :mod:`reconciler.operations.mount`). Errors are ``OSError`` with the errno for the kernel; an
    unreadable chunk or a point that cannot be mounted is also one line to ``on_error``."""

    def __init__(self, pool: SessionPool, *, on_error: OnError | None = None) -> None:
        self.pool = pool
        self._on_error = on_error
        self._lock = threading.Lock()
        self._handles: set[int] = set()
        """Our open fds on the guests' mounts (closed at the end, so the mounts are not busy)."""

    # -- the directory files/ itself and its README

    def _readme(self, session: FilesSession) -> bytes:
        lines = [
            f"The filesystems of {session.describe()}, mounted read-only",
            "(the same as `esxi-reconciler files VM --point ID ls` shows):",
            "",
        ]
        rows = filesystem_rows(session)
        width = max([6, *(len(str(row["name"])) for row in rows)])
        lines += [filesystem_line(row, width) for row in rows] or ["no partitions or filesystems found"]
        lines += [f"  note: {problem}" for problem in session.problems]
        return ("\n".join(lines) + "\n").encode()

    def _locate(self, session: FilesSession, parts: list[str]) -> tuple[Path, list[str]]:
        """``[sda1, etc, hosts]`` → (the mount of sda1, ``[etc, hosts]``)."""
        root = session.mounted.get(parts[0])
        if root is None:
            raise OSError(errno.ENOENT, parts[0])
        return root, checked_parts(parts[1:])

    @contextlib.contextmanager
    def _session(self, point: RestorePoint) -> Iterator[FilesSession]:
        try:
            with self.pool.using(point) as session:
                yield session
        except PointsBusy as exc:
            self._report(str(exc))
            raise OSError(errno.EBUSY, str(exc)) from exc
        except FilesError as exc:  # reported once, by the pool
            raise OSError(errno.EIO, str(exc)) from exc

    def _failed(self, session: FilesSession, parts: list[str], exc: OSError) -> OSError:
        """``exc`` for the kernel; an I/O error (an unreadable chunk under it) also one line."""
        if exc.errno == errno.EIO:
            self._report(unreadable_message(session, "/".join(parts), exc))
        return exc

    def getattr(self, point: RestorePoint, parts: list[str]) -> dict[str, Any]:
        with self._session(point) as session:
            if parts == [README]:
                when = int(point.snapshot_time.timestamp() * 1e9)
                size = len(self._readme(session))
                return {
                    "st_mode": stat.S_IFREG | 0o444,
                    "st_nlink": 1,
                    "st_size": size,
                    "st_uid": os.getuid(),
                    "st_gid": os.getgid(),
                    "st_blocks": (size + 511) // 512,
                    "st_atime": when,
                    "st_mtime": when,
                    "st_ctime": when,
                }
            root, rest = self._locate(session, parts)
            try:
                if not rest:
                    return _attributes(root.stat())
                return _attributes(
                    in_parent(root, rest, lambda d, name: os.stat(name, dir_fd=d, follow_symlinks=False))
                )
            except OSError as exc:
                raise self._failed(session, parts, exc) from None

    def readdir(self, point: RestorePoint, parts: list[str]) -> list[str]:
        with self._session(point) as session:
            if not parts:
                return [".", "..", README, *sorted(session.mounted)]
            root, rest = self._locate(session, parts)
            try:
                if not rest:
                    return [".", "..", *(p.name for p in root.iterdir())]
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = in_parent(root, rest, lambda d, name: os.open(name, flags, dir_fd=d))
                try:
                    return [".", "..", *os.listdir(fd)]  # noqa: PTH208 (a directory fd: no pathlib form)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise self._failed(session, parts, exc) from None

    def readlink(self, point: RestorePoint, parts: list[str]) -> str:
        with self._session(point) as session:
            if not parts or parts == [README]:
                raise OSError(errno.EINVAL, "not a symlink")
            root, rest = self._locate(session, parts)
            if not rest:
                raise OSError(errno.EINVAL, "not a symlink")
            try:
                return in_parent(root, rest, lambda d, name: os.readlink(name, dir_fd=d))
            except OSError as exc:
                raise self._failed(session, parts, exc) from None

    def open(self, point: RestorePoint, parts: list[str]) -> GuestHandle:
        """Open for reading; the point stays open (not released for another) until :meth:`release`."""
        with self._session(point) as session:
            if parts == [README]:
                self.pool.acquire(point)
                return GuestHandle(point, session, README, data=self._readme(session))
            if not parts:
                raise OSError(errno.EISDIR, "a directory")
            root, rest = self._locate(session, parts)
            if not rest:
                raise OSError(errno.EISDIR, "a directory")
            try:
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = in_parent(root, rest, lambda d, name: os.open(name, flags, dir_fd=d))
            except OSError as exc:
                raise self._failed(session, parts, exc) from None
            self.pool.acquire(point)  # held by the handle: the session is already open, this is a count
            with self._lock:
                self._handles.add(fd)
            return GuestHandle(point, session, "/".join(parts), fd=fd)

    def read(self, handle: GuestHandle, size: int, offset: int) -> bytes:
        if handle.data is not None:
            return handle.data[offset : offset + size]
        assert handle.fd is not None
        pieces = []
        done = 0
        try:
            while done < size:  # a short read is EOF for FUSE: the file would silently end early
                piece = os.pread(handle.fd, size - done, offset + done)
                if not piece:
                    break
                pieces.append(piece)
                done += len(piece)
        except OSError as exc:  # the kernel read what it could before the damaged part
            raise self._failed(handle.session, handle.path.split("/"), exc) from None
        return b"".join(pieces)

    def release(self, handle: GuestHandle) -> None:
        fd, handle.fd = handle.fd, None
        if fd is not None:
            with self._lock:
                self._handles.discard(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pool.release(handle.point)

    def close(self) -> None:
        """The end of the mount: our fds closed, every session released."""
        with self._lock:
            fds, self._handles = self._handles, set()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pool.close()

    def _report(self, message: str) -> None:
        log.error("mount.read_failed", error=message)
        if self._on_error is not None:
            self._on_error(message)
