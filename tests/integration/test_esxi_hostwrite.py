"""Writing disks over SSH against the lab: the parallel receiver checked on the host, and the ``dd``
fallback. What lands in the file is exactly what was sent, holes stay holes, and every failure reaches
the caller."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler.esxi.errors import ShellError
from reconciler.esxi.hostwrite import ParallelSshWriter
from reconciler.esxi.shell import ShellSession, SshTarget
from reconciler.esxi.transport import SshDdWriter, vmfs_path

pytestmark = pytest.mark.lab
MiB = 1 << 20
SIZE = 24 * MiB


def ssh_session(lab: LabHandle, host: str) -> ShellSession:
    info = lab.host(host)["ssh"]
    key = Path(info["private_key"]).read_text()
    return ShellSession(
        SshTarget(info["host"], info["port"], "root", info["host_key_fingerprint"], private_key=lambda: key)
    )


@pytest.fixture
def target(lab: LabHandle) -> Iterator[tuple[str, Path]]:
    """An empty sparse file of :data:`SIZE` bytes with a hostile name on the free host's datastore."""
    ds_path = "[datastore1] restore 'q' $(x) ファイル-flat.vmdk"
    local = lab.local_path(lab.free, ds_path)
    with local.open("wb") as fh:
        fh.truncate(SIZE)
    try:
        yield ds_path, local
    finally:
        local.unlink()


def scattered(seed: int) -> list[tuple[int, bytes]]:
    """Pieces of 1 MiB and odd sizes at scattered offsets, leaving holes between them."""
    rnd = random.Random(seed)
    out = []
    for i, off in enumerate((0, 3 * MiB, 4 * MiB, 9 * MiB + 512, 15 * MiB, 16 * MiB, SIZE - 4096)):
        n = 4096 if off == SIZE - 4096 else (MiB if i % 2 == 0 else 700_001)
        out.append((off, rnd.randbytes(n)))
    return out


def expected(pieces: list[tuple[int, bytes]]) -> bytes:
    image = bytearray(SIZE)
    for off, data in pieces:
        image[off : off + len(data)] = data
    return bytes(image)


def test_parallel_writer_writes_every_piece_in_any_order_and_rotates(
    lab: LabHandle, target: tuple[str, Path]
) -> None:
    ds_path, local = target
    pieces = scattered(1)
    shuffled = pieces[:]
    random.Random(2).shuffle(shuffled)
    session = ssh_session(lab, lab.free)
    seen: list[tuple[int, int]] = []
    try:
        assert ParallelSshWriter.available(session.connection())
        # sessions end (and are checked on the host) every 2 MiB: several per connection
        writer = ParallelSshWriter(session.new_connection, streams=3, rotate_bytes=2 * MiB)
        written = writer.write(vmfs_path(ds_path), shuffled, lambda o, n: seen.append((o, n)))
    finally:
        session.close()
    assert written == sum(len(d) for _, d in pieces)
    assert sorted(seen) == sorted((o, len(d)) for o, d in pieces)
    assert local.read_bytes() == expected(pieces)
    assert local.stat().st_blocks * 512 < SIZE // 2  # the holes were never written


def test_parallel_writer_raises_the_callers_failure_and_stops(
    lab: LabHandle, target: tuple[str, Path]
) -> None:
    ds_path, _ = target
    session = ssh_session(lab, lab.free)

    def fail(offset: int, length: int) -> None:
        raise RuntimeError("the NAS went away")

    try:
        writer = ParallelSshWriter(session.new_connection, streams=2)
        with pytest.raises(RuntimeError, match="the NAS went away"):
            writer.write(vmfs_path(ds_path), iter(scattered(3)), fail)
    finally:
        session.close()


def test_parallel_writer_fails_on_a_missing_file(lab: LabHandle) -> None:
    """The receiver writes into an existing disk only (create_disk made it): a missing one fails."""
    session = ssh_session(lab, lab.free)
    try:
        writer = ParallelSshWriter(session.new_connection, streams=2)
        with pytest.raises(ShellError):
            writer.write(vmfs_path("[datastore1] no such dir/x-flat.vmdk"), scattered(4))
    finally:
        session.close()


def test_dd_writer_streams_runs_and_keeps_holes(lab: LabHandle, target: tuple[str, Path]) -> None:
    ds_path, local = target
    pieces = scattered(5)
    session = ssh_session(lab, lab.free)
    writer = SshDdWriter(session.new_connection)
    try:
        writer.write(vmfs_path(ds_path), pieces, run_limit=MiB)  # runs end at holes and at 1 MiB
    finally:
        writer.close()
        session.close()
    assert local.read_bytes() == expected(pieces)
    assert local.stat().st_blocks * 512 < SIZE // 2
