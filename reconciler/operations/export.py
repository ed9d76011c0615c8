"""Exporting a restore point as local files, importable without any ESXi: the ``.vmx`` (+ ``.nvram``)
and each disk as a sparse raw image (``raw``: holes stay file holes) or a ``monolithicFlat`` VMDK
(``vmdk``: descriptor + sparse ``-flat`` file; qemu-img, VirtualBox, Workstation and ``vmkfstools -i``
read it), or a ``stream-optimized`` VMDK (one compressed file, what OVF/OVA packages carry; see
:mod:`.vmdkstream`). The .vmx of a VMDK export names the exported disks.

Raw and flat images are written by positioned writes on the decoding threads (holes never written, so
the output stays sparse) while the SHA-256 of the disk is computed from the very pieces written, every
``pwrite`` checked complete; no second read of the file. The writes bypass the page cache
(``O_DIRECT``, :class:`ImageWriter`) where the filesystem allows it, and the image is on disk
(``fdatasync``) before the export reports it. A stream-optimized file is read back through
its grain directory and its SHA-256 compared with the point's content (that checks our encoder).
"""

from __future__ import annotations

import errno
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import structlog

from reconciler.directio import AlignedBuffers, aligned_head, direct_io_fits, pwrite_all, pwrite_direct
from reconciler.esxi.vmdk import SECTOR, Descriptor, Extent, flat_descriptor
from reconciler.facts.inventory import split_ds_path
from reconciler.facts.points import DiskRecord, RestorePoint
from reconciler.operations import vmdkstream
from reconciler.operations.restore import (
    ContentHash,
    RestoreError,
    disk_nodes,
    disk_pieces,
    hashed,
    point_file,
    point_vmx,
    safe_file_name,
)
from reconciler.repository import Repository

log = structlog.get_logger(__name__)

FORMATS = ("raw", "vmdk", "stream-optimized")


@dataclass(frozen=True)
class ExportedDisk:
    label: str
    path: Path
    """The raw image, or the VMDK descriptor."""
    data: Path
    """The file holding the bytes (the raw image or the ``-flat`` file)."""
    sha256: str


@dataclass
class ExportResult:
    point_id: str
    directory: Path
    files: list[Path] = field(default_factory=list)
    disks: list[ExportedDisk] = field(default_factory=list)


class ImageWriter:
    """Positioned writes of a disk image, from any thread, past the page cache where it can
    (:mod:`reconciler.directio`): each piece is copied into the thread's page-aligned buffer and its
    aligned part written with ``O_DIRECT``; the rest (the short last chunk of a disk, an odd offset) and
    every write on a filesystem that refuses it go through the ordinary descriptor ``fd``. :meth:`sync`
    makes all of it durable."""

    def __init__(self, path: Path, fd: int, *, direct: bool | None = None) -> None:
        """``direct``: None to bypass the page cache where ``path`` is on a local disk filesystem
        (:func:`~reconciler.directio.direct_io_fits`); True or False to decide."""
        self._fd = fd
        self._buffers = AlignedBuffers()
        self._direct_fd: int | None = None
        self._refused = False
        """Set by the first refused direct write; the descriptor stays open until :meth:`close`, since
        other threads may be writing through it (closing it there could let its number be reused)."""
        if direct is None:
            direct = direct_io_fits(path)
        if direct:
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise

    @property
    def direct(self) -> bool:
        """Whether writes still bypass the page cache."""
        return self._direct_fd is not None and not self._refused

    def write(self, offset: int, data: bytes) -> None:
        """Write all of ``data`` at ``offset``."""
        done = 0
        if self.direct and aligned_head(offset, len(data)):
            assert self._direct_fd is not None
            done = pwrite_direct(self._direct_fd, self._buffers.fill([data]), offset)
            if done < 0:  # refused after opening (some FUSE and network filesystems)
                self._refused, done = True, 0
        if done < len(data):
            pwrite_all(self._fd, memoryview(data)[done:], offset + done)

    def sync(self) -> None:
        """Everything written is on disk: the direct writes' allocations and the buffered pieces."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        """After the writing threads are done."""
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None


def _write_image(repo: Repository, disk: DiskRecord, path: Path, mode: int) -> str:
    """Write the disk into a new sparse file at ``path`` and return the SHA-256 of what was written
    (holes as zeros). Chunks are decoded and written (:class:`ImageWriter`, every byte checked written)
    on the worker threads of :func:`disk_pieces`, in any order, while this thread hashes them in disk
    order; holes are never written, so they stay file holes. No second read of the file: what was
    written is what was hashed. The file is created with exactly ``mode`` and is on disk on return."""
    digest = ContentHash()
    with _open_new(path, mode) as f:
        f.truncate(disk.capacity)
        writer = ImageWriter(path, f.fileno())
        try:
            for off, data in disk_pieces(repo, disk, sink=lambda o, d: writer.write(o, d)):
                digest.update(off, data)
            writer.sync()
        finally:
            writer.close()
    return digest.hexdigest(disk.capacity)


def _stream_sha256(path: Path) -> str:
    """SHA-256 of the disk inside a stream-optimized VMDK, read back through its grain directory."""
    digest = ContentHash()
    with path.open("rb") as f:
        _, capacity, grains = vmdkstream.read(f)
        for off, data in grains:
            digest.update(off, data)
    return digest.hexdigest(capacity)


def _descriptor(
    repo: Repository, point: RestorePoint, disk: DiskRecord, file_name: str, create_type: str
) -> Descriptor:
    """A descriptor for an exported disk, keeping the original's adapter type, hardware version and
    disk UUID (guests may identify disks by it)."""
    desc = flat_descriptor(file_name, disk.capacity, create_type=create_type)
    if create_type == "streamOptimized":
        desc.extents[0] = Extent("RW", disk.capacity // SECTOR, "SPARSE", file_name, 0)
    stored = point_file(point, posixpath.basename(split_ds_path(disk.file)[1]))
    if stored is not None:
        original = Descriptor.parse(repo.read_file(stored).decode("utf-8", "surrogateescape"))
        for key in ("ddb.adapterType", "ddb.virtualHWVersion", "ddb.uuid"):
            if key in original.ddb:
                desc.ddb[key] = original.ddb[key]
    return desc


FILE_MODE = 0o600
"""Exported files are the VM's disks: readable by their owner only, unless asked otherwise."""


def directory_mode(file_mode: int) -> int:
    """The mode of a directory holding files of ``file_mode``: who may read may also enter
    (``600`` → ``700``, ``640`` → ``750``, ``644`` → ``755``)."""
    return file_mode | ((file_mode & 0o444) >> 2)


def make_directories(directory: Path, mode: int) -> list[Path]:
    """Create ``directory`` and its missing parents with exactly ``mode`` (whatever the umask);
    existing ones are left as they are. Returns those created, outermost first."""
    missing = []
    path = directory
    while not path.exists():
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        path.mkdir()
        path.chmod(mode)
    return list(reversed(missing))


def disk_stem(disk: DiskRecord) -> str:
    """A disk's file name without ``.vmdk`` (``web01_1``): what export and the mount name its image."""
    stem = safe_file_name(posixpath.basename(split_ds_path(disk.file)[1]))
    return stem[:-5] if stem.lower().endswith(".vmdk") else stem


def export_point(
    repo: Repository, point: RestorePoint, directory: Path, fmt: str = "raw", *, mode: int = FILE_MODE
) -> ExportResult:
    """Write the point into ``directory`` (existing files are never overwritten): each file created
    with exactly ``mode``, missing directories with :func:`directory_mode` of it."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    make_directories(directory, directory_mode(mode))
    result = ExportResult(point.id, directory)
    _, vmx = point_vmx(repo, point)
    nodes = disk_nodes(vmx, point)
    for disk in sorted(point.disks, key=lambda d: d.key):
        stem = disk_stem(disk)
        data_path = directory / (f"{stem}.img" if fmt == "raw" else f"{stem}-flat.vmdk")
        main = data_path if fmt == "raw" else directory / f"{stem}.vmdk"
        if fmt == "stream-optimized":
            data_path = main
        for p in {main, data_path}:
            if p.exists():
                raise RestoreError(f"{p} already exists; export into an empty directory")
        if fmt == "stream-optimized":
            digest = ContentHash()
            desc = _descriptor(repo, point, disk, main.name, "streamOptimized")
            with _open_new(main, mode) as f:
                vmdkstream.write(f, disk.capacity, hashed(disk_pieces(repo, disk), digest), desc)
            expected = digest.hexdigest(disk.capacity)
            actual = _stream_sha256(main)
            if actual != expected:
                raise RestoreError(
                    f"{data_path}: SHA-256 {actual} differs from the restore point's {expected}"
                )
        else:
            expected = _write_image(repo, disk, data_path, mode)
        if fmt == "vmdk":
            desc = _descriptor(repo, point, disk, data_path.name, "monolithicFlat")
            _create(main, desc.dumps().encode("utf-8"), mode)
            Descriptor.parse(main.read_text(encoding="utf-8"))  # what we wrote must parse
        if fmt != "raw":
            vmx.set(f"{nodes[disk.key]}.fileName", main.name)
            if main != data_path:
                result.files.append(main)
        result.files.append(data_path)
        result.disks.append(ExportedDisk(disk.label, main, data_path, expected))
        log.info("export.disk", disk=disk.label, path=str(main), sha256=expected)
    for stored in point.files:
        if stored.name.lower().endswith(".nvram"):
            result.files.append(
                _create(directory / safe_file_name(stored.name), repo.read_file(stored), mode)
            )
    vmx_file = next(f for f in point.files if f.name.lower().endswith(".vmx"))
    # raw images are not disks a .vmx can name: the backed-up .vmx as it was
    text = vmx.dumps().encode("utf-8", "surrogateescape") if fmt != "raw" else repo.read_file(vmx_file)
    result.files.append(_create(directory / safe_file_name(vmx_file.name), text, mode))
    return result


def _open_new(path: Path, mode: int) -> BinaryIO:
    """A new file with exactly ``mode`` (not the umask's), never one that exists."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise RestoreError(f"{path} already exists; export into an empty directory") from None
    os.fchmod(fd, mode)
    return os.fdopen(fd, "w+b")


def _create(path: Path, data: bytes, mode: int) -> Path:
    with _open_new(path, mode) as f:
        f.write(data)
    return path
