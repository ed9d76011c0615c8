"""The on-host digest program: Python 3.8 syntax, and its protocol run locally against sparse files:
both algorithms, the host's choice without a previous map, a BLAKE2b chain (the maps written before
hosts chose) continued, and clear refusals of what either end does not know."""

from __future__ import annotations

import ast
import hashlib
import io
import os
import random
import shlex
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reconciler.esxi import hostdigest
from reconciler.esxi.errors import FullBackupNeededError, ProtocolError

B = hostdigest.BLOCK_SIZE


ALGORITHMS = list(hostdigest.ALGORITHMS)


@pytest.mark.parametrize("program", [hostdigest.HOST_PROGRAM, hostdigest.ALLOC_PROGRAM])
def test_host_programs_are_python_38_syntax(program: str) -> None:
    ast.parse(program, feature_version=(3, 8))
    for banned in ("removeprefix", "removesuffix", " match ", "case ", "| None", ":=", "zip(", "strict="):
        assert banned not in program, banned
    tree = ast.parse(program)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"hashlib", "os", "struct", "sys", "time"}  # stdlib only
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]


class Source:
    def __init__(self, data: bytes) -> None:
        self.buf = io.BytesIO(data)

    def read_exact(self, size: int) -> bytes:
        data = self.buf.read(size)
        if len(data) != size:
            raise ProtocolError("short")
        return data


def run_program(path: Path, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    """Run the program the way the host does: ``sh -c <host_command>`` with ``stdin``."""
    line = hostdigest.host_command(str(path)).replace("python ", shlex.quote(sys.executable) + " ", 1)
    return subprocess.run(["sh", "-c", line], input=stdin, capture_output=True, timeout=60)


def run_local(
    path: Path, previous: bytes | None, algorithm: str | None
) -> tuple[hostdigest.DigestResult, dict[int, bytes], bytes]:
    """The program answering ``request(previous, algorithm)``, parsed as the client parses it."""
    proc = run_program(path, hostdigest.request(previous, algorithm))
    assert proc.returncode == 0, proc.stderr
    blocks: dict[int, bytes] = {}
    result = hostdigest.parse_stream(
        Source(proc.stdout), previous, lambda off, data: blocks.__setitem__(off, data), algorithm=algorithm
    )
    return result, blocks, proc.stdout


def disk_map(data: bytes, algorithm: str) -> bytes:
    return b"".join(hostdigest.block_digest(data[i : i + B], algorithm) for i in range(0, len(data), B))


def make_disk(path: Path, size: int, writes: list[tuple[int, int]], seed: int) -> None:
    rnd = random.Random(seed)
    with path.open("r+b" if path.exists() else "wb") as fh:
        fh.truncate(size)
        for off, length in writes:
            fh.seek(off)
            fh.write(rnd.randbytes(length))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_full_then_incremental_sends_exactly_the_changed_blocks(tmp_path: Path, algorithm: str) -> None:
    disk = tmp_path / 'a "b" $(x)-flat.vmdk'
    size = 8 * 1024 * 1024 + 12345  # a short last block
    make_disk(disk, size, [(0, 3 * B), (5 * B + 100, 10), (40 * B, 70 * B)], seed=1)
    with disk.open("r+b") as fh:  # an allocated block of zeros counts as zero
        fh.seek(20 * B)
        fh.write(bytes(B))
    data = disk.read_bytes()
    full, blocks, wire = run_local(disk, None, algorithm)
    assert full.algorithm == algorithm and wire[5] == hostdigest.ALGORITHMS[algorithm]
    nonzero = [i for i in range(-(-size // B)) if any(data[i * B : (i + 1) * B])]
    assert sorted(blocks) == [i * B for i in nonzero]
    assert all(blocks[off] == data[off : off + B] for off in blocks)
    assert full.changed_blocks == len(nonzero) and full.same_blocks == 0
    assert full.zero_blocks == -(-size // B) - len(nonzero)
    assert full.used_seek_data
    assert full.digests == disk_map(data, algorithm)
    assert len(wire) < len(nonzero) * (B + 13) + 1000

    # guest writes: 4 KiB inside block 1, one crossing blocks 9/10, one at the short tail, one in a hole
    make_disk(disk, size, [(B + 4096, 4096), (10 * B - 100, 200), (size - 50, 50), (30 * B, 8192)], seed=2)
    incr, blocks, wire = run_local(disk, full.digests, algorithm)
    assert sorted(blocks) == [B, 9 * B, 10 * B, 30 * B, 128 * B]
    assert incr.changed_blocks == 5
    assert incr.host_bytes_read >= incr.changed_blocks * B  # reads allocated data only
    new = disk.read_bytes()
    assert incr.digests == disk_map(new, algorithm) and incr.algorithm == algorithm
    assert len(wire) < 5 * (B + 13) + 1000  # only the changed blocks cross

    same, blocks, _ = run_local(disk, incr.digests, algorithm)
    assert blocks == {} and same.digests == incr.digests


def test_stream_checks(tmp_path: Path) -> None:
    disk = tmp_path / "d"
    make_disk(disk, 4 * B, [(0, B)], seed=3)
    _, _, wire = run_local(disk, None, "blake2b-128")
    tampered = bytearray(wire)
    tampered[19 + 13 + 100] ^= 1  # a data byte: the rebuilt map no longer matches the host's
    with pytest.raises(FullBackupNeededError):
        hostdigest.parse_stream(Source(bytes(tampered)), None, lambda o, d: None, algorithm=None)
    with pytest.raises(ProtocolError):
        hostdigest.parse_stream(Source(b"XXXX" + wire[4:]), None, lambda o, d: None, algorithm=None)
    with pytest.raises(ProtocolError):
        hostdigest.parse_stream(Source(wire[:-5]), None, lambda o, d: None, algorithm=None)
    with pytest.raises(ValueError):
        hostdigest.request(b"123", "blake2b-128")


def test_bootstrap_reads_exactly_the_program(tmp_path: Path) -> None:
    n = len(hostdigest.HOST_PROGRAM.encode())
    assert f"read({n})" in hostdigest.host_command("/x")
    assert hostdigest.host_command("/vmfs/volumes/ds/a b/it's.vmdk").endswith(
        shlex.quote("/vmfs/volumes/ds/a b/it's.vmdk") + " 65536"
    )
    assert hashlib.blake2b(b"x", digest_size=16).digest() == hostdigest.block_digest(b"x", "blake2b-128")
    assert hashlib.sha256(b"x").digest()[:16] == hostdigest.block_digest(b"x", "sha256-128")
    assert os.path.exists(sys.executable)


# -- the algorithm: asked for, chosen by the host, unknown ---------------------------------------------


def test_without_a_previous_map_the_host_chooses_and_says_which(tmp_path: Path) -> None:
    disk = tmp_path / "d"
    make_disk(disk, 16 * B + 7, [(0, 2 * B), (9 * B, B + 3)], seed=4)
    data = disk.read_bytes()
    result, blocks, wire = run_local(disk, None, None)
    assert wire[5] == hostdigest.ALGORITHMS[result.algorithm]  # the answer header names it
    assert result.digests == disk_map(data, result.algorithm)
    assert sorted(blocks) == [0, B, 9 * B, 10 * B]
    # the next run asks for the chosen one and finds nothing changed
    again, blocks, _ = run_local(disk, result.digests, result.algorithm)
    assert blocks == {} and again.algorithm == result.algorithm and again.same_blocks == 4


def test_a_chain_started_under_blake2b_continues_with_blake2b(tmp_path: Path) -> None:
    """A map written before hosts chose (BLAKE2b-128, as the old client computed it locally) asked for by
    name: the host computes BLAKE2b whatever it would choose, and finds exactly the changed block."""
    disk = tmp_path / "d"
    make_disk(disk, 32 * B, [(0, 20 * B)], seed=5)
    old_map = hostdigest.local_digests(disk.read_bytes(), "blake2b-128")
    make_disk(disk, 32 * B, [(7 * B + 9, 100)], seed=6)
    result, blocks, wire = run_local(disk, old_map, "blake2b-128")
    assert wire[5] == 1 and result.algorithm == "blake2b-128"
    assert sorted(blocks) == [7 * B] and result.same_blocks == 19
    assert result.digests == hostdigest.local_digests(disk.read_bytes(), "blake2b-128")


def test_unknown_algorithms_are_refused_clearly(tmp_path: Path) -> None:
    disk = tmp_path / "d"
    make_disk(disk, 4 * B, [(0, B)], seed=7)
    with pytest.raises(
        ValueError, match=r"unknown digest algorithm 'md5' \(this version computes blake2b-128"
    ):
        hostdigest.request(None, "md5")
    with pytest.raises(ValueError, match="unknown digest algorithm 'sha1'"):
        hostdigest.local_digests(bytes(B), "sha1")
    with pytest.raises(ValueError, match="needs its algorithm"):
        hostdigest.request(bytes(64), None)  # a previous map is never compared under the host's choice
    # the host program refuses an algorithm number (or a protocol version) it does not know: a line on
    # stderr, exit status 2, nothing on stdout
    program = hostdigest.HOST_PROGRAM.encode()
    for header, said in [
        (struct.pack(">BBIQ", 2, 9, B, 0), b"unknown digest algorithm 9"),
        (struct.pack(">BIQ", 1, B, 0), b"request version 1, this program speaks version 2"),
        (struct.pack(">BBIQ", 2, 0, B, 1) + bytes(16), b"a previous map needs its algorithm"),
    ]:
        proc = run_program(disk, program + b"ERHQ" + header)
        assert proc.returncode == 2 and proc.stdout == b"" and said in proc.stderr, proc.stderr
    # the client refuses an answer in an unknown algorithm, or in another one than it asked for
    _, _, wire = run_local(disk, None, "sha256-128")
    unknown = wire[:5] + b"\x09" + wire[6:]
    with pytest.raises(ProtocolError, match="algorithm number 9, unknown here"):
        hostdigest.parse_stream(Source(unknown), None, lambda o, d: None, algorithm=None)
    with pytest.raises(
        ProtocolError, match="asked for blake2b-128 digests, the host answered with sha256-128"
    ):
        hostdigest.parse_stream(Source(wire), None, lambda o, d: None, algorithm="blake2b-128")


class _Slowed:
    """``hashlib`` for the on-host choice with one algorithm made slow: the choice follows the speed."""

    def __init__(self, slow: str) -> None:
        self.slow = slow

    def __getattr__(self, name: str) -> object:
        real = getattr(hashlib, name)
        if name != self.slow:
            return real

        def slowed(*args: object, **kwargs: object) -> object:
            time.sleep(0.001)
            return real(*args, **kwargs)

        return slowed


@pytest.mark.parametrize(("slow", "chosen"), [("blake2b", 2), ("sha256", 1)])
def test_the_host_takes_the_algorithm_it_computes_faster(slow: str, chosen: int) -> None:
    namespace: dict[str, object] = {"hashlib": _Slowed(slow), "os": os, "time": time}
    exec(compile(hostdigest._DIGESTS, "hostdigest", "exec"), namespace)
    fastest = namespace["fastest_algorithm"]
    assert callable(fastest) and fastest(B) == chosen
