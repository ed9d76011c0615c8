"""The backup engine's chunk assembly: patching the previous point's chunks with changed pieces."""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.operations.backup import BackupError, Cancelled
from reconciler.operations.backup.assembler import ChunkAssembler, coalesce, gaps
from reconciler.operations.backup.policy import DatastoreLimits
from reconciler.operations.progress import Progress
from reconciler.repository import CHUNK_SIZE, HOLE, DiskIndex, Repository

MiB = 1 << 20
CAPACITY = 5 * MiB + 12345  # the last chunk is short


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        yield executor


def restore(repo: Repository, index: DiskIndex) -> bytes:
    out = bytearray()
    for slot in range(index.count):
        out += repo.read_chunk(index[slot])[: index.chunk_length(slot)]
    return bytes(out)


def store(
    repo: Repository,
    pool: concurrent.futures.Executor,
    pieces: list[tuple[int, bytes]],
    base: DiskIndex | None,
) -> tuple[DiskIndex, ChunkAssembler]:
    writer = repo.chunk_writer(CAPACITY, base=base)
    asm = ChunkAssembler(repo, writer, base, pool, in_flight=2)
    for off, data in pieces:
        asm.add(off, data)
    asm.finish()
    return repo.read_index(writer.finish()), asm


def test_full_then_patched_incremental_restores_exactly(
    repo: Repository, pool: concurrent.futures.Executor
) -> None:
    rnd = random.Random(5)
    disk = bytearray(CAPACITY)
    # a full read of "allocated areas": chunk 1 never written (a hole), pieces of odd sizes
    areas = [(0, MiB), (2 * MiB + 4096, 3 * MiB - 4096 + 12345)]
    pieces = []
    for off, length in areas:
        data = rnd.randbytes(length)
        disk[off : off + length] = data
        for start in range(0, length, 3 * MiB // 2):  # pieces straddling chunk boundaries
            pieces.append((off + start, data[start : start + 3 * MiB // 2]))
    first, _ = store(repo, pool, pieces, None)
    assert first[1] == HOLE
    assert restore(repo, first) == bytes(disk)

    # small changes: 4 KiB here and there, including the short last chunk and the hole
    changes = [(4096, 4096), (MiB + 512, 512), (3 * MiB - 100, 200), (5 * MiB + 12000, 345)]
    pieces = []
    for off, length in changes:
        data = rnd.randbytes(length)
        disk[off : off + length] = data
        pieces.append((off, data))
    second, asm = store(repo, pool, pieces, first)
    assert restore(repo, second) == bytes(disk)
    assert second[4] == first[4]  # untouched chunk keeps its id
    assert asm.base_reads == 4  # chunks 0, 2, 3 (read back) and 5; chunk 1 was a hole
    assert hashlib.sha256(restore(repo, second)).digest() == hashlib.sha256(disk).digest()


def test_whole_chunks_need_no_base(repo: Repository, pool: concurrent.futures.Executor) -> None:
    data = random.Random(1).randbytes(CHUNK_SIZE)
    first, _ = store(repo, pool, [(0, data)], None)
    second, asm = store(repo, pool, [(0, bytes(reversed(data)))], first)
    assert asm.base_reads == 0 and second[0] != first[0]


def test_out_of_order_and_outside_data_are_refused(
    repo: Repository, pool: concurrent.futures.Executor
) -> None:
    writer = repo.chunk_writer(CAPACITY)
    asm = ChunkAssembler(repo, writer, None, pool)
    asm.add(2 * MiB, b"x")
    with pytest.raises(BackupError, match="after chunk"):
        asm.add(MiB, b"y")
    with pytest.raises(BackupError, match="outside"):
        asm.add(CAPACITY - 1, b"zz")
    asm.drain()


def test_cancel_stops_the_assembler(repo: Repository, pool: concurrent.futures.Executor) -> None:
    cancel = threading.Event()
    asm = ChunkAssembler(repo, repo.chunk_writer(CAPACITY), None, pool, cancel=cancel)
    asm.add(0, b"a")
    cancel.set()
    with pytest.raises(Cancelled):
        asm.add(1, b"b")


def test_coalesce_and_gaps() -> None:
    assert coalesce([(10, 5), (0, 4), (4, 2), (12, 10), (30, 0)]) == [(0, 6), (10, 12)]
    assert gaps([(2, 4), (3, 8)], 10) == [(0, 2), (8, 10)]
    assert gaps([], 3) == [(0, 3)]
    assert gaps([(0, 3)], 3) == []


def test_progress_line_and_log_events() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=True)
    disk = progress.disk("web01", "Hard disk 1", 100 * MiB)
    disk.advance(50 * MiB)
    line = progress.line()
    assert line.startswith("web01/Hard disk 1  50%") and "MiB/s" in line and "ETA" in line
    progress.report()
    assert "\r" in out.getvalue()
    disk.done()
    assert progress.line() == ""


def test_datastore_limits_serialise_vms_of_one_datastore() -> None:
    limits = DatastoreLimits(1)
    cancel = threading.Event()
    active: list[int] = []
    peak = [0]
    lock = threading.Lock()

    def job(datastores: list[str]) -> None:
        with limits.hold(datastores, cancel):
            with lock:
                active.append(1)
                peak[0] = max(peak[0], len(active))
            threading.Event().wait(0.05)
            with lock:
                active.pop()

    threads = [threading.Thread(target=job, args=(["ds1", "ds2"] if i % 2 else ["ds1"],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1
    with limits.hold(["ds1"], cancel):
        cancel.set()
        with pytest.raises(Cancelled), limits.hold(["ds1"], cancel):
            pass
