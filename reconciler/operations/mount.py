"""``esxi-reconciler mount``: a repository as a read-only FUSE filesystem, like ``restic mount``.

Layout::

    MOUNTPOINT/vms/<vm>/<point id>/<name>.vmx, <name>.nvram, <disk>.img ...
    MOUNTPOINT/vms/<vm>/latest -> <newest point id>
    MOUNTPOINT/vms/<vm>/<point id>/files/sda1/...   (``mount --files``: the guest's filesystems)

``<vm>`` is one VM *identity* (host, BIOS UUID), grouped by :func:`restore.backed_up_vms` as restore and
export choose points: the VM's name when no other backed-up VM has it, ``<name>@<host>`` when VMs of
that name were backed up on several hosts, ``<name>@<host>@<uuid>`` when one host had several. Each disk
is a raw image of its full capacity (named as ``export`` names it), read on demand through
:class:`reconciler.repository.DiskReader`: chunks decrypted, decompressed and checked, a bounded cache,
read-ahead for sequential reads, holes as zeros without touching storage. A chunk that cannot be read
is ``EIO`` for the reader and one error line naming the point and the disk, never garbage.

FUSE through mfusepy (ctypes over the system's libfuse3, synchronous callbacks on libfuse's threads,
which suits the thread-safe DiskReader; pyfuse3 needs a C build against libfuse3-dev and trio).
libfuse handles SIGINT/SIGTERM/SIGHUP: the loop ends and the filesystem is unmounted.

With ``files/`` directories (:mod:`reconciler.operations.guestfiles`), every path at or below one is
handed to a :class:`GuestTree` with the point and the path's components below ``files/``.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from reconciler.esxi.signals import deferred_signals
from reconciler.facts.points import DiskRecord, RestorePoint, StoredFile
from reconciler.operations.export import disk_stem
from reconciler.operations.restore import RestoreError, backed_up_vms, safe_file_name
from reconciler.repository import ChunkReadError, DiskReader, Repository, open_disk

log = structlog.get_logger(__name__)

OnError = Callable[[str], None]
FILES = "files"
"""The directory of a point holding its guest filesystems (``mount --files``)."""


class GuestTree(Protocol):
    """What is below each point's ``files/``: ``parts`` are the path's components below it. Errors are
    ``OSError`` with the errno the kernel gets."""

    def getattr(self, point: RestorePoint, parts: list[str]) -> dict[str, Any]: ...

    def readdir(self, point: RestorePoint, parts: list[str]) -> list[str]: ...

    def readlink(self, point: RestorePoint, parts: list[str]) -> str: ...

    def open(self, point: RestorePoint, parts: list[str]) -> Any: ...

    def read(self, handle: Any, size: int, offset: int) -> bytes: ...

    def release(self, handle: Any) -> None: ...

    def close(self) -> None: ...


def image_name(disk: DiskRecord) -> str:
    """The raw image file name of a disk (``web01.vmdk`` → ``web01.img``), as ``export`` names it."""
    return disk_stem(disk) + ".img"


def vm_directories(points: Iterable[RestorePoint]) -> dict[tuple[str, str, str], str]:
    """(name, host, uuid) → directory name, unambiguous: the name alone when one identity has it,
    ``name@host`` when several hosts have it, ``name@host@uuid`` when one host had several."""
    points = list(points)
    identities = sorted(
        {(v.name, v.host, v.uuid) for v in backed_up_vms(points)}  # restore's grouping by identity
        | {(p.vm.name, p.vm.host, p.vm.uuid) for p in points}  # and a point of another status named by id
    )
    out = {}
    for name, host, uuid in identities:
        same_name = [i for i in identities if i[0] == name]
        same_host = [i for i in same_name if i[1] == host]
        base = safe_file_name(name)
        if len(same_name) == 1:
            out[(name, host, uuid)] = base
        elif len(same_host) == 1:
            out[(name, host, uuid)] = f"{base}@{safe_file_name(host)}"
        else:
            out[(name, host, uuid)] = f"{base}@{safe_file_name(host)}@{safe_file_name(uuid or '?')}"
    return out


@dataclass
class _Node:
    """A directory (``children``), a symlink (``target``), a stored file, a disk image, or the
    ``files/`` directory of a point (``files_of``: what is below it is the :class:`GuestTree`'s)."""

    mtime_ns: int
    children: dict[str, _Node] | None = None
    target: str | None = None
    stored: StoredFile | None = None
    disk: DiskRecord | None = None
    point: RestorePoint | None = None
    size: int = 0
    files_of: RestorePoint | None = None


@dataclass
class _Handle:
    node: _Node
    data: bytes | None = None
    reader: DiskReader | None = None
    guest: Any = None
    """The :class:`GuestTree`'s handle of a guest file."""


@dataclass
class PointTree:
    """The directory tree of a set of restore points (built once, at mount time)."""

    root: _Node
    points: int = 0
    vms: dict[str, list[str]] = field(default_factory=dict)
    """VM directory → its point ids, newest last."""


def build_tree(
    points: Iterable[RestorePoint], *, successful_only: bool = True, guest_files: bool = False
) -> PointTree:
    """The tree of the successful ``points`` (of all of them with ``successful_only=False``: a point
    named by its id, as ``files --point`` names one); with ``guest_files`` a ``files/`` directory in
    each point."""
    good = sorted((p for p in points if p.status == "success" or not successful_only), key=lambda p: p.id)
    names = vm_directories(good)
    newest = max((p.snapshot_time for p in good), default=None)
    root_time = int(newest.timestamp() * 1e9) if newest is not None else 0
    vms_dir = _Node(root_time, children={})
    root = _Node(root_time, children={"vms": vms_dir})
    tree = PointTree(root)
    assert vms_dir.children is not None
    for point in good:
        directory = names[(point.vm.name, point.vm.host, point.vm.uuid)]
        when = int(point.snapshot_time.timestamp() * 1e9)
        vm_node = vms_dir.children.setdefault(directory, _Node(when, children={}))
        assert vm_node.children is not None
        vm_node.mtime_ns = max(vm_node.mtime_ns, when)
        files: dict[str, _Node] = {}
        for stored in point.files:
            if stored.name.lower().endswith((".vmx", ".nvram")):
                files[safe_file_name(stored.name)] = _Node(when, stored=stored, point=point, size=stored.size)
        for disk in sorted(point.disks, key=lambda d: d.key):
            files[image_name(disk)] = _Node(when, disk=disk, point=point, size=disk.capacity)
        if guest_files:
            files[FILES] = _Node(when, children={}, files_of=point)
        vm_node.children[point.id] = _Node(when, children=files)
        vm_node.children["latest"] = _Node(when, target=point.id)
        tree.vms.setdefault(directory, []).append(point.id)
        tree.points += 1
    return tree


class ReadOnlyPoints:
    """The FUSE operations (mfusepy's ``Operations`` protocol) over a :class:`PointTree`.

    Disk readers are opened on the first ``open`` of an image and shared by every handle of it until
    the last is released. ``on_error`` hears one line per unreadable chunk (the mount verb logs it;
    ``files`` reads it to name the point and the file). ``guest`` serves what is below ``files/``."""

    use_ns = True

    def __init__(
        self,
        repo: Repository,
        tree: PointTree,
        *,
        on_error: OnError | None = None,
        guest: GuestTree | None = None,
    ) -> None:
        self.repo = repo
        self.tree = tree
        self.on_error = on_error
        self.guest = guest
        self._uid, self._gid = os.getuid(), os.getgid()
        self._lock = threading.Lock()
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._readers: dict[tuple[str, int], tuple[DiskReader, int]] = {}

    # -- lookup --------------------------------------------------------------------------------------

    def _locate(self, path: str) -> tuple[_Node, list[str]]:
        """The node of ``path``; for a path at or below a ``files/``, that directory's node and the
        components below it (the guest's part)."""
        node = self.tree.root
        parts = path.strip("/").split("/")
        for at, part in enumerate(parts):
            if not part:
                continue
            if node.files_of is not None and self.guest is not None:
                return node, parts[at:]
            if node.children is None or part not in node.children:
                raise _fuse_error(errno.ENOENT)
            node = node.children[part]
        return node, []

    def _node(self, path: str) -> _Node:
        node, rest = self._locate(path)
        if rest:
            raise _fuse_error(errno.ENOENT)
        return node

    def _guest(self) -> GuestTree:
        assert self.guest is not None
        return self.guest

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        node, rest = self._locate(path)
        if rest and node.files_of is not None:
            return self._guest().getattr(node.files_of, rest)
        if node.children is not None:
            mode, size, nlink = stat.S_IFDIR | 0o555, 0, 2 + len(node.children)
        elif node.target is not None:
            mode, size, nlink = stat.S_IFLNK | 0o777, len(node.target), 1
        else:
            mode, size, nlink = stat.S_IFREG | 0o444, node.size, 1
        return {
            "st_mode": mode,
            "st_nlink": nlink,
            "st_size": size,
            "st_uid": self._uid,
            "st_gid": self._gid,
            "st_mtime": node.mtime_ns,
            "st_ctime": node.mtime_ns,
            "st_atime": node.mtime_ns,
            "st_blocks": (size + 511) // 512,
        }

    def readdir(self, path: str, fh: int) -> list[str]:
        node, rest = self._locate(path)
        if node.files_of is not None and self.guest is not None:
            return self.guest.readdir(node.files_of, rest)
        if node.children is None:
            raise _fuse_error(errno.ENOTDIR)
        return [".", "..", *node.children]

    def readlink(self, path: str) -> str:
        node, rest = self._locate(path)
        if rest and node.files_of is not None:
            return self._guest().readlink(node.files_of, rest)
        if node.target is None:
            raise _fuse_error(errno.EINVAL)
        return node.target

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 1 << 20, "f_frsize": 1 << 20, "f_namemax": 255}

    # -- files ---------------------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise _fuse_error(errno.EROFS)
        node, rest = self._locate(path)
        if node.children is not None and not rest:
            raise _fuse_error(errno.EISDIR)
        handle = _Handle(node)
        if rest and node.files_of is not None:
            handle.guest = self._guest().open(node.files_of, rest)
            return self._new_handle(handle)
        try:
            if node.stored is not None:
                handle.data = self.repo.read_file(node.stored)
            elif node.disk is not None and node.point is not None:
                handle.reader = self._acquire(node.point, node.disk, path)
        except Exception as exc:
            self._report(f"{path.lstrip('/')}: cannot be opened: {exc}")
            raise _fuse_error(errno.EIO) from exc
        return self._new_handle(handle)

    def _new_handle(self, handle: _Handle) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = handle
        return fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            raise _fuse_error(errno.EBADF)
        if handle.guest is not None:
            return self._guest().read(handle.guest, size, offset)
        if handle.data is not None:
            return handle.data[offset : offset + size]
        if handle.reader is None:
            return b""
        try:
            return handle.reader.read(offset, size)
        except ChunkReadError as exc:  # it names the point, the disk and the bytes
            self._report(str(exc))
            raise _fuse_error(errno.EIO) from exc
        except Exception as exc:
            self._report(f"{path.lstrip('/')}: {exc}")
            raise _fuse_error(errno.EIO) from exc

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is not None and handle.guest is not None:
            self._guest().release(handle.guest)
        if handle is not None and handle.reader is not None and handle.node.point and handle.node.disk:
            self._drop(handle.node.point, handle.node.disk)
        return 0

    def destroy(self, path: str) -> None:
        """Unmounting: close every reader (their read-ahead threads)."""
        with self._lock:
            readers = [r for r, _ in self._readers.values()]
            self._readers.clear()
        for reader in readers:
            reader.close()

    def close(self) -> None:
        """After the FUSE loop: the readers, and everything the guest tree holds (mounts, loop devices,
        FUSE children), released."""
        self.destroy("/")
        if self.guest is not None:
            self.guest.close()

    def _acquire(self, point: RestorePoint, disk: DiskRecord, path: str) -> DiskReader:
        key = (point.id, disk.key)
        with self._lock:
            found = self._readers.get(key)
            if found is not None:
                self._readers[key] = (found[0], found[1] + 1)
                return found[0]
        reader = open_disk(self.repo, disk.index, name=f"restore point {point.id}, {disk.label}")
        with self._lock:
            found = self._readers.get(key)
            if found is not None:  # another thread opened it meanwhile
                self._readers[key] = (found[0], found[1] + 1)
                extra: DiskReader | None = reader
                reader = found[0]
            else:
                self._readers[key] = (reader, 1)
                extra = None
        if extra is not None:
            extra.close()
        return reader

    def _drop(self, point: RestorePoint, disk: DiskRecord) -> None:
        key = (point.id, disk.key)
        with self._lock:
            found = self._readers.get(key)
            if found is None:
                return
            if found[1] > 1:
                self._readers[key] = (found[0], found[1] - 1)
                return
            del self._readers[key]
        found[0].close()

    def _report(self, message: str) -> None:
        log.error("mount.read_failed", error=message)
        if self.on_error is not None:
            self.on_error(message)


def _fuse_error(code: int) -> Exception:
    import mfusepy

    error: Exception = mfusepy.FuseOSError(code)
    return error


def check_mountpoint(mountpoint: Path) -> None:
    """Refuse what cannot be mounted on: a missing path, a file, a non-empty directory."""
    if not mountpoint.exists():
        raise RestoreError(f"mount point {mountpoint} does not exist; create an empty directory first")
    if not mountpoint.is_dir():
        raise RestoreError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise RestoreError(f"{mountpoint} is already a mount point; unmount it or choose another directory")
    if any(mountpoint.iterdir()):
        raise RestoreError(f"mount point {mountpoint} is not empty; mount on an empty directory")


def serve(
    repo: Repository,
    tree: PointTree,
    mountpoint: Path,
    *,
    on_error: OnError | None = None,
    allow_other: bool = False,
    guest: GuestTree | None = None,
) -> None:
    """Mount ``tree`` read-only at ``mountpoint`` and serve it until unmounted (``fusermount3 -u``,
    ``umount``) or SIGINT/SIGTERM/SIGHUP, which libfuse turns into a clean unmount. With ``guest``
    (the ``files/`` directories) the guests' device files and set-id bits have no effect (``nodev``,
    ``nosuid``) and the kernel checks the guests' modes (``default_permissions``, for
    ``allow_other``); what it holds is released when the loop ends, a second signal held meanwhile."""
    try:
        import mfusepy
    except (ImportError, OSError) as exc:  # mfusepy loads libfuse when imported
        raise RestoreError(f"FUSE is not available ({exc}); install the fuse3 package") from exc

    check_mountpoint(mountpoint)
    operations = ReadOnlyPoints(repo, tree, on_error=on_error, guest=guest)
    options: dict[str, Any] = {"foreground": True, "ro": True, "fsname": "esxi-reconciler"}
    if allow_other:
        options["allow_other"] = True
    if guest is not None:
        options.update(nodev=True, nosuid=True, default_permissions=True)
    try:
        mfusepy.FUSE(operations, str(mountpoint), **options)
    except RuntimeError as exc:
        raise RestoreError(
            f"cannot mount {mountpoint}: {exc} (is /dev/fuse there and fuse3 installed?)"
        ) from exc
    finally:
        with deferred_signals():
            operations.close()
