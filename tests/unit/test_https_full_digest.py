"""A free host's full backup over HTTPS Range reads with the digest map computed on the client: the map
is byte-identical to the on-host program's (so the next digest incremental works), the allocation
listing matches the program's hole handling, and an unavailable HTTPS falls back to the program."""

from __future__ import annotations

import concurrent.futures
import random
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reconciler.config.model import BackupPolicy
from reconciler.esxi import hostdigest
from reconciler.esxi.errors import ProtocolError, TransportError
from reconciler.esxi.hostdigest import BLOCK_SIZE, DigestResult
from reconciler.esxi.transport import pieces
from reconciler.facts.inventory import BackupSnapshot, FrozenDisk, SnapshotInfo, VmInfo
from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.operations.backup import BackupContext, BackupOptions, DiskResult
from reconciler.operations.backup.disk import DiskJob
from reconciler.operations.ports import DiskReader, DiskSource
from reconciler.parallel import ordered_parallel
from reconciler.repository import Repository
from tests.unit.planfixtures import load_desired, policy_doc

B = BLOCK_SIZE
MiB = 1 << 20


def sample_disk(path: Path, size: int, seed: int) -> bytes:
    """A sparse file: holes, written zero blocks, data, a block half zero, a short last block."""
    rnd = random.Random(seed)
    with path.open("wb") as fh:
        fh.truncate(size)
        for off, data in [
            (0, rnd.randbytes(3 * B)),
            (5 * B, bytes(2 * B)),  # allocated but zero
            (7 * B + 100, rnd.randbytes(10)),  # one byte range inside a block
            (20 * B, rnd.randbytes(B // 2) + bytes(B // 2)),
            (40 * B, bytes(B - 1) + b"\x01"),
            (size - 300, rnd.randbytes(300)),
        ]:
            fh.seek(off)
            fh.write(data)
    return path.read_bytes()


def host_map(path: Path, algorithm: str) -> bytes:
    """The digest map the on-host program returns for ``path`` (no previous map) in ``algorithm``."""
    line = hostdigest.host_command(str(path), B).replace("python ", shlex.quote(sys.executable) + " ", 1)
    proc = subprocess.run(
        ["sh", "-c", line],
        input=hostdigest.request(None, algorithm),
        capture_output=True,
        check=True,
        timeout=60,
    )

    class Source:
        pos = 0

        def read_exact(self, size: int) -> bytes:
            data = proc.stdout[self.pos : self.pos + size]
            self.pos += size
            assert len(data) == size
            return data

    return hostdigest.parse_stream(Source(), None, lambda o, d: None, algorithm=algorithm).digests


def host_allocation(path: Path) -> hostdigest.Allocation:
    line = hostdigest.alloc_command(str(path), B).replace("python ", shlex.quote(sys.executable) + " ", 1)
    proc = subprocess.run(
        ["sh", "-c", line],
        input=hostdigest.ALLOC_PROGRAM.encode(),
        capture_output=True,
        check=True,
        timeout=60,
    )
    return hostdigest.parse_allocation(proc.stdout.decode("ascii"))


def client_map(data: bytes, alloc: hostdigest.Allocation, piece: int = 4 * MiB) -> bytes:
    """What the engine computes: holes zero, each read piece through local_digests in the host's choice."""
    out = bytearray(-(-len(data) // B) * hostdigest.DIGEST_SIZE)
    areas = alloc.ranges if alloc.ranges is not None else [(0, len(data))]
    for off, n in pieces(areas, piece):
        entries = hostdigest.local_digests(data[off : off + n], alloc.algorithm)
        i = off // B * hostdigest.DIGEST_SIZE
        out[i : i + len(entries)] = entries
    return bytes(out)


@pytest.mark.parametrize("algorithm", list(hostdigest.ALGORITHMS))
@pytest.mark.parametrize("size", [64 * B + 300, 64 * B, 3 * MiB + 5 * B + 100])
def test_local_map_is_byte_identical_to_the_host_programs(tmp_path: Path, size: int, algorithm: str) -> None:
    disk = tmp_path / "d-flat.vmdk"
    data = sample_disk(disk, size, seed=size)
    expected = host_map(disk, algorithm)
    measured = host_allocation(disk)
    assert measured.size == size and measured.algorithm in hostdigest.ALGORITHMS  # the host's choice
    alloc = replace(measured, algorithm=algorithm)
    assert client_map(data, alloc) == expected
    assert client_map(data, alloc, piece=B) == expected  # piece size does not matter
    assert client_map(data, hostdigest.Allocation(size, None, algorithm)) == expected  # nor reading holes
    # the sample really has zero and non-zero blocks (holes and written zeros)
    entries = {expected[i : i + 16] for i in range(0, len(expected), 16)}
    assert hostdigest.ZERO_DIGEST in entries and len(entries) > 3
    assert expected[5 * 16 : 7 * 16] == bytes(32)  # written zero blocks are zero, like holes


def test_allocation_is_block_aligned_and_skips_holes(tmp_path: Path) -> None:
    disk = tmp_path / "d-flat.vmdk"
    size = 64 * B + 300
    sample_disk(disk, size, seed=1)
    alloc = host_allocation(disk)
    if alloc.ranges is None:
        pytest.skip("file system without SEEK_DATA")
    assert all(off % B == 0 and (n % B == 0 or off + n == size) for off, n in alloc.ranges)
    assert sum(n for _, n in alloc.ranges) < size  # holes were found
    assert alloc.ranges[0][0] == 0 and sum(alloc.ranges[-1]) == size


def test_parse_allocation_rejects_garbage() -> None:
    with pytest.raises(ProtocolError):
        hostdigest.parse_allocation("nope\n")
    with pytest.raises(ProtocolError):
        hostdigest.parse_allocation("ERHA 1 10 2 1\n0 5\nEND\n")
    with pytest.raises(ProtocolError, match="algorithm number 7, unknown here"):
        hostdigest.parse_allocation("ERHA 0 10 0 7\nEND\n")
    with pytest.raises(ProtocolError):
        hostdigest.parse_allocation("ERHA 0 10 0\nEND\n")  # a listing without the host's choice
    assert hostdigest.parse_allocation("ERHA 0 10 0 2\nEND\n") == hostdigest.Allocation(
        10, None, "sha256-128"
    )


# -- the engine's path ---------------------------------------------------------------------------------


CAPACITY = 3 * MiB + 5 * B + 100
DISK = FrozenDisk(
    2000, "Hard disk 1", "scsi0:0", "[ds] vm/vm.vmdk", "[ds] vm/vm-flat.vmdk", CAPACITY, None, None, ""
)


class FakeReader:
    def __init__(self, content: bytes, log: list[tuple[int, int]]) -> None:
        self.content = content
        self.log = log

    def size(self, ds_path: str) -> int:
        return len(self.content)

    def read(self, ds_path: str, extents: Iterable[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        def fetch(off: int, n: int) -> bytes:
            self.log.append((off, n))
            return self.content[off : off + n]

        return ordered_parallel(pieces(extents), fetch, 2)

    def close(self) -> None:
        pass


class FakeHost:
    """A free host with SSH (:class:`DiskSource`): the disk is the local file ``path``."""

    license = "free"
    ssh_enabled = True

    def __init__(self, path: Path, https: bool = True, choice: str = "sha256-128") -> None:
        self.path = path
        self.https = https
        self.choice = choice
        """The algorithm this host computes faster."""
        self.reads: list[tuple[int, int]] = []
        self.digest_calls = 0
        self.asked: list[str | None] = []

    def https_reader(self, streams: int) -> FakeReader:
        if not self.https:
            raise TransportError("GET /folder: HTTP 403")
        return FakeReader(self.path.read_bytes(), self.reads)

    def allocation(self, disk: FrozenDisk) -> hostdigest.Allocation:
        return replace(host_allocation(self.path), algorithm=self.choice)

    def disk_reader(self, transport: str, *, streams: int) -> DiskReader:
        raise AssertionError("with SSH a free host's disk is read over HTTPS or by the digest program")

    def changed_areas(
        self, vm: VmInfo, snapshot: SnapshotInfo, disk: FrozenDisk, change_id: str
    ) -> list[tuple[int, int]]:
        raise AssertionError("a free host has no CBT")

    def digest_compare(
        self,
        disk: FrozenDisk,
        previous: bytes | None,
        on_block: Callable[[int, bytes], None],
        *,
        algorithm: str | None = None,
        first_block: int = 0,
        block_count: int | None = None,
    ) -> DigestResult:
        """Every non-zero block of ``[first_block, first_block + block_count)`` (``previous`` ignored)."""
        self.digest_calls += 1
        self.asked.append(algorithm)
        used = algorithm or self.choice
        content = self.path.read_bytes()
        end = len(content) if block_count is None else min(len(content), (first_block + block_count) * B)
        blocks = range(first_block * B, end, B)
        digests = b"".join(hostdigest.block_digest(content[o : o + B], used) for o in blocks)
        for o in blocks:
            block = content[o : o + B]
            if block.count(0) != len(block):
                on_block(o, block)
        return DigestResult(B, len(content), digests, 0, 0, 0, True, len(content), 0, 0, used)


SNAPSHOT = BackupSnapshot(
    VmInfo("1", "vm", "u", None, "poweredOn", "[ds] vm/vm.vmx", "ds", (), (), False, "vmx-19"),
    SnapshotInfo("1", "esxi-reconciler-20261126T020000Z-ab", "", None, None, False),
    (DISK,),
)


def run_job(
    repo: Repository, host: DiskSource, previous: RestorePoint | None, pool: concurrent.futures.Executor
) -> tuple[DiskRecord, DiskResult]:
    ctx = BackupContext(
        host, repo, a_policy(repo.path.parent), "rev", BackupOptions(), pool, threading.Event()
    )
    return DiskJob(ctx, SNAPSHOT, DISK, previous).run()


def a_policy(tmp_path: Path) -> BackupPolicy:
    """A policy for the context (one disk's backup does not read it)."""
    return load_desired(tmp_path, policy_doc("p", "esxi1", None)).policy("p")


def restore(repo: Repository, record: DiskRecord) -> bytes:
    index = repo.read_index(record.index)
    return b"".join(repo.read_chunk(index[s])[: index.chunk_length(s)] for s in range(index.count))


@pytest.mark.parametrize("choice", list(hostdigest.ALGORITHMS))
@pytest.mark.parametrize("https", [True, False])
def test_free_full_reads_over_https_with_the_hosts_map(tmp_path: Path, https: bool, choice: str) -> None:
    """The full read's map is in the algorithm the host computes faster (listed with the allocation, or
    chosen by the program), byte-identical to the program's; the incremental asks for that algorithm."""
    disk = tmp_path / "d-flat.vmdk"
    data = sample_disk(disk, CAPACITY, seed=9)
    repo = Repository.init(tmp_path / "repo")
    host = FakeHost(disk, https=https, choice=choice)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        record, result = run_job(repo, host, None, pool)
        assert result.mode == "full" and record.digest_map
        assert restore(repo, record) == data
        dm = repo.read_digest_map(record.digest_map)
        assert dm.algorithm == choice and dm.digests == host_map(disk, choice)
        if https:
            assert host.digest_calls == 0 and host.reads
            if host_allocation(disk).ranges is not None:
                assert sum(n for _, n in host.reads) < CAPACITY  # holes not read
        else:
            assert host.digest_calls == 1 and not host.reads  # fell back to the digest program
            assert host.asked == [None]  # which chose
        # the next run is a digest incremental against that map
        t = datetime.now(timezone.utc)
        point = RestorePoint(
            new_point_id(), "p", VmRef("vm", "u", "h", "1"), t, t, t, "success", "full", "rev",
            disks=(record,),
        )  # fmt: skip
        host.asked.clear()
        _, second = run_job(repo, host, point, pool)
        assert second.mode == "digest" and host.asked == [choice]
