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

Object storage (:mod:`reconciler.repository.s3`) implements the same protocol: ``put`` maps to a
conditional PUT and ``put_deferred``/``flush`` to parallel plain PUTs (an object store has no torn objects).
What a directory does besides holding files (``make_dir``, ``sync_dir``, ``initialize``, the message for
a path without a repository) is part of the protocol too, so the repository code never touches a path.

Staged files are named after their writer (:func:`staged_name`: host, pid and a per-process token), so
that a later run can tell the leftovers of a killed writer from the files of a live one
(:func:`reconciler.repository.lock.stale_staged_files`). A write the volume refuses (full, over quota,
read-only, no permission) raises :class:`StorageError`, one line naming the repository, the cause and
the fix, and leaves no staged file of its own behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import secrets
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Protocol, cast

from reconciler.directio import (
    DIRECT_ALIGN,
    AlignedBuffers,
    direct_io_fits,
    pwrite_all,
    pwrite_direct,
    set_direct,
)
from reconciler.repository.errors import (
    MissingObjectError,
    NotARepositoryError,
    RepositoryError,
    StorageError,
)
from reconciler.units import human_size

Data = bytes | bytearray | memoryview
"""A bytes-like part of an object (objects are written as a sequence of parts, without joining them)."""

TMP_DIR = "tmp"
FLUSH_OBJECTS = 256
FLUSH_BYTES = 256 * 1024 * 1024

_SESSION = secrets.token_hex(4)
"""Tells this process's staged files from those of an earlier process that had the same pid."""
_STAGED_RE = re.compile(
    r"^(?P<host>[0-9a-f]{12})-(?P<pid>[0-9]{1,10})-(?P<session>[0-9a-f]{8})-[0-9a-f]{16}$"
)


def host_tag(host: str) -> str:
    """The 12 hex digits naming a host in staged file names (a hash: names stay ASCII and short)."""
    return hashlib.sha256(host.encode("utf-8", "surrogateescape")).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class StagedOwner:
    """Who wrote a staged file: the host (as :func:`host_tag`), the pid and that process's token."""

    host: str
    pid: int
    session: str

    @property
    def ours(self) -> bool:
        """Written by this very process (not by an earlier one that had the same pid)."""
        return self.pid == os.getpid() and self.session == _SESSION


def staged_name(host: str) -> str:
    """A fresh name under ``tmp/`` for a file this process stages on ``host``."""
    return f"{TMP_DIR}/{host_tag(host)}-{os.getpid()}-{_SESSION}-{secrets.token_hex(8)}"


def staged_owner(name: str) -> StagedOwner | None:
    """The writer of the staged file ``name`` (``tmp/...``), or None for a name of an older version."""
    match = _STAGED_RE.match(name.rpartition("/")[2])
    if match is None:
        return None
    return StagedOwner(match["host"], int(match["pid"]), match["session"])


_REFUSED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
"""Errors that mean the volume refuses writes (a person must act), as opposed to a bug or a glitch."""

_WHAT = {
    "chunks": "a chunk",
    "indexes": "a disk index",
    "digests": "a digest map",
    "points": "a restore point manifest",
    "locks": "a lock file",
    "keys": "a key file",
    "quarantine": "a quarantined chunk",
    "config": "the repository config",
    "gc-running.json": "the GC marker",
}


def object_kind(name: str) -> str:
    return _WHAT.get(name.partition("/")[0], name)


def _user() -> str:
    import pwd

    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """Size and modification time (POSIX seconds) of one object."""

    name: str
    size: int
    mtime: float


Uploads = list[tuple[str, str, datetime]]
"""Interrupted multipart uploads: ``(object name, upload id, started)``."""


class Backend(Protocol):
    """Storage of immutable, named objects."""

    label: str | None
    """The repository's configured name, for messages (None: the location alone names it)."""
    settle_seconds: float
    """How long a new lock object may take to show in a listing of ``locks/`` on this storage (0: at once,
    a local directory). GC waits that long under its exclusive lock and lists the locks again before it
    deletes anything (docs/repository-format.md §13.3)."""

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

    @property
    def location(self) -> str:
        """Where the objects are, for messages: a path, or ``s3://bucket/prefix at endpoint``."""
        ...

    def describe(self) -> str:
        """``repository NAME (location)``: how messages name the repository."""
        ...

    def volume_errors(self, doing: str, needed: int | None = None) -> contextlib.AbstractContextManager[None]:
        """A scope in which a refused access becomes the one-line :class:`StorageError`."""
        ...

    def make_dir(self, name: str) -> None:
        """Create the directory ``name`` if the storage has directories."""
        ...

    def sync_dir(self, name: str = "") -> None:
        """Make the names in directory ``name`` (``""``: the top) durable, where that takes a step."""
        ...

    def initialize(self, directories: Sequence[str]) -> None:
        """Prepare empty storage for a new repository (refuse if anything is there)."""
        ...

    def not_a_repository(self, init_hint: str) -> NotARepositoryError:
        """Why no repository is found here (no ``config``), and what to do; nothing is written."""
        ...

    def now(self) -> datetime:
        """The time lock files are written and judged by (§7): the storage's clock where it has one."""
        ...

    def reset_caches(self) -> None:
        """Forget what was learnt about stored objects (called whenever a lock is taken)."""
        ...

    def incomplete_uploads(self) -> Uploads:
        """Writes started and never completed that still cost storage: ``(name, upload id, started)``."""
        ...

    def abort_upload(self, name: str, upload_id: str) -> None:
        """Drop one of :meth:`incomplete_uploads`."""
        ...

    def close(self) -> None:
        """Finish background work; the backend is not used afterwards."""
        ...


def check_name(name: str) -> None:
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

    def __init__(
        self, root: str | os.PathLike[str], *, sync: str = "syncfs", label: str | None = None
    ) -> None:
        if sync not in ("syncfs", "fsync"):
            raise ValueError(f"unknown sync mode {sync!r}")
        self.root = Path(root)
        self.label = label
        """The repository's configured name, for messages (None: the path alone names it)."""
        self.settle_seconds = 0.0
        """A directory listing shows a new file at once."""
        self.host = socket.gethostname()
        self._use_syncfs = sync == "syncfs" and _SYNCFS is not None
        self._direct = self._use_syncfs and direct_io_fits(self.root)
        """Chunk files are written past the page cache (:mod:`reconciler.directio`) on a local disk
        filesystem: a full backup's 1.9 GB of chunks cost about 4 s of system CPU through it."""
        self._buffers = AlignedBuffers()
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Path, int]] = {}
        self._flushing: set[str] = set()
        self._pending_bytes = 0
        self._failed: str | None = None
        self._failed_storage: StorageError | None = None

    def __repr__(self) -> str:
        return f"LocalBackend({str(self.root)!r})"

    def describe(self) -> str:
        """``repository nas (/srv/backup/nas)`` — how messages name this repository."""
        return f"repository {self.label} ({self.root})" if self.label else f"repository {self.root}"

    # -- refused writes ------------------------------------------------------------------------------

    def refused(self, exc: OSError, doing: str, needed: int | None = None) -> StorageError | None:
        """The one-line :class:`StorageError` for a write the volume refused, or None for other errors."""
        if exc.errno not in _REFUSED:
            return None
        where = self.describe()
        size = f" of {human_size(needed)}" if needed else ""
        if exc.errno == errno.ENOSPC:
            space = ""
            with contextlib.suppress(OSError):
                st = os.statvfs(self.root)
                if st.f_files and not st.f_favail:
                    space = f" (no free inodes left of {st.f_files})"
                else:
                    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
                    space = f" ({human_size(free)} free of {human_size(total)})"
            gc = (
                f", or free unreferenced data with 'esxi-reconciler repo gc {self.label}'"
                if self.label
                else ""
            )
            return StorageError(
                f"{where}: the volume is full: no space left {doing}{size}{space}; free space on that volume"
                f"{gc}, then run again — nothing needs cleaning up by hand",
                exc.errno,
            )
        if exc.errno == errno.EDQUOT:
            return StorageError(
                f"{where}: disk quota exceeded {doing}{size}; raise the quota of user {_user()} on that"
                " volume or free space in it, then run again — nothing needs cleaning up by hand",
                exc.errno,
            )
        if exc.errno == errno.EROFS:
            return StorageError(
                f"{where}: the volume is read-only ({doing}); remount it read-write (under systemd, list the"
                " path in ReadWritePaths=), then run again",
                exc.errno,
            )
        return StorageError(
            f"{where}: permission denied {doing} as user {_user()}; give that user read and write access"
            f" to {self.root} and everything below it, then run again",
            exc.errno,
        )

    @contextlib.contextmanager
    def volume_errors(self, doing: str, needed: int | None = None) -> Iterator[None]:
        """Turn an access the volume refuses into a :class:`StorageError` (other ``OSError``s pass
        unchanged). Used around every write; reads stay plain ``OSError`` (verify reports an unreadable
        object as damage), except where a repository is opened."""
        try:
            yield
        except OSError as exc:
            refused = self.refused(exc, doing, needed)
            if refused is None:
                raise
            raise refused from exc

    # -- paths ---------------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        check_name(name)
        return self.root / name

    def _tmp_path(self) -> Path:
        return self.root / staged_name(self.host)

    def _create_tmp(self, parts: Sequence[Data], *, fsync: bool, name: str) -> tuple[Path, int]:
        """Write ``parts`` to a new staged file (``name``: the object it is for, for messages); on any
        failure the staged file is removed. A staged chunk (not ``fsync``ed here: the batch's
        ``syncfs`` is) of at least a block goes past the page cache where that is on."""
        tmp = self._tmp_path()
        needed = sum(memoryview(part).nbytes for part in parts)
        direct = self._direct and not fsync and needed >= DIRECT_ALIGN
        with self.volume_errors(f"writing {object_kind(name)}", needed):
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(tmp, flags, 0o600)
            try:
                size = self._write_direct(fd, parts) if direct else _write_all(fd, parts)
                if fsync:
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            os.close(fd)
        return tmp, size

    def _write_direct(self, fd: int, parts: Sequence[Data]) -> int:
        """The whole blocks with ``O_DIRECT``, the tail through the page cache; everything through it
        when the filesystem refuses (then for good)."""
        view = self._buffers.fill(parts)
        done = pwrite_direct(fd, view, 0) if set_direct(fd, True) else -1
        set_direct(fd, False)  # the tail, and everything after a refused direct write, go through the cache
        if done < 0:
            self._direct, done = False, 0
        if done < len(view):
            pwrite_all(fd, view[done:], done)
        return len(view)

    # -- writes --------------------------------------------------------------------------------------

    def put(self, name: str, parts: Sequence[Data]) -> bool:
        final = self._path(name)
        if final.exists():
            return False
        tmp, _ = self._create_tmp(parts, fsync=True, name=name)
        try:
            with self.volume_errors(f"writing {object_kind(name)}"):
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    return False
                except OSError as exc:
                    if exc.errno not in (
                        errno.EPERM,
                        errno.ENOTSUP,
                        errno.EOPNOTSUPP,
                        errno.EXDEV,
                        errno.EMLINK,
                    ):
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
        tmp, _ = self._create_tmp(parts, fsync=True, name=name)
        try:
            with self.volume_errors(f"writing {object_kind(name)}"):
                tmp.replace(final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(final.parent)

    def _check_not_failed(self) -> None:
        if self._failed_storage is not None:  # the same one-line message for every later write
            raise StorageError(str(self._failed_storage), self._failed_storage.errno)
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
        tmp, size = self._create_tmp(parts, fsync=not self._use_syncfs, name=name)
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
            with self.volume_errors("making staged chunks visible (rename out of tmp/)"):
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
            if isinstance(exc, StorageError):
                self._failed_storage = exc
            for tmp, _ in batch.values():  # what was not renamed is lost anyway: leave no staged file
                with contextlib.suppress(OSError):
                    tmp.unlink()
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
                refused = self.refused(
                    OSError(err, os.strerror(err)), "making staged chunks durable (syncfs)"
                )
                if refused is not None:
                    raise refused
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
        check_name(prefix)
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
        with contextlib.suppress(FileNotFoundError), self.volume_errors(f"deleting {name}"):
            self._path(name).unlink()

    # -- the directory itself ------------------------------------------------------------------------

    @property
    def location(self) -> str:
        return str(self.root)

    def make_dir(self, name: str) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)

    def sync_dir(self, name: str = "") -> None:
        fsync_dir(self.root / name if name else self.root)

    def initialize(self, directories: Sequence[str]) -> None:
        """Create the directory tree in an empty (or missing) directory, with the 256 chunk fan-out
        directories (docs/repository-format.md §2)."""
        root = self.root
        if root.exists() and any(root.iterdir()):
            raise RepositoryError(f"{root}: directory is not empty")
        root.mkdir(parents=True, exist_ok=True)
        for directory in directories:
            (root / directory).mkdir(exist_ok=True)
        for byte in range(256):
            (root / "chunks" / f"{byte:02x}").mkdir(exist_ok=True)
        fsync_dir(root / "chunks")

    def not_a_repository(self, init_hint: str) -> NotARepositoryError:
        """For a missing path or an empty directory the likely cause is a volume that is not mounted,
        and nothing must be created there."""
        root, where = self.root, self.describe()
        if not root.exists():
            cause = "the path does not exist"
        elif not root.is_dir():
            cause = "the path is not a directory"
        else:
            try:
                empty = not any(root.iterdir())
            except OSError:
                empty = False
            cause = (
                "the directory is empty" if empty else "the directory holds no repository (no config file)"
            )
        return NotARepositoryError(
            f"{where}: not a repository: {cause}; if it lives on a volume, mount it; to create a new"
            f" repository there, run {init_hint}. Nothing was written"
        )

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def reset_caches(self) -> None:
        """Nothing is cached: every existence check looks at the file system."""

    def incomplete_uploads(self) -> Uploads:
        """None: an interrupted write leaves a staged file in ``tmp/`` instead (§7.1)."""
        return []

    def abort_upload(self, name: str, upload_id: str) -> None:
        raise MissingObjectError(name)

    def close(self) -> None:
        """Nothing runs in the background."""
