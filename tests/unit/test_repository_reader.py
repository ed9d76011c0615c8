"""Random access to a stored disk (``repository/reader.py``): any offset and size reads what was stored,
holes read as zeros without touching storage, the cache is bounded, sequential reads start read-ahead,
and a damaged chunk is an error naming the disk bytes it held, never garbage."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from reconciler.repository import CHUNK_SIZE, Repository
from reconciler.repository.chunks import chunk_name
from reconciler.repository.reader import ChunkReadError, DiskReader, open_disk

MiB = CHUNK_SIZE


def _disk(repo: Repository) -> tuple[str, bytes]:
    """A 10 MiB + 100 byte disk: data, a hole, data and a short last chunk."""
    capacity = 10 * MiB + 100
    content = bytearray(capacity)
    writer = repo.chunk_writer(capacity)
    for slot in range(11):
        length = min(MiB, capacity - slot * MiB)
        data = bytes(length) if slot in (3, 4) else os.urandom(length)
        content[slot * MiB : slot * MiB + length] = data
        writer.write(slot * MiB, data)
    return writer.finish(), bytes(content)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


def test_random_reads_match_content(repo: Repository) -> None:
    index_id, content = _disk(repo)
    rng = random.Random(7)
    with open_disk(repo, index_id, name="vm/disk0", cache_chunks=3, readahead=2) as reader:
        assert reader.capacity == len(content)
        for _ in range(300):
            offset = rng.randrange(len(content) + 10)
            size = rng.choice([1, 511, 4096, 131072, MiB, 3 * MiB + 7])
            assert reader.read(offset, size) == content[offset : offset + size]
        assert reader.read(len(content), 10) == b""
        assert reader.read(len(content) - 5, 100) == content[-5:]


def test_holes_never_touch_storage(repo: Repository) -> None:
    index_id, _content = _disk(repo)
    with open_disk(repo, index_id, readahead=0) as reader:
        assert reader.read(3 * MiB, 2 * MiB) == bytes(2 * MiB)
        assert reader.chunks_fetched == 0


def test_cache_is_bounded_and_reused(repo: Repository) -> None:
    index_id, _content = _disk(repo)
    with open_disk(repo, index_id, cache_chunks=2, readahead=0) as reader:
        for _ in range(8):  # the kernel reads a file 128 KiB at a time: 8 reads, one fetch
            reader.read(0, 128 * 1024)
        assert reader.chunks_fetched == 1
        for slot in (0, 1, 2, 5, 6):
            reader.read(slot * MiB, 10)
        assert len(reader._cache) <= 2
        reader.read(0, 10)  # evicted: fetched again
        assert reader.chunks_fetched == 6


def test_sequential_reads_read_ahead(repo: Repository) -> None:
    index_id, content = _disk(repo)
    with open_disk(repo, index_id, cache_chunks=16, readahead=4) as reader:
        reader.read(0, 128 * 1024)
        reader.read(128 * 1024, 128 * 1024)  # sequential: chunks 1, 2 (3, 4 are holes) in flight
        for future in list(reader._pending.values()):
            future.result()
        assert {1, 2} <= set(reader._cache)
        out = bytearray()
        for offset in range(0, len(content), 200_000):
            out += reader.read(offset, 200_000)
        assert bytes(out) == content


def test_concurrent_readers_share_fetches(repo: Repository) -> None:
    index_id, content = _disk(repo)
    reader = DiskReader(repo, repo.read_index(index_id), readahead=0)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(50):
                offset = rng.randrange(len(content))
                assert reader.read(offset, 65536) == content[offset : offset + 65536]
        except BaseException as exc:  # noqa: BLE001  a thread's failure is asserted in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.close()
    assert not errors
    assert reader.chunks_fetched <= 9 * 6


def test_damaged_chunk_is_an_error_not_garbage(repo: Repository) -> None:
    index_id, content = _disk(repo)
    index = repo.read_index(index_id)
    blob = repo.path / chunk_name(index[6])
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    blob.write_bytes(bytes(raw))
    with open_disk(repo, index_id, name="web01 / Hard disk 1", readahead=0) as reader:
        assert reader.read(5 * MiB, 100) == content[5 * MiB : 5 * MiB + 100]
        with pytest.raises(ChunkReadError) as caught:
            reader.read(6 * MiB + 10, 100)
        assert caught.value.offset == 6 * MiB
        assert "web01 / Hard disk 1" in str(caught.value)
        with pytest.raises(ChunkReadError):  # not cached as good: every read fails again
            reader.read(6 * MiB, 1)
    blob.unlink()
    gone = r"missing|not"
    with open_disk(repo, index_id, readahead=0) as reader, pytest.raises(ChunkReadError, match=gone):
        reader.read(6 * MiB, 1)
