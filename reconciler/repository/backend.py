"""Where repository objects live: a :class:`Backend` protocol and the local-directory implementation.

Objects are named by relative POSIX paths (``chunks/3f/3f9a…``, ``points/2026…``). Every write is
atomic: the content goes to ``tmp/`` first and is renamed (or hard-linked) into place, so a reader sees
either no object or the whole object. Two kinds of write exist (see docs/repository-format.md §3.7):

* :meth:`Backend.put` — durable when it returns (file ``fsync``, rename, directory ``fsync``); used for
  indexes, digest maps, manifests, key files and locks. It never overwrites (put-if-absent).
* :meth:`Backend.put_deferred` — staged in ``tmp/`` without ``fsync``; visible and durable only after
  :meth:`Backend.flush`, which makes a whole batch durable with one ``syncfs`` before renaming. Used for
  chunks, whose names are content hashes (so an overwrite would be harmless, and a visible name always
  has durable content).

Object storage backends (later) implement the same protocol: ``put`` maps to a conditional PUT and
``put_deferred``/``flush`` to plain PUTs (an object store has no torn objects).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol, cast

from reconciler.repository.errors import MissingObjectError, RepositoryError

Data = bytes | bytearray | memoryview
"""A bytes-like part of an object (objects are written as a sequence of parts, without joining them)."""

TMP_DIR = "tmp"
FLUSH_OBJECTS = 256
FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """Size and modification time (POSIX seconds) of one object."""

    name: str
    size: int
    mtime: float


class Backend(Protocol):
    """Storage of immutable, named objects."""

    def put(self, name: str, parts: Sequence[Data]) -> bool:
        """Store atomically and durably unless ``name`` exists; False if it existed (nothing written)."""
        ...

    def put_deferred(self, name: str, parts: Sequence[Data]) -> bool:
        """Stage an object, visible after :meth:`flush`; False if it exists or is already staged."""
        ...

    def flush(self) -> None:
        """Make every staged object durable, then visible, then the names durable."""
        ...

    def discard_pending(self) -> None:
        """Drop staged objects that were not flushed (after a failed backup)."""
        ...

    def replace(self, name: str, parts: Sequence[Data]) -> None:
        """Atomically create or overwrite ``name`` (lock refresh only), durably."""
        ...

    def get(self, name: str) -> bytes:
        """The object's content; :class:`MissingObjectError` if absent."""
        ...

    def exists(self, name: str) -> bool:
        """Whether the object exists or is staged."""
        ...

    def list(self, prefix: str) -> Iterator[str]:
        """Names of all objects under the directory ``prefix`` (recursively), unsorted."""
        ...

    def stat(self, name: str) -> ObjectInfo:
        """Size and mtime; :class:`MissingObjectError` if absent."""
        ...

    def delete(self, name: str) -> None:
        """Remove an object; absent objects are ignored."""
        ...


def _check_name(name: str) -> None:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"invalid object name {name!r}")


def _write_all(fd: int, parts: Sequence[Data]) -> int:
    total = 0
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            written = os.write(fd, view)
            view = view[written:]
            total += written
    return total


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs(2)`` (Linux), or None. ctypes releases the GIL during the call."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        func = libc.syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int
    return cast("Callable[[int], int]", func)


_SYNCFS = _load_syncfs()


class LocalBackend:
    """Objects as files below a directory, ``tmp/`` + ``fsync`` + rename, batched syncs for chunks.

    ``sync`` chooses how a batch of staged objects is made durable: ``"syncfs"`` (one ``syncfs(2)`` on the
    repository file system; falls back to ``"fsync"`` where unavailable) or ``"fsync"`` (each file and
    each touched directory). Thread-safe.
    """

    def __init__(self, root: str | os.PathLike[str], *, sync: str = "syncfs") -> None:
        if sync not in ("syncfs", "fsync"):
            raise ValueError(f"unknown sync mode {sync!r}")
        self.root = Path(root)
        self._use_syncfs = sync == "syncfs" and _SYNCFS is not None
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Path, int]] = {}
        self._flushing: set[str] = set()
        self._pending_bytes = 0
        self._failed: str | None = None

    def __repr__(self) -> str:
        return f"LocalBackend({str(self.root)!r})"

    # -- paths ---------------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        _check_name(name)
        return self.root / name

    def _tmp_path(self) -> Path:
        return self.root / TMP_DIR / secrets.token_hex(16)

    def _create_tmp(self, parts: Sequence[Data], *, fsync: bool) -> tuple[Path, int]:
        tmp = self._tmp_path()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            size = _write_all(fd, parts)
            if fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        return tmp, size

    # -- writes --------------------------------------------------------------------------------------

    def put(self, name: str, parts: Sequence[Data]) -> bool:
        final = self._path(name)
        if final.exists():
            return False
        tmp, _ = self._create_tmp(parts, fsync=True)
        try:
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                # File systems without hard links (some SMB mounts): best-effort if-absent.
                if final.exists():
                    return False
                tmp.replace(final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        fsync_dir(final.parent)
        return True

    def replace(self, name: str, parts: Sequence[Data]) -> None:
        final = self._path(name)
        tmp, _ = self._create_tmp(parts, fsync=True)
        try:
            tmp.replace(final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(final.parent)

    def _check_not_failed(self) -> None:
        if self._failed is not None:
            raise RepositoryError(
                f"{self.root}: an earlier batch of chunks could not be made durable ({self._failed});"
                " objects may be lost, so this backend refuses further writes — reopen the repository"
            )

    def put_deferred(self, name: str, parts: Sequence[Data]) -> bool:
        final = self._path(name)
        self._check_not_failed()
        with self._lock:
            if name in self._pending or name in self._flushing:
                return False
        if final.exists():
            return False
        tmp, size = self._create_tmp(parts, fsync=not self._use_syncfs)
        with self._lock:
            if name in self._pending or name in self._flushing:
                duplicate = True
            else:
                duplicate = False
                self._pending[name] = (tmp, size)
                self._pending_bytes += size
            full = len(self._pending) >= FLUSH_OBJECTS or self._pending_bytes >= FLUSH_BYTES
        if duplicate:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        if full:
            self.flush()
        return True

    def flush(self) -> None:
        """See :meth:`Backend.flush`.

        If a batch fails (``syncfs``/``fsync`` error, disk full on rename, ...), the backend is poisoned:
        this and every later ``flush``/``put_deferred`` raise. Other threads may have recorded chunk ids from
        the failed batch in their indexes, and after a write-back error the data cannot be trusted even if
        a retry reports success, so no index or manifest may be written through this backend any more.
        """
        self._check_not_failed()
        with self._lock:
            batch = self._pending
            self._pending = {}
            self._pending_bytes = 0
            self._flushing.update(batch)
        if not batch:
            return
        try:
            # 1. content durable (with "fsync" mode each file was fsynced when written)
            if self._use_syncfs:
                self._syncfs()
            # 2. names visible
            dirs: set[Path] = set()
            for name, (tmp, _) in batch.items():
                final = self._path(name)
                try:
                    tmp.replace(final)
                except FileNotFoundError:
                    if tmp.exists():  # the parent directory is missing
                        final.parent.mkdir(parents=True, exist_ok=True)
                        tmp.replace(final)
                    else:
                        raise
                dirs.add(final.parent)
            # 3. names durable
            if self._use_syncfs:
                self._syncfs()
            else:
                for directory in dirs:
                    fsync_dir(directory)
        except BaseException as exc:
            self._failed = f"{exc.__class__.__name__}: {exc}"
            raise
        finally:
            with self._lock:
                self._flushing.difference_update(batch)

    def _syncfs(self) -> None:
        assert _SYNCFS is not None
        fd = os.open(self.root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            if _SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise RepositoryError(f"syncfs on {self.root} failed: {os.strerror(err)}")
        finally:
            os.close(fd)

    def discard_pending(self) -> None:
        """Drop staged objects (their ``tmp/`` files are removed); used after a failed backup."""
        with self._lock:
            batch = self._pending
            self._pending = {}
            self._pending_bytes = 0
        for tmp, _ in batch.values():
            with contextlib.suppress(OSError):
                tmp.unlink()

    # -- reads ---------------------------------------------------------------------------------------

    def get(self, name: str) -> bytes:
        try:
            with self._path(name).open("rb", buffering=0) as f:
                return f.readall()
        except FileNotFoundError:
            raise MissingObjectError(name) from None

    def exists(self, name: str) -> bool:
        with self._lock:
            if name in self._pending or name in self._flushing:
                return True
        return self._path(name).exists()

    def list(self, prefix: str) -> Iterator[str]:
        _check_name(prefix)
        yield from self._walk(self.root / prefix, prefix)

    def _walk(self, directory: Path, prefix: str) -> Iterator[str]:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), f"{prefix}/{entry.name}")
            elif entry.is_file(follow_symlinks=False):
                yield f"{prefix}/{entry.name}"

    def stat(self, name: str) -> ObjectInfo:
        try:
            st = self._path(name).stat()
        except FileNotFoundError:
            raise MissingObjectError(name) from None
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()
