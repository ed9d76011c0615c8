"""The digest-compare path of one disk without a host: a stand-in answers like the host program
(changed non-zero blocks sent, zero blocks not), including blocks that became zero since the last point;
the digest algorithm of a chain (the host's choice for a new one, the same for every parallel range,
the previous map's for an incremental)."""

from __future__ import annotations

import concurrent.futures
import random
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reconciler.config.model import BackupPolicy
from reconciler.esxi.errors import ShellError, TransportError
from reconciler.esxi.hostdigest import (
    BLOCK_SIZE,
    DEFAULT_ALGORITHM,
    DIGEST_SIZE,
    Allocation,
    DigestResult,
    block_digest,
)
from reconciler.facts.inventory import BackupSnapshot, FrozenDisk, SnapshotInfo, VmInfo
from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.operations.backup import BackupContext, BackupOptions, DiskResult
from reconciler.operations.backup import disk as disk_job
from reconciler.operations.backup.disk import DiskJob
from reconciler.operations.ports import DiskReader, DiskSource, RangeReader
from reconciler.repository import CHUNK_SIZE, Repository
from tests.unit.planfixtures import load_desired, policy_doc

MiB = 1 << 20
CAPACITY = 3 * MiB + 5 * BLOCK_SIZE + 100


class FakeHost:
    """A free host with SSH whose API is unreachable: what :class:`DiskJob` reads (:class:`DiskSource`)."""

    license = "free"
    ssh_enabled = True

    def __init__(self, content: bytes, choice: str = "sha256-128", measures: bool = True) -> None:
        self.content = content
        self.sent = 0
        self.choice = choice
        """The algorithm this host computes faster."""
        self.measures = measures
        """Whether the allocation listing (which measures) runs."""
        self.asked: list[str | None] = []
        self.allocations = 0

    def https_reader(self, streams: int) -> RangeReader:
        raise TransportError("API unreachable")  # so the full read runs the digest program

    def disk_reader(self, transport: str, *, streams: int) -> DiskReader:
        raise AssertionError("with SSH a free host's disk is read by the digest program")

    def changed_areas(
        self, vm: VmInfo, snapshot: SnapshotInfo, disk: FrozenDisk, change_id: str
    ) -> list[tuple[int, int]]:
        raise AssertionError("a free host has no CBT")

    def allocation(self, disk: FrozenDisk) -> Allocation:
        """Asked for the host's choice (the listing itself matters only to a read over HTTPS)."""
        self.allocations += 1
        if not self.measures:
            raise ShellError("SSH to esxi1: the connection was lost")
        return Allocation(len(self.content), None, self.choice)

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
        """The host program over blocks ``[first_block, first_block + block_count)``, in ``algorithm`` or
        its own choice."""
        self.asked.append(algorithm)
        used = algorithm or self.choice
        end = len(self.content) if block_count is None else (first_block + block_count) * BLOCK_SIZE
        digests = bytearray()
        changed = zero = same = 0
        for off in range(first_block * BLOCK_SIZE, min(end, len(self.content)), BLOCK_SIZE):
            block = self.content[off : off + BLOCK_SIZE]
            d = block_digest(block, used)
            i = off // BLOCK_SIZE - first_block
            prev = previous[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] if previous else None
            if block.count(0) == len(block):
                zero += 1
            elif d == prev:
                same += 1
            else:
                on_block(off, block)
                self.sent += len(block)
                changed += 1
            digests += d
        return DigestResult(
            BLOCK_SIZE, len(self.content), bytes(digests), changed, zero, same, True, 0, 0, 0, used
        )


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        yield executor


DISK = FrozenDisk(
    2000, "Hard disk 1", "scsi0:0", "[ds] vm/vm.vmdk", "[ds] vm/vm-flat.vmdk", CAPACITY, None, None, ""
)


SNAPSHOT = BackupSnapshot(
    VmInfo("1", "vm", "u", None, "poweredOn", "[ds] vm/vm.vmx", "ds", (), (), False, "vmx-19"),
    SnapshotInfo("1", "esxi-reconciler-20261126T020000Z-ab", "", None, None, False),
    (DISK,),
)


def run_job(
    repo: Repository,
    host: DiskSource,
    previous: RestorePoint | None,
    pool: concurrent.futures.Executor,
    options: BackupOptions | None = None,
) -> tuple[DiskRecord, DiskResult]:
    ctx = BackupContext(
        host, repo, a_policy(repo.path.parent), "rev", options or BackupOptions(), pool, threading.Event()
    )
    return DiskJob(ctx, SNAPSHOT, DISK, previous).run()


def a_policy(tmp_path: Path) -> BackupPolicy:
    """A policy for the context (one disk's backup does not read it)."""
    return load_desired(tmp_path, policy_doc("p", "esxi1", None)).policy("p")


def restore(repo: Repository, record: DiskRecord) -> bytes:
    index = repo.read_index(record.index)
    return b"".join(repo.read_chunk(index[s])[: index.chunk_length(s)] for s in range(index.count))


def as_previous(record: DiskRecord) -> RestorePoint:
    now = datetime.now(timezone.utc)
    return RestorePoint(
        new_point_id(), "p", VmRef("vm", "u", "h", "1"), now, now, now, "success", "full", "rev",
        disks=(record,),
    )  # fmt: skip


def test_digest_incremental_patches_changes_and_blocks_that_became_zero(
    tmp_path: Path, pool: concurrent.futures.Executor
) -> None:
    repo = Repository.init(tmp_path / "repo")
    rnd = random.Random(3)
    disk = bytearray(rnd.randbytes(CAPACITY))
    disk[MiB : 2 * MiB] = bytes(MiB)  # a hole
    host = FakeHost(bytes(disk))
    first, r1 = run_job(repo, host, None, pool)
    assert r1.mode == "full" and r1.fallback_reason == "no earlier restore point of this VM"
    assert first.mode == "full" and first.reasons == ("no earlier restore point of this VM",)
    assert first.digest_map and restore(repo, first) == bytes(disk)
    assert host.sent == CAPACITY - MiB  # zero blocks are not sent

    # the guest writes 4 KiB in two places, zeroes a block and a half (trim), and writes into the hole
    disk[10:4106] = rnd.randbytes(4096)
    disk[2 * MiB + BLOCK_SIZE : 2 * MiB + 2 * BLOCK_SIZE] = bytes(BLOCK_SIZE)
    disk[3 * MiB : 3 * MiB + BLOCK_SIZE + 300] = bytes(BLOCK_SIZE + 300)
    disk[MiB + 7 : MiB + 9] = b"xy"
    disk[-50:] = rnd.randbytes(50)
    host = FakeHost(bytes(disk))
    second, r2 = run_job(repo, host, as_previous(first), pool)
    assert r2.mode == "digest" and r2.fallback_reason is None and second.mode == "digest"
    assert restore(repo, second) == bytes(disk)
    assert host.sent == 3 * BLOCK_SIZE + 100  # blocks 0, MiB/64K, the half-zeroed one, and the short last
    assert second.digest_map != first.digest_map

    # nothing changed: nothing sent, same index
    host = FakeHost(bytes(disk))
    third, r3 = run_job(repo, host, as_previous(second), pool)
    assert host.sent == 0 and third.index == second.index and r3.bytes_stored == 0


def test_another_digest_algorithm_means_a_full_read(
    tmp_path: Path, pool: concurrent.futures.Executor
) -> None:
    from reconciler.repository import DigestMap

    repo = Repository.init(tmp_path / "repo")
    content = random.Random(4).randbytes(CAPACITY)
    first, _ = run_job(repo, FakeHost(content), None, pool)
    dm = repo.read_digest_map(first.digest_map or "")
    other = DigestMap("sha1", dm.block_size, dm.capacity, dm.digest_size, dm.digests)
    writer = repo.chunk_writer(CAPACITY, base=repo.read_index(first.index))
    index_id = writer.finish(other)
    record = DiskRecord(
        first.key, first.label, first.file, first.capacity, index_id,
        digest_map=writer.index.digest_map.hex() if writer.index.digest_map else None,
    )  # fmt: skip
    host = FakeHost(content)
    second, result = run_job(repo, host, as_previous(record), pool)
    assert result.mode == "full" and "sha1" in (result.fallback_reason or "")
    assert host.sent == CAPACITY and restore(repo, second) == content


def test_a_new_chain_takes_the_hosts_choice_and_keeps_it(
    tmp_path: Path, pool: concurrent.futures.Executor
) -> None:
    """One range: the program chooses. The incremental asks for the previous map's algorithm, even on
    a host that would now choose the other one (the maps must stay comparable)."""
    repo = Repository.init(tmp_path / "repo")
    disk = bytearray(random.Random(5).randbytes(CAPACITY))
    host = FakeHost(bytes(disk), choice="sha256-128")
    first, _ = run_job(repo, host, None, pool)
    assert host.asked == [None] and host.allocations == 0  # one range: the program itself measures
    assert repo.read_digest_map(first.digest_map or "").algorithm == "sha256-128"
    disk[BLOCK_SIZE + 5] ^= 0xFF
    host = FakeHost(bytes(disk), choice="blake2b-128")
    second, result = run_job(repo, host, as_previous(first), pool)
    assert result.mode == "digest" and host.asked == ["sha256-128"] and host.sent == BLOCK_SIZE
    assert repo.read_digest_map(second.digest_map or "").algorithm == "sha256-128"
    assert restore(repo, second) == bytes(disk)


@pytest.mark.parametrize("measures", [True, False])
def test_parallel_ranges_of_a_new_chain_use_one_algorithm(
    tmp_path: Path, pool: concurrent.futures.Executor, monkeypatch: pytest.MonkeyPatch, measures: bool
) -> None:
    """Several ranges (each its own host program): the host is asked once which algorithm it computes
    faster and every range asks for it; when it cannot say, BLAKE2b-128 (computed everywhere)."""
    monkeypatch.setattr(disk_job, "DIGEST_RANGE_MIN", MiB)
    repo = Repository.init(tmp_path / "repo")
    disk = bytearray(random.Random(6).randbytes(CAPACITY))
    host = FakeHost(bytes(disk), choice="sha256-128", measures=measures)
    options = BackupOptions(digest_streams=3)
    ranges = len(disk_job.digest_ranges(CAPACITY, CHUNK_SIZE, 3))
    assert ranges > 1
    first, _ = run_job(repo, host, None, pool, options)
    expected = "sha256-128" if measures else DEFAULT_ALGORITHM
    assert host.allocations == 1 and host.asked == [expected] * ranges
    assert repo.read_digest_map(first.digest_map or "").algorithm == expected
    assert restore(repo, first) == bytes(disk)
    disk[2 * MiB + 7] ^= 0xFF
    host = FakeHost(bytes(disk), choice="blake2b-128")
    second, result = run_job(repo, host, as_previous(first), pool, options)
    assert result.mode == "digest" and host.asked == [expected] * ranges and host.allocations == 0
    assert host.sent == BLOCK_SIZE and restore(repo, second) == bytes(disk)


def test_a_chain_can_be_started_with_a_chosen_algorithm(
    tmp_path: Path, pool: concurrent.futures.Executor
) -> None:
    repo = Repository.init(tmp_path / "repo")
    host = FakeHost(random.Random(7).randbytes(CAPACITY), choice="sha256-128")
    first, _ = run_job(repo, host, None, pool, BackupOptions(digest_algorithm="blake2b-128"))
    assert host.asked == ["blake2b-128"]
    assert repo.read_digest_map(first.digest_map or "").algorithm == "blake2b-128"
    with pytest.raises(ValueError, match="unknown digest algorithm 'sha1'"):
        BackupOptions(digest_algorithm="sha1")
