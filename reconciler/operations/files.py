"""File-level restore: the filesystems inside a restore point's disks, mounted read-only through the
kernel, to list, print and copy single files (``esxi-reconciler files``).

How, bottom up, all inside one work directory ``<state dir>/files/<session>/``:

1. ``disks/``: the point served by ``esxi-reconciler mount --only-point`` in a child process (a FUSE
   filesystem of raw disk images read on demand through :class:`~reconciler.repository.DiskReader`).
   A child, not a thread: a loop device over a FUSE file served by its own process can deadlock under
   memory pressure, and libfuse takes over the signals of the process that runs it.
2. The partition table of each image, parsed from its bytes (:mod:`reconciler.facts.partitions`).
3. ``losetup --read-only --offset --sizelimit`` per recognised filesystem, then a read-only mount of it
   at ``fs/<sda1>`` that never writes: ext2/3/4 ``ro,noload`` (the journal is not replayed), XFS
   ``ro,norecovery,nouuid``, btrfs ``ro,rescue=nologreplay``, FAT and exFAT ``ro`` (through fusefat or
   exfat-fuse when the kernel lacks the driver), NTFS through ntfs-3g ``ro``.

Every loop device and mount is released when the session ends, also on SIGTERM/SIGINT. A session
killed outright (SIGKILL, power loss) leaves its work directory and a record (``<session>.json``: pid
and start time); the next session finds records of dead processes and removes what they left —
mounts under their directory, loop devices whose backing file is theirs, the FUSE mount — before
doing anything else. Nothing is ever mounted writable.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import structlog

from reconciler.esxi.signals import deferred_signals, sigterm_raises
from reconciler.facts.lvm import (
    LvmMetadataError,
    PlacedVolume,
    PvLocation,
    VolumeGroup,
    parse_volume_group,
    place_volume,
    read_pv_label,
    volume_reader,
)
from reconciler.facts.partitions import (
    Partition,
    PartitionTableError,
    detect_filesystem,
    read_partition_table,
)
from reconciler.facts.points import DiskRecord, RestorePoint
from reconciler.operations.lvm import (
    LvmToolError,
    lvm_tools_missing,
    read_metadata,
    serve_volumes_argv,
    write_spec,
)
from reconciler.operations.mount import image_name
from reconciler.operations.restore import RestoreError, describe_source
from reconciler.units import human_size

log = structlog.get_logger(__name__)

MOUNT_TIMEOUT = 60.0
_COPY_PIECE = 1 << 20


class FilesError(RestoreError):
    """A file-level restore failed; the message names the point and the file."""


class BadPath(FilesError):
    """The path (or its filesystem) is not in the point, or is not what the action needs: bad input."""


# -- what is on the disks ------------------------------------------------------------------------


def disk_name(index: int) -> str:
    """``sda``, ``sdb`` … ``sdz``, ``sdaa``: the disks in key order, as a Linux guest names them."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return "sd" + letters


@dataclass(frozen=True)
class GuestFilesystem:
    """One filesystem of a point: ``sda1`` (partition 1 of the first disk), ``sdb`` (a whole disk) or
    ``ubuntu--vg-root`` (LVM logical volume ``root`` of volume group ``ubuntu-vg``, named as
    ``/dev/mapper`` names it; its ``partition`` is where its first piece starts, its size the volume's)."""

    name: str
    disk: DiskRecord
    partition: Partition
    kind: str | None
    """blkid's name (``ext4``, ``vfat``, ``ntfs``…); ``None`` when nothing known is there."""
    volume: PlacedVolume | None = None
    """For a logical volume: where its bytes are on the point's disks (or why they cannot be read)."""
    note: str | None = None
    """What to tell people instead of the generic reason (an LVM physical volume: what became of it)."""

    @property
    def browsable(self) -> bool:
        return self.kind in _MOUNTS and (self.volume is None or self.volume.problem is None)

    def why_not_browsable(self) -> str:
        """For people: why a partition has no tree to list."""
        if self.note is not None:
            return self.note
        if self.volume is not None and self.volume.problem is not None:
            return self.volume.problem
        if self.kind is None:
            return "no filesystem recognised"
        if self.kind == "swap":
            return "swap space"
        if self.kind == "LVM2_member":
            return (
                "LVM physical volume: not browsed (export the disk and activate its volume group with lvm2)"
            )
        return f"{self.kind}: not supported"


# fs kind → (mount -t type, options, the userspace drivers to fall back to without a kernel one, with
# their options). Two points of one VM hold the same filesystem UUID, and `mount --files` (or a `files`
# beside it) has both mounted at once: XFS refuses a second mount of a UUID without nouuid; btrfs gives a
# single-device clone a temporary fsid by itself (Linux 6.7+). FAT, exFAT and NTFS have no Unix modes:
# without masks their drivers show everything as 0777, and `cp` would restore Windows files executable
# and world-writable; with them files are 0644 and directories 0755 (fusefat takes no masks: 0700).
_NO_UNIX_MODES = "ro,fmask=0133,dmask=0022"
_MOUNTS: dict[str, tuple[str, str, tuple[tuple[str, str], ...]]] = {
    "ext4": ("ext4", "ro,noload", ()),
    "ext3": ("ext4", "ro,noload", ()),
    "ext2": ("ext4", "ro,noload", ()),
    "xfs": ("xfs", "ro,norecovery,nouuid", ()),
    "btrfs": ("btrfs", "ro,rescue=nologreplay", ()),
    "vfat": ("vfat", _NO_UNIX_MODES, (("fusefat", "ro"),)),
    "exfat": (
        "exfat",
        _NO_UNIX_MODES,
        (("mount.exfat-fuse", _NO_UNIX_MODES), ("exfat-fuse", _NO_UNIX_MODES)),
    ),
    "ntfs": ("ntfs3", _NO_UNIX_MODES, (("ntfs-3g", _NO_UNIX_MODES),)),
}
_FUSE_FIRST = {"ntfs"}
"""ntfs-3g is the NTFS driver people trust; the kernel's ntfs3 only when it is missing."""


# -- the cleanup record ----------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of /proc/pid/stat), to tell a reused pid apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]


def _mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory``, deepest first."""
    prefix = str(directory)
    found = []
    with Path("/proc/self/mounts").open(encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            target = line.split()[1].encode().decode("unicode_escape")
            if target == prefix or target.startswith(prefix + "/"):
                found.append(target)
    return sorted(set(found), key=lambda t: -t.count("/"))


def _loops_backed_under(directory: Path, recorded: list[dict[str, object]]) -> list[str]:
    """Loop devices whose backing file lies below ``directory``, and the ``recorded`` ones (device,
    image path below the FUSE mount, offset) still backed by that image: once the FUSE mount is gone
    (lazily unmounted by a dying child) the kernel shows the backing file relative to it."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            name = backing.read_text().strip().removesuffix(" (deleted)")
            device = "/dev/" + backing.parent.parent.name
            offset = (backing.parent / "offset").read_text().strip()
            if name.startswith(str(directory) + "/") or any(
                r.get("device") == device
                and name.endswith("/" + str(r.get("image")))
                and str(r.get("offset")) == offset
                for r in recorded
            ):
                found.append(device)
    return sorted(found)


def _run(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a system tool; a missing one is exit 127 with the reason, like a shell says it."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: not installed")


def _release(
    workdir: Path, child_pid: int | None = None, loops: list[dict[str, object]] | None = None
) -> list[str]:
    """Unmount and detach everything below ``workdir`` (and the recorded ``loops``), stop the FUSE
    child and remove the directory; what could not be released."""
    for target in _mounts_under(workdir / "fs"):
        if _run(["umount", target]).returncode != 0:
            _run(["umount", "-l", target])
    failed = []
    for device in _loops_backed_under(workdir, loops or []):
        result = _run(["losetup", "-d", device])  # a device still busy is detached when freed
        if result.returncode != 0:
            failed.append(f"loop device {device}: {result.stderr.strip()}")
    for target in _mounts_under(workdir):  # the FUSE mount: its child then ends by itself
        if _run(["fusermount3", "-u", "-z", target]).returncode != 0:
            _run(["umount", "-l", target])
    if child_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child_pid, signal.SIGTERM)
    left = failed + [f"mount {target}" for target in _mounts_under(workdir)]
    if not left:  # nothing mounted below any more: only our own files and directories
        for directory, subdirs, files in os.walk(workdir, topdown=False):
            for name in files:
                with contextlib.suppress(OSError):
                    (Path(directory) / name).unlink()
            for name in subdirs:
                with contextlib.suppress(OSError):
                    (Path(directory) / name).rmdir()
        with contextlib.suppress(OSError):
            workdir.rmdir()
        if workdir.exists():
            left.append(f"directory {workdir} could not be removed")
    return left


def clean_stale_sessions(root: Path) -> list[str]:
    """Release what sessions killed outright left below ``root`` (their process is gone); the work
    directories released."""
    cleaned = []
    for record_path in sorted(root.glob("*.json")):
        try:
            record = json.loads(record_path.read_text())
            pid, started = int(record["pid"]), str(record["started"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _start_time(pid) == started:
            continue  # still running
        workdir = root / record_path.stem
        child = record.get("child")
        child_pid = int(child["pid"]) if isinstance(child, dict) else None
        if child_pid is not None and _start_time(child_pid) != child.get("started"):
            child_pid = None
        helper = record.get("volumes_child")  # the LVM composing helper, when there was one
        if isinstance(helper, dict) and _start_time(int(helper["pid"])) == helper.get("started"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(helper["pid"]), signal.SIGTERM)
        loops = record.get("loops")
        left = _release(workdir, child_pid, loops if isinstance(loops, list) else [])
        if left:
            log.warning("files.stale_left", workdir=str(workdir), left=left)
            continue
        record_path.unlink(missing_ok=True)
        log.info("files.stale_cleaned", workdir=str(workdir), pid=pid)
        cleaned.append(str(workdir))
    return cleaned


# -- the session -----------------------------------------------------------------------------------


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl
"""libc's prctl, looked up here, in the parent: after a fork in a process with threads the child must
not take the loader's locks."""


def _die_with_parent() -> None:
    """The FUSE child's ``preexec_fn``: SIGTERM when the thread that started it dies, so a killed
    ``files`` or ``mount --files`` unmounts its disks; and no signal blocked (a thread libfuse started
    blocks SIGTERM, SIGINT, SIGHUP and SIGQUIT, and a child inherits its mask)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class FilesSession:
    """The filesystems of one restore point, mounted read-only below ``workdir/fs``."""

    point: RestorePoint
    workdir: Path
    filesystems: list[GuestFilesystem] = field(default_factory=list)
    mounted: dict[str, Path] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """Filesystems that could not be mounted, and why (one line each)."""
    error_file: Path = Path()
    record: dict[str, object] = field(default_factory=dict)
    record_path: Path = Path()
    child: subprocess.Popen[bytes] | None = None
    helpers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    """Processes serving composed LVM volume images; they end when their FUSE mount is released."""
    closed: bool = False

    def note_loop(self, device: str, image: str, offset: int) -> None:
        """Add a loop device to the cleanup record at once (a kill right after must not lose it)."""
        loops = self.record.setdefault("loops", [])
        assert isinstance(loops, list)
        loops.append({"device": device, "image": image, "offset": offset})
        self.record_path.write_text(json.dumps(self.record))

    def close(self) -> None:
        """Unmount, detach, stop the FUSE child, remove the work directory and the record (kept, with
        what is left, when something could not be released: the next session retries). Once."""
        if self.closed:
            return
        self.closed = True
        loops = self.record.get("loops")
        left = _release(
            self.workdir,
            self.child.pid if self.child is not None else None,
            loops if isinstance(loops, list) else [],
        )
        for process in [self.child, *self.helpers]:
            if process is None:
                continue
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if left:
            log.error("files.cleanup_incomplete", workdir=str(self.workdir), left=left)
        else:
            self.record_path.unlink(missing_ok=True)

    def describe(self) -> str:
        return f"restore point {self.point.id} of {describe_source(self.point)}"

    def read_errors(self) -> list[str]:
        """The unreadable chunks the FUSE child met, one line each."""
        try:
            return [line for line in self.error_file.read_text().splitlines() if line]
        except OSError:
            return []

    def resolve(self, guest_path: str) -> tuple[GuestFilesystem | None, Path]:
        """``sda1/etc/hosts`` → (its filesystem, the path below our mount); ``/`` → (None, fs/)."""
        parts = [p for p in guest_path.split("/") if p and p != "."]
        if ".." in parts:
            raise BadPath(f"{guest_path!r}: '..' is not allowed in a path inside the point")
        if not parts:
            return None, self.workdir / "fs"
        found = next((f for f in self.filesystems if f.name == parts[0]), None)
        if found is None:
            volume = next(
                (f for f in self.filesystems if f.volume and f.partition.name == "/".join(parts[:2])), None
            )
            if volume is not None:
                raise BadPath(
                    f"{'/'.join(parts[:2])!r}: LVM volumes are named as /dev/mapper names them:"
                    f" {'/'.join([volume.name, *parts[2:]])}"
                )
            names = ", ".join(f.name for f in self.filesystems if f.browsable) or "none"
            raise BadPath(
                f"{self.describe()} has no filesystem {parts[0]!r} (filesystems: {names});"
                " paths start with one, e.g. sda1/etc/hosts"
            )
        if found.name not in self.mounted:
            why = next((p for p in self.problems if p.startswith(found.name + ":")), "")
            if not found.browsable:
                why = found.why_not_browsable()
            raise FilesError(
                f"{found.name} ({found.kind or 'unknown'}) cannot be browsed: {why or 'not mounted'}"
            )
        return found, self.mounted[found.name].joinpath(*parts[1:])


def start_point_files(
    point: RestorePoint, state_dir: Path, serve_argv: Callable[[Path, Path], list[str]]
) -> FilesSession:
    """Mount the filesystems of ``point`` read-only; the caller closes the session. On any failure (or
    SIGTERM raised as ``SystemExit``) what was set up is released before the exception goes on.

    Any thread may call it (``mount --files`` does from its own); the FUSE child dies with the calling
    thread, so that thread must outlive the session. ``serve_argv(mountpoint, error_file)`` is the command
    that serves the point's disk images with FUSE at ``mountpoint`` (``esxi-reconciler mount
    --only-point``, with the caller's config options)."""
    if os.geteuid() != 0:
        raise FilesError("file-level restore mounts loop devices and filesystems: run it as root")
    root = state_dir.resolve() / "files"  # absolute: compared with /proc/mounts and loop backing files
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    clean_stale_sessions(root)
    session_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    workdir = root / session_id
    record_path = root / f"{session_id}.json"
    record: dict[str, object] = {"pid": os.getpid(), "started": _start_time(os.getpid()), "point": point.id}
    record_path.write_text(json.dumps(record))
    (workdir / "disks").mkdir(parents=True, mode=0o700)
    (workdir / "fs").mkdir(mode=0o700)
    session = FilesSession(
        point, workdir, error_file=workdir / "read-errors", record=record, record_path=record_path
    )
    try:
        with (workdir / "serve.log").open("wb") as serve_log:
            session.child = subprocess.Popen(
                serve_argv(workdir / "disks", session.error_file),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=serve_log,
                preexec_fn=_die_with_parent,
                start_new_session=True,  # Ctrl-C reaches us, who unmount in order, not the child
            )
        record["child"] = {"pid": session.child.pid, "started": _start_time(session.child.pid)}
        record_path.write_text(json.dumps(record))
        _wait_mounted(workdir / "disks", session.child, workdir / "serve.log")
        _mount_filesystems(session, workdir / "disks")
    except BaseException:
        with deferred_signals():
            session.close()
        raise
    return session


@contextlib.contextmanager
def open_point_files(
    point: RestorePoint,
    state_dir: Path,
    serve_argv: Callable[[Path, Path], list[str]],
) -> Iterator[FilesSession]:
    """:func:`start_point_files` for the length of a ``with``, SIGTERM included: everything is released
    afterwards, also when SIGTERM or Ctrl-C ends the command."""
    with sigterm_raises():
        session = start_point_files(point, state_dir, serve_argv)
        try:
            yield session
        finally:
            with deferred_signals():
                session.close()


def _wait_mounted(mountpoint: Path, child: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not os.path.ismount(mountpoint):
        if child.poll() is not None:
            said = log_path.read_text(errors="replace").strip().splitlines()
            raise FilesError(
                f"the disks could not be served: {said[-1] if said else f'exit {child.returncode}'}"
            )
        if time.monotonic() > deadline:
            raise FilesError(f"the disks were not served within {MOUNT_TIMEOUT:.0f} s")
        time.sleep(0.05)


def _image(disks_mount: Path, point: RestorePoint, disk: DiskRecord) -> Path:
    """The image of ``disk`` in the child's tree (``vms/<vm>/<point>/<disk>.img``)."""
    found = list(disks_mount.glob(f"vms/*/{point.id}/{image_name(disk)}"))
    if len(found) != 1:
        raise FilesError(f"restore point {point.id}: the image of {disk.label} is not served")
    return found[0]


def _pread(f: BinaryIO) -> Callable[[int, int], bytes]:
    fd = f.fileno()

    def read(offset: int, size: int) -> bytes:
        return os.pread(fd, size, offset)

    return read


def _mount_filesystems(session: FilesSession, disks_mount: Path) -> None:
    point = session.point
    images: dict[str, tuple[DiskRecord, Path]] = {}
    for index, disk in enumerate(sorted(point.disks, key=lambda d: d.key)):
        image = _image(disks_mount, point, disk)
        name = disk_name(index)
        images[name] = (disk, image)
        try:
            with image.open("rb") as f:
                read = _pread(f)
                table = read_partition_table(read, disk.capacity)
                kinds = {p.number: detect_filesystem(read, p.start, p.size) for p in table.partitions}
        except PartitionTableError as exc:
            session.problems.append(f"{name}: partition table: {exc}")
            continue
        except OSError as exc:
            raise FilesError(unreadable_message(session, f"{name} ({disk.label})", exc)) from exc
        session.problems.extend(f"{name}: {p}" for p in table.problems)
        for part in table.partitions:
            fs = GuestFilesystem(
                name + (str(part.number) if part.number else ""), disk, part, kinds[part.number]
            )
            session.filesystems.append(fs)
            if fs.browsable:
                _mount_one(session, fs, image)
    if any(fs.kind == "LVM2_member" for fs in session.filesystems):
        _mount_volumes(session, images)


@dataclass
class _PhysicalVolumes:
    """What the point's LVM physical volumes hold: where each is (by uuid), which filesystem entry it
    is, and the newest metadata of each volume group (by uuid)."""

    found: dict[str, PvLocation] = field(default_factory=dict)
    entry: dict[str, int] = field(default_factory=dict)
    groups: dict[str, VolumeGroup] = field(default_factory=dict)


def _note(session: FilesSession, index: int, text: str) -> None:
    session.filesystems[index] = dataclasses.replace(session.filesystems[index], note=text)


def _mount_volumes(session: FilesSession, images: dict[str, tuple[DiskRecord, Path]]) -> None:
    """LVM: the volume groups of the point's physical volumes, read with lvm2's ``pvck`` from a copy of
    each volume's head (nothing activated, no block device with a PV label), and each linear logical
    volume mounted like a partition: a loop device at its offset when it is one piece, over a composed
    image (served by a helper process) when it is several."""
    pv_indexes = [i for i, fs in enumerate(session.filesystems) if fs.kind == "LVM2_member"]
    missing = lvm_tools_missing()
    if missing is not None:
        for index in pv_indexes:
            _note(session, index, f"LVM physical volume: its logical volumes cannot be listed: {missing}")
        return
    pvs = _PhysicalVolumes()
    for index in pv_indexes:
        _read_physical_volume(session, index, images, pvs)
    readers: dict[str, BinaryIO] = {}

    def read_disk(disk: str, offset: int, size: int) -> bytes:
        if disk not in readers:
            readers[disk] = images[disk][1].open("rb")
        return os.pread(readers[disk].fileno(), size, offset)

    taken = {fs.name for fs in session.filesystems}
    composed: list[GuestFilesystem] = []
    try:
        for vg in sorted(pvs.groups.values(), key=lambda g: (g.name, g.uuid)):
            listed = [lv for lv in vg.logical_volumes if lv.visible]
            for pv in vg.physical_volumes:
                if pv.uuid in pvs.entry:
                    names = ", ".join(lv.name for lv in listed) or "none"
                    _note(
                        session,
                        pvs.entry[pv.uuid],
                        f"LVM physical volume of volume group {vg.name} ({names})",
                    )
            for lv in listed:
                placed = place_volume(vg, lv, pvs.found)
                if placed.name in taken:
                    problem = f"another filesystem of this point is also named {placed.name}"
                    placed = dataclasses.replace(placed, pieces=(), problem=problem)
                taken.add(placed.name)
                fs = _volume_filesystem(session, placed, images, read_disk)
                session.filesystems.append(fs)
                if fs.browsable and len(placed.pieces) == 1:
                    _mount_one(session, fs, images[placed.pieces[0].disk][1])
                elif fs.browsable:
                    composed.append(fs)
    finally:
        for f in readers.values():
            f.close()
    if composed:
        _mount_composed(session, composed, images)


def _read_physical_volume(
    session: FilesSession, index: int, images: dict[str, tuple[DiskRecord, Path]], pvs: _PhysicalVolumes
) -> None:
    """The label of the physical volume at ``session.filesystems[index]`` and its group's metadata."""
    fs = session.filesystems[index]
    disk = next(name for name, (record, _) in images.items() if record.key == fs.disk.key)
    try:
        with images[disk][1].open("rb") as f:
            read = _pread(f)
            label = read_pv_label(read, fs.partition.start)
            if label is None:
                _note(session, index, "LVM physical volume whose label cannot be read")
                return
            head = read(fs.partition.start, min(label.head_size, fs.partition.size))
        if label.uuid in pvs.found:
            other = session.filesystems[pvs.entry[label.uuid]].name
            _note(
                session,
                index,
                f"LVM physical volume {label.uuid} again (also {other}): a copied disk? not used",
            )
            return
        pvs.found[label.uuid] = PvLocation(disk, fs.partition.start, fs.partition.size)
        pvs.entry[label.uuid] = index
        lvm_dir = session.workdir / "lvm"
        lvm_dir.mkdir(mode=0o700, exist_ok=True)
        head_file = lvm_dir / f"{fs.name}.head"
        head_file.write_bytes(head)
        text = read_metadata(head_file, session.workdir)
        if text is None:
            return  # no metadata area here: another physical volume of its group holds it
        vg = parse_volume_group(text)
    except OSError as exc:
        _note(
            session,
            index,
            f"LVM physical volume: {unreadable_message(session, f'{fs.name} (its LVM metadata)', exc)}",
        )
        return
    except (LvmToolError, LvmMetadataError) as exc:
        _note(session, index, f"LVM physical volume whose metadata cannot be read: {exc}")
        return
    newest = pvs.groups.get(vg.uuid)
    if newest is None or vg.seqno > newest.seqno:
        pvs.groups[vg.uuid] = vg


def _volume_filesystem(
    session: FilesSession,
    placed: PlacedVolume,
    images: dict[str, tuple[DiskRecord, Path]],
    read_disk: Callable[[str, int, int], bytes],
) -> GuestFilesystem:
    """The entry of a logical volume: its filesystem (detected through its pieces) and where it is."""
    kind = None
    if placed.problem is None:
        try:
            kind = detect_filesystem(volume_reader(placed.pieces, read_disk), 0, placed.size)
        except OSError as exc:
            what = f"{placed.name} ({placed.vg}/{placed.lv})"
            raise FilesError(unreadable_message(session, what, exc)) from exc
    first = placed.pieces[0] if placed.pieces else None
    on = sorted({p.disk for p in placed.pieces})
    disk = (
        images[first.disk][0]
        if first
        else next(fs.disk for fs in session.filesystems if fs.kind == "LVM2_member")
    )
    where = f" on {' + '.join(on)}" if on else ""
    partition = Partition(
        0,
        first.offset if first else 0,
        placed.size,
        "",
        f"LVM logical volume{where}",
        f"{placed.vg}/{placed.lv}",
    )
    return GuestFilesystem(placed.name, disk, partition, kind, volume=placed)


def _mount_composed(
    session: FilesSession, volumes: list[GuestFilesystem], images: dict[str, tuple[DiskRecord, Path]]
) -> None:
    """Serve one image per volume of several pieces (a helper FUSE process reading the disk images),
    then mount each from offset 0 of its image."""
    mountpoint = session.workdir / "volumes"
    mountpoint.mkdir(mode=0o700)
    spec = session.workdir / "lvm" / "volumes.json"
    files = {}
    for fs in volumes:
        assert fs.volume is not None
        pieces = [(str(images[p.disk][1]), p.offset, p.length) for p in fs.volume.pieces]
        files[f"{fs.name}.img"] = (fs.volume.size, pieces)
    write_spec(spec, files)
    log_path = session.workdir / "volumes.log"
    with log_path.open("wb") as log_file:
        helper = subprocess.Popen(
            serve_volumes_argv(spec, mountpoint),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
    session.helpers.append(helper)
    session.record["volumes_child"] = {"pid": helper.pid, "started": _start_time(helper.pid)}
    session.record_path.write_text(json.dumps(session.record))
    try:
        _wait_mounted(mountpoint, helper, log_path)
    except FilesError as exc:
        session.problems.extend(f"{fs.name}: its pieces cannot be joined: {exc}" for fs in volumes)
        return
    for fs in volumes:
        at_zero = dataclasses.replace(fs, partition=dataclasses.replace(fs.partition, start=0))
        _mount_one(session, at_zero, mountpoint / f"{fs.name}.img")


def _mount_one(session: FilesSession, fs: GuestFilesystem, image: Path) -> None:
    """losetup read-only at the partition's offset, then the read-only mount of its kind."""
    assert fs.kind is not None
    target = session.workdir / "fs" / fs.name
    target.mkdir(mode=0o700)
    losetup = _run(
        [
            "losetup",
            "--read-only",
            "--find",
            "--show",
            "--offset",
            str(fs.partition.start),
            "--sizelimit",
            str(fs.partition.size),
            str(image),
        ]
    )
    if losetup.returncode != 0:
        session.problems.append(f"{fs.name}: losetup failed: {losetup.stderr.strip()}")
        return
    device = losetup.stdout.strip()
    served_by = session.workdir / (
        "volumes" if image.is_relative_to(session.workdir / "volumes") else "disks"
    )
    session.note_loop(device, str(image.relative_to(served_by)), fs.partition.start)
    kernel_type, options, fuse_drivers = _MOUNTS[fs.kind]
    attempts: list[list[str]] = [["mount", "-t", kernel_type, "-o", options, device, str(target)]]
    for driver, fuse_options in fuse_drivers:
        if shutil.which(driver):
            fuse = [driver, "-o", fuse_options, device, str(target)]
            attempts = [fuse, *attempts] if fs.kind in _FUSE_FIRST else [*attempts, fuse]
    errors = []
    for argv in attempts:
        result = _run(argv)
        if result.returncode == 0 and os.path.ismount(target):
            if not _mounted_read_only(target):
                _run(["umount", str(target)])
                errors.append(f"{argv[0]}: mounted writable, refused")
                continue
            session.mounted[fs.name] = target
            log.info("files.mounted", filesystem=fs.name, kind=fs.kind, how=argv[0])
            return
        said = (result.stderr or result.stdout).strip().splitlines()
        errors.append(f"{argv[0]}: {said[0] if said else f'exit {result.returncode}'}")
    _run(["losetup", "-d", device])
    unreadable = session.read_errors()
    cause = unreadable[-1] if unreadable else "; ".join(errors)
    session.problems.append(f"{fs.name}: {fs.kind} cannot be mounted read-only: {cause}")


def _mounted_read_only(target: Path) -> bool:
    with Path("/proc/self/mounts").open(encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if fields[1].encode().decode("unicode_escape") == str(target):
                return "ro" in fields[3].split(",")
    return False


def unreadable_message(session: FilesSession, what: str, exc: OSError) -> str:
    """The one line for a read that failed: the point, the file, and the chunk the child could not read."""
    errors = session.read_errors()
    cause = errors[-1] if errors else (exc.strerror or str(exc))
    hint = "; `esxi-reconciler verify` checks the whole repository" if exc.errno == errno.EIO else ""
    return f"{session.describe()}: {what} cannot be read: {cause}{hint}"


# -- listing, reading, copying ---------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    path: str
    """Inside the point: ``sda1/etc/hosts``."""
    kind: str
    """``file``, ``dir``, ``symlink`` or ``other``."""
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    target: str | None = None


def _entry(guest_path: str, path: Path) -> Entry:
    st = path.lstat()
    kind = (
        "dir"
        if stat.S_ISDIR(st.st_mode)
        else "symlink"
        if stat.S_ISLNK(st.st_mode)
        else "file"
        if stat.S_ISREG(st.st_mode)
        else "other"
    )
    target = str(path.readlink()) if kind == "symlink" else None
    return Entry(
        guest_path, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, target
    )


def filesystem_rows(session: FilesSession) -> list[dict[str, object]]:
    """One row per filesystem of the point, with whether it is mounted or why not (``files ls``, the
    README of ``mount --files``)."""
    rows: list[dict[str, object]] = []
    for fs in session.filesystems:
        state = (
            "mounted read-only"
            if fs.name in session.mounted
            else (f"not browsable: {fs.why_not_browsable()}" if not fs.browsable else "NOT MOUNTED")
        )
        rows.append(
            {
                "name": fs.name,
                "kind": fs.kind,
                "size": fs.partition.size,
                "type": fs.partition.type_name,
                "label": fs.partition.name,
                "disk": fs.disk.label,
                "state": state,
            }
        )
    return rows


def filesystem_line(row: dict[str, object], name_width: int = 6) -> str:
    """A row of :func:`filesystem_rows` for people: ``sda1   ext4   1.0 GiB  Linux filesystem …``."""
    size = row["size"]
    assert isinstance(size, int)
    return (
        f"{row['name']:<{name_width}} {row['kind'] or '-':<11} {human_size(size):>10}  {row['type']}"
        f"{' ' + repr(row['label']) if row['label'] else ''}  ({row['disk']}) {row['state']}"
    )


def list_entries(session: FilesSession, guest_path: str, *, recursive: bool = False) -> list[Entry]:
    """The entries of a directory (or the one file) at ``guest_path``; below it all with ``recursive``."""
    fs, path = session.resolve(guest_path)
    base = "/".join(p for p in guest_path.split("/") if p and p != ".")
    try:
        if fs is None:
            return [_entry(name, session.mounted[name]) for name in sorted(session.mounted)]
        if not path.is_dir() or path.is_symlink():
            return [_entry(base, path)]
        out = []
        for child in sorted(path.iterdir(), key=lambda p: p.name):
            rel = f"{base}/{child.name}"
            entry = _entry(rel, child)
            out.append(entry)
            if recursive and entry.kind == "dir":
                out.extend(list_entries(session, rel, recursive=True))
        return out
    except FileNotFoundError:
        raise BadPath(f"{session.describe()} has no {guest_path!r}") from None
    except OSError as exc:
        raise FilesError(unreadable_message(session, guest_path, exc)) from exc


def cat_file(session: FilesSession, guest_path: str, out: BinaryIO) -> int:
    """Write the file's bytes to ``out``; the bytes written."""
    fs, path = session.resolve(guest_path)
    if fs is None or path.is_dir():
        raise BadPath(f"{guest_path!r} is a directory; `ls` lists it, `cp` copies it")
    written = 0
    try:
        with path.open("rb") as f:
            while piece := f.read(_COPY_PIECE):
                out.write(piece)
                written += len(piece)
    except FileNotFoundError:
        raise BadPath(f"{session.describe()} has no {guest_path!r}") from None
    except OSError as exc:
        raise FilesError(unreadable_message(session, guest_path, exc)) from exc
    return written


@dataclass
class CopyResult:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    """Special files (devices, sockets, fifos) not copied."""
    copied: list[Path] = field(default_factory=list)


def copy_out(
    session: FilesSession, guest_path: str, target_dir: Path, *, on_file: Callable[[str], None] | None = None
) -> CopyResult:
    """Copy a file, symlink or directory tree into ``target_dir`` (``target_dir/<its name>``) with its
    times, mode and ownership (ownership only as root, numeric ids as in the guest). Nothing existing is
    overwritten."""
    fs, source = session.resolve(guest_path)
    if fs is None:
        raise BadPath("name a path inside a filesystem (e.g. sda1/etc); `ls` lists them")
    name = source.name if source != session.mounted[fs.name] else fs.name
    if not os.path.lexists(source):
        raise BadPath(f"{session.describe()} has no {guest_path!r}")
    target_dir.mkdir(parents=True, exist_ok=True)
    destination = target_dir / name
    if os.path.lexists(destination):
        raise FilesError(f"{destination} already exists; copy into another directory")
    result = CopyResult()
    base = "/".join(p for p in guest_path.split("/") if p and p != ".")
    _copy_tree(session, source, destination, base, result, on_file)
    return result


def _copy_tree(
    session: FilesSession,
    source: Path,
    destination: Path,
    guest_path: str,
    result: CopyResult,
    on_file: Callable[[str], None] | None,
) -> None:
    try:
        st = source.lstat()
        if stat.S_ISLNK(st.st_mode):
            destination.symlink_to(source.readlink())
            result.symlinks += 1
        elif stat.S_ISDIR(st.st_mode):
            destination.mkdir(mode=0o700)
            for child in sorted(source.iterdir(), key=lambda p: p.name):
                _copy_tree(
                    session, child, destination / child.name, f"{guest_path}/{child.name}", result, on_file
                )
            result.directories += 1
        elif stat.S_ISREG(st.st_mode):
            if on_file is not None:
                on_file(guest_path)
            with source.open("rb") as src, destination.open("xb") as dst:
                os.fchmod(dst.fileno(), 0o600)
                while piece := src.read(_COPY_PIECE):
                    dst.write(piece)
                    result.bytes += len(piece)
            result.files += 1
        else:
            result.skipped.append(guest_path)
            return
    except FileExistsError:
        raise FilesError(f"{destination} already exists; copy into another directory") from None
    except OSError as exc:
        if exc.filename is not None and str(exc.filename).startswith(str(destination)):
            raise FilesError(f"cannot write {destination}: {exc.strerror}") from exc
        raise FilesError(unreadable_message(session, guest_path, exc)) from exc
    _copy_metadata(st, destination)
    result.copied.append(destination)


def _copy_metadata(st: os.stat_result, destination: Path) -> None:
    """Ownership (as root), mode and times of the source, on the copy (a symlink itself, not its target)."""
    if os.geteuid() == 0:
        os.lchown(destination, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        destination.chmod(stat.S_IMODE(st.st_mode))
    os.utime(destination, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def serve_command(prefix: list[str]) -> Callable[[Path, Path], list[str]]:
    """The FUSE child's argv: ``prefix`` (the CLI with the caller's config options) + mount options."""

    def argv(mountpoint: Path, error_file: Path) -> list[str]:
        return [*prefix, "--error-file", str(error_file), str(mountpoint)]

    return argv


def python_cli() -> list[str]:
    """This program, run by this interpreter (also from a source tree without the launcher)."""
    return [sys.executable, "-c", "import sys; from reconciler.cli import main; sys.exit(main())"]
