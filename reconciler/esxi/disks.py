"""Disk data: reading frozen disks (HTTPS Range or ``dd`` over SSH, :mod:`.transport`), comparing and
listing them on the host (:mod:`.hostdigest`), and making, writing and deleting disks for a restore.

Reading: HTTPS ``/folder`` when the API answers (free hosts allow it), else SSH; the on-host programs
need SSH. Writing: ``vmkfstools`` and ``dd conv=notrunc`` over SSH (holes skipped: thin stays thin),
else an uploaded descriptor and one HTTPS PUT of the whole extent (holes sent as zeros).
"""

from __future__ import annotations

import logging
import posixpath
import threading
from collections.abc import Callable, Iterable, Iterator

from reconciler.esxi import vimcmd
from reconciler.esxi.connection import HostConnection
from reconciler.esxi.errors import CommandError, EsxiError
from reconciler.esxi.files import Files, dir_of, ds_join
from reconciler.esxi.hostdigest import (
    BLOCK_SIZE,
    Allocation,
    DigestResult,
    allocation_on_host,
    compare_on_host,
)
from reconciler.esxi.hostwrite import ParallelSshWriter
from reconciler.esxi.openssh import OpenSsh
from reconciler.esxi.shell import ShellConnection
from reconciler.esxi.transport import DiskReader, HttpsRangeReader, SshDdReader, SshDdWriter, vmfs_path
from reconciler.esxi.vmdk import vmfs_descriptor
from reconciler.facts.inventory import FrozenDisk, split_ds_path

log = logging.getLogger(__name__)


class Disks:
    """The disk data of one host."""

    def __init__(self, conn: HostConnection, files: Files) -> None:
        self.conn = conn
        self.files = files
        self._receiver: bool | None = None
        """Whether the host runs :mod:`.hostwrite`'s receiver (probed at the first disk write)."""
        self._bulk: OpenSsh | None = None
        self._bulk_tried = False
        self._bulk_lock = threading.Lock()

    def bulk(self) -> OpenSsh | None:
        """The ssh binary for this host's bulk streams (the digest programs, restored disks), started at
        the first use and kept until :meth:`close`; None where there is no SSH or ``ssh`` cannot log in
        there (then paramiko carries them: :mod:`.openssh`)."""
        with self._bulk_lock:
            if not self._bulk_tried and self.conn.shell is not None:
                self._bulk_tried = True
                self._bulk = OpenSsh.start(self.conn.ssh().connection())
            return self._bulk

    def close(self) -> None:
        with self._bulk_lock:
            if self._bulk is not None:
                self._bulk.close()
                self._bulk = None

    # -- reading

    def https_reader(self, streams: int = 4) -> HttpsRangeReader:
        """A pinned HTTPS ``/folder`` Range reader (works on free hosts too); raises when the API is
        unreachable. The caller closes it."""
        return self.conn.https_reader(streams)

    def disk_reader(self, transport: str = "auto", streams: int = 4) -> DiskReader:
        """A reader for frozen disk files: ``https``, ``ssh`` or ``auto`` (HTTPS when the API answers,
        else SSH). The caller closes it."""
        if transport not in ("auto", "https", "ssh"):
            raise ValueError(f"unknown transport {transport!r}")
        if transport in ("auto", "https"):
            try:
                return self.conn.https_reader(streams)
            except EsxiError as exc:
                if transport == "https" or self.conn.shell is None:
                    raise
                log.warning("host %s: API unreachable (%s); reading disks over SSH", self.conn.name, exc)
        return SshDdReader(self.conn.ssh().new_connection, streams=streams, host=self.conn.name)

    def digest_compare(
        self,
        disk: FrozenDisk,
        previous: bytes | None,
        on_block: Callable[[int, bytes], None],
        *,
        algorithm: str | None = None,
        block_size: int = BLOCK_SIZE,
        timeout: float = 600.0,
        first_block: int = 0,
        block_count: int | None = None,
    ) -> DigestResult:
        """Run :mod:`.hostdigest` on the host against the frozen disk: ``on_block(offset, data)`` gets
        every block whose digest differs from ``previous`` (None: every non-zero block), digests computed
        with ``algorithm`` (the previous map's; None: the host measures and takes its faster one). With a
        block range, only blocks ``[first_block, first_block + block_count)`` (``previous`` and the result's
        digests cover that range); each call uses its own SSH connection (an ``ssh`` process, else a
        paramiko connection), so ranges can run in parallel."""

        def compare(runner: ShellConnection | OpenSsh) -> DigestResult:
            return compare_on_host(
                runner,
                vmfs_path(disk.data_file),
                previous,
                on_block,
                algorithm=algorithm,
                block_size=block_size,
                timeout=timeout,
                first_block=first_block,
                block_count=block_count,
            )

        bulk = self.bulk()
        if bulk is not None:
            return compare(bulk)
        conn = self.conn.ssh().new_connection()
        try:
            return compare(conn)
        finally:
            conn.close()

    def allocation(
        self, disk: FrozenDisk, *, block_size: int = BLOCK_SIZE, timeout: float = 120.0
    ) -> Allocation:
        """The frozen disk file's size and data ranges (``SEEK_DATA``, block-aligned), listed on the host
        over SSH by :data:`.hostdigest.ALLOC_PROGRAM`; ``ranges`` is None when the host cannot tell."""
        conn = self.conn.ssh().new_connection()
        try:
            return allocation_on_host(conn, vmfs_path(disk.data_file), block_size=block_size, timeout=timeout)
        finally:
            conn.close()

    # -- writing (restore)

    def create_disk(
        self,
        descriptor: str,
        capacity: int,
        *,
        thin: bool = True,
        adapter: str = "lsilogic",
        hw_version: str = "14",
    ) -> str:
        """Create an empty flat disk ``[ds] dir/name.vmdk`` of exactly ``capacity`` bytes and return the
        datastore path of its raw extent (``name-flat.vmdk``). SSH: ``vmkfstools -c <KiB>k`` (thin or
        zeroedthick; a size that is no whole KiB gets a written descriptor and a sparse extent). API: the
        descriptor is uploaded; the extent is created by :meth:`write_disk`."""
        if capacity % 512:
            raise ValueError(f"disk capacity {capacity} is not a multiple of 512")
        stem = posixpath.basename(split_ds_path(descriptor)[1])
        if not stem.lower().endswith(".vmdk"):
            raise ValueError(f"not a .vmdk name: {descriptor!r}")
        flat_name = stem[:-5] + "-flat.vmdk"
        if self.conn.shell is not None and capacity % 1024 == 0:
            argv = vimcmd.vmkfstools_create(vmfs_path(descriptor), capacity, thin=thin)
            try:
                self.conn.ssh().run(argv, timeout=3600, retry=False)
            except CommandError as exc:
                why = vimcmd.vmkfstools_failure(f"{exc.stdout}\n{exc.stderr}") or str(exc)
                raise EsxiError(f"creating disk {descriptor}: {why}") from exc
            desc = self.files.read_descriptor(descriptor)
            extent = desc.flat_extent
            if extent is None or extent.file_name is None or desc.capacity != capacity:
                raise EsxiError(f"vmkfstools made {descriptor} with {desc.capacity} bytes, not {capacity}")
            return ds_join(dir_of(descriptor), extent.file_name)
        # No vmkfstools (or a size that is no whole KiB, which ``vmkfstools -c`` cannot express): the
        # descriptor is written here; over SSH the raw extent is made at its exact size at once (a sparse
        # file, thin on VMFS), through the API it is created by :meth:`write_disk`.
        text = vmfs_descriptor(flat_name, capacity, thin=thin, adapter=adapter, hw_version=hw_version)
        flat = ds_join(dir_of(descriptor), flat_name)
        if self.conn.shell is not None:
            sectors = capacity // 512
            argv = ["dd", "if=/dev/zero", f"of={vmfs_path(flat)}", "bs=512", "count=0", f"seek={sectors}"]
            self.conn.ssh().run(argv, timeout=600, retry=False)
        self.files.write_file(descriptor, text.encode("utf-8"))
        return flat

    def delete_disk(self, descriptor: str) -> None:
        """Delete a base disk: descriptor, extents and change-tracking file."""
        try:
            desc = self.files.read_descriptor(descriptor)
        except EsxiError:
            desc = None
        files = [descriptor]
        if desc is not None:
            names = [e.file_name for e in desc.extents if e.file_name]
            if desc.change_track_path:
                names.append(desc.change_track_path)
            files += [ds_join(dir_of(descriptor), n) for n in names]
        for f in files:
            self.files.delete_path(f)

    def write_disk(
        self,
        data_file: str,
        capacity: int,
        pieces: Iterable[tuple[int, bytes]],
        on_written: Callable[[int, int], None] | None = None,
        *,
        streams: int = 4,
    ) -> bool:
        """Write ``(offset, bytes)`` pieces (ascending; what is not given stays zero) into the raw extent
        made by :meth:`create_disk` and say whether the host checked what it wrote. Over SSH: the
        :mod:`.hostwrite` receiver on ``streams`` connections, hashing on the host as the data arrives
        (True; holes skipped), or ``dd`` where the host has no Python (False; holes skipped). Else one
        HTTPS PUT of the whole file (False; holes sent as zeros: ``/folder`` has no ranged PUT)."""
        try:
            return self._write_disk(data_file, capacity, pieces, on_written, streams)
        finally:
            self.conn.refresh_api()

    def checks_writes(self) -> bool:
        """Whether :meth:`write_disk` checks on the host what it writes: over SSH to a host whose Python
        runs :mod:`.hostwrite`'s receiver (probed once)."""
        if self.conn.shell is None:
            return False
        if self._receiver is None:
            self._receiver = ParallelSshWriter.available(self.conn.ssh().connection())
        return self._receiver

    def _write_disk(
        self,
        data_file: str,
        capacity: int,
        pieces: Iterable[tuple[int, bytes]],
        on_written: Callable[[int, int], None] | None,
        streams: int,
    ) -> bool:
        if self.conn.shell is not None:
            shell = self.conn.ssh()
            if self.checks_writes():
                parallel = ParallelSshWriter(shell.new_connection, streams=streams, bulk=self.bulk())
                parallel.write(vmfs_path(data_file), pieces, on_written)
                return True
            writer = SshDdWriter(shell.new_connection, host=self.conn.name)
            try:
                writer.write(vmfs_path(data_file), pieces, on_written)
            finally:
                writer.close()
            return False
        reader = self.conn.https_reader(streams=1)
        try:
            reader.put_file(data_file, with_zeros(pieces, capacity, on_written), capacity)
        finally:
            reader.close()
        return False


def with_zeros(
    pieces: Iterable[tuple[int, bytes]], capacity: int, on_written: Callable[[int, int], None] | None
) -> Iterator[bytes]:
    """The whole file as a byte stream: the pieces with zeros in between and up to ``capacity``."""
    zero = bytes(1 << 20)
    pos = 0

    def gap(end: int) -> Iterator[bytes]:
        nonlocal pos
        while pos < end:
            n = min(len(zero), end - pos)
            yield zero[:n]
            pos += n

    for off, data in pieces:
        if off < pos:
            raise ValueError(f"pieces out of order at {off}")
        yield from gap(off)
        yield data
        pos += len(data)
        if on_written is not None:
            on_written(off, len(data))
    if pos > capacity:
        raise ValueError(f"data past the end of the disk ({pos} > {capacity})")
    yield from gap(capacity)
