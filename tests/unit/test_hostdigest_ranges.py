"""The on-host digest program over block ranges (parallel digest streams): the ranges together give
exactly the whole-disk answer, and the engine's split is chunk-aligned and covers the disk."""

from __future__ import annotations

import itertools
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.esxi import hostdigest
from reconciler.operations.backup.disk import DIGEST_RANGE_MIN, digest_ranges

B = hostdigest.BLOCK_SIZE


def run_range(
    path: Path, previous: bytes | None, first: int, count: int | None, algorithm: str = "sha256-128"
) -> tuple[hostdigest.DigestResult, dict[int, bytes]]:
    line = hostdigest.host_command(str(path), B, first, count)
    line = line.replace("python ", shlex.quote(sys.executable) + " ", 1)
    proc = subprocess.run(
        ["sh", "-c", line],
        input=hostdigest.request(previous, algorithm),
        capture_output=True,
        check=True,
        timeout=60,
    )
    blocks: dict[int, bytes] = {}

    class Source:
        pos = 0

        def read_exact(self, size: int) -> bytes:
            data = proc.stdout[self.pos : self.pos + size]
            self.pos += size
            assert len(data) == size
            return data

    result = hostdigest.parse_stream(
        Source(),
        previous,
        blocks.__setitem__,
        algorithm=algorithm,
        block_size=B,
        first_block=first,
        block_count=count,
    )
    return result, blocks


@pytest.mark.parametrize("cuts", [[0, 37, 80, 129], [0, 16, 129], [0, 129]])
def test_ranges_concatenate_to_the_whole_disk(tmp_path: Path, cuts: list[int]) -> None:
    disk = tmp_path / "d-flat.vmdk"
    size = 128 * B + 999  # 129 blocks, the last one short
    rnd = random.Random(5)
    with disk.open("wb") as fh:
        fh.truncate(size)
        for off, length in [(0, 3 * B), (36 * B + 7, B), (79 * B, 3 * B), (size - 500, 500)]:
            fh.seek(off)
            fh.write(rnd.randbytes(length))
    data = disk.read_bytes()
    whole = hostdigest.local_digests(data, "sha256-128")
    spans = list(itertools.pairwise(cuts))
    parts = [run_range(disk, None, a, b - a) for a, b in spans]
    assert b"".join(r.digests for r, _ in parts) == whole
    sent = {off: blk for _, blocks in parts for off, blk in blocks.items()}
    assert all(sent[off] == data[off : off + len(blk)] for off, blk in sent.items())
    # incremental over ranges: change one block in the middle range, send exactly that one
    with disk.open("r+b") as fh:
        fh.seek(50 * B + 10)
        fh.write(b"x" * 10)
    changed: dict[int, bytes] = {}
    for a, b in spans:
        result, blocks = run_range(disk, whole[a * 16 : b * 16], a, b - a)
        assert result.disk_size == size
        changed.update(blocks)
    assert sorted(changed) == [50 * B]


def test_engine_split_is_chunk_aligned_and_complete() -> None:
    chunk = 1 << 20
    assert digest_ranges(DIGEST_RANGE_MIN - 1, chunk, 4) == [(0, -(-(DIGEST_RANGE_MIN - 1) // B))]
    capacity = 4 * DIGEST_RANGE_MIN + 12345
    for streams in (1, 2, 3, 4, 8):
        ranges = digest_ranges(capacity, chunk, streams)
        assert len(ranges) <= streams
        assert ranges[0][0] == 0 and all(a % (chunk // B) == 0 for a, _ in ranges)
        assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(ranges))
        assert ranges[-1][0] + ranges[-1][1] == -(-capacity // B)
