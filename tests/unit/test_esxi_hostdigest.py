"""The on-host digest program: Python 3.8 syntax, and its protocol run locally against sparse files."""

from __future__ import annotations

import ast
import hashlib
import io
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.esxi import hostdigest
from reconciler.esxi.errors import FullBackupNeededError, ProtocolError

B = hostdigest.BLOCK_SIZE


def test_host_program_is_python_38_syntax() -> None:
    ast.parse(hostdigest.HOST_PROGRAM, feature_version=(3, 8))
    for banned in ("removeprefix", "removesuffix", " match ", "case ", "| None", ":=", "zip(", "strict="):
        assert banned not in hostdigest.HOST_PROGRAM, banned
    tree = ast.parse(hostdigest.HOST_PROGRAM)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"hashlib", "os", "struct", "sys"}  # stdlib only
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]


class Source:
    def __init__(self, data: bytes) -> None:
        self.buf = io.BytesIO(data)

    def read_exact(self, size: int) -> bytes:
        data = self.buf.read(size)
        if len(data) != size:
            raise ProtocolError("short")
        return data


def run_local(path: Path, previous: bytes | None) -> tuple[hostdigest.DigestResult, dict[int, bytes], bytes]:
    """Run the program the way the host does: ``sh -c <host_command>`` with the request on stdin."""
    line = hostdigest.host_command(str(path)).replace("python ", shlex.quote(sys.executable) + " ", 1)
    proc = subprocess.run(
        ["sh", "-c", line], input=hostdigest.request(previous), capture_output=True, check=True, timeout=60
    )
    blocks: dict[int, bytes] = {}
    result = hostdigest.parse_stream(
        Source(proc.stdout), previous, lambda off, data: blocks.__setitem__(off, data)
    )
    return result, blocks, proc.stdout


def make_disk(path: Path, size: int, writes: list[tuple[int, int]], seed: int) -> None:
    rnd = random.Random(seed)
    with path.open("r+b" if path.exists() else "wb") as fh:
        fh.truncate(size)
        for off, length in writes:
            fh.seek(off)
            fh.write(rnd.randbytes(length))


def test_full_then_incremental_sends_exactly_the_changed_blocks(tmp_path: Path) -> None:
    disk = tmp_path / 'a "b" $(x)-flat.vmdk'
    size = 8 * 1024 * 1024 + 12345  # a short last block
    make_disk(disk, size, [(0, 3 * B), (5 * B + 100, 10), (40 * B, 70 * B)], seed=1)
    with disk.open("r+b") as fh:  # an allocated block of zeros counts as zero
        fh.seek(20 * B)
        fh.write(bytes(B))
    data = disk.read_bytes()
    full, blocks, wire = run_local(disk, None)
    nonzero = [i for i in range(-(-size // B)) if any(data[i * B : (i + 1) * B])]
    assert sorted(blocks) == [i * B for i in nonzero]
    assert all(blocks[off] == data[off : off + B] for off in blocks)
    assert full.changed_blocks == len(nonzero) and full.same_blocks == 0
    assert full.zero_blocks == -(-size // B) - len(nonzero)
    assert full.used_seek_data
    assert full.digests == b"".join(hostdigest.block_digest(data[i : i + B]) for i in range(0, size, B))
    assert len(wire) < len(nonzero) * (B + 13) + 1000

    # guest writes: 4 KiB inside block 1, one crossing blocks 9/10, one at the short tail, one in a hole
    make_disk(disk, size, [(B + 4096, 4096), (10 * B - 100, 200), (size - 50, 50), (30 * B, 8192)], seed=2)
    incr, blocks, wire = run_local(disk, full.digests)
    assert sorted(blocks) == [B, 9 * B, 10 * B, 30 * B, 128 * B]
    assert incr.changed_blocks == 5
    assert incr.host_bytes_read >= incr.changed_blocks * B  # reads allocated data only
    new = disk.read_bytes()
    assert incr.digests == b"".join(hostdigest.block_digest(new[i : i + B]) for i in range(0, size, B))
    assert len(wire) < 5 * (B + 13) + 1000  # only the changed blocks cross

    same, blocks, _ = run_local(disk, incr.digests)
    assert blocks == {} and same.digests == incr.digests


def test_stream_checks(tmp_path: Path) -> None:
    disk = tmp_path / "d"
    make_disk(disk, 4 * B, [(0, B)], seed=3)
    _, _, wire = run_local(disk, None)
    tampered = bytearray(wire)
    tampered[19 + 13 + 100] ^= 1  # a data byte: the rebuilt map no longer matches the host's
    with pytest.raises(FullBackupNeededError):
        hostdigest.parse_stream(Source(bytes(tampered)), None, lambda o, d: None)
    with pytest.raises(ProtocolError):
        hostdigest.parse_stream(Source(b"XXXX" + wire[4:]), None, lambda o, d: None)
    with pytest.raises(ProtocolError):
        hostdigest.parse_stream(Source(wire[:-5]), None, lambda o, d: None)
    with pytest.raises(ValueError):
        hostdigest.request(b"123")


def test_bootstrap_reads_exactly_the_program(tmp_path: Path) -> None:
    n = len(hostdigest.HOST_PROGRAM.encode())
    assert f"read({n})" in hostdigest.host_command("/x")
    assert hostdigest.host_command("/vmfs/volumes/ds/a b/it's.vmdk").endswith(
        shlex.quote("/vmfs/volumes/ds/a b/it's.vmdk") + " 65536"
    )
    assert hashlib.blake2b(b"x", digest_size=16).digest() == hostdigest.block_digest(b"x")
    assert os.path.exists(sys.executable)
