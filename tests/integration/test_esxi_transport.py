"""Disk transports against the lab: HTTPS Range and dd over SSH give the same bytes, for scattered
extents, hostile names and a transfer past paramiko's 512 MiB rekey point."""

from __future__ import annotations

import hashlib
import random
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler.esxi.errors import TransportError
from reconciler.esxi.shell import ShellConnection, ShellSession, SshTarget
from reconciler.esxi.tls import pinned_context
from reconciler.esxi.transport import ROTATE_BYTES, DiskReader, HttpsRangeReader, SshDdReader

pytestmark = pytest.mark.lab
MiB = 1 << 20


def ssh_session(lab: LabHandle, host: str) -> ShellSession:
    info = lab.host(host)["ssh"]
    key = Path(info["private_key"]).read_text()
    return ShellSession(
        SshTarget(info["host"], info["port"], "root", info["host_key_fingerprint"], private_key=lambda: key)
    )


def https_reader(lab: LabHandle, host: str, streams: int = 4) -> HttpsRangeReader:
    api = lab.host(host)["api"]
    ctx = pinned_context(api["host"], api["port"], api["thumbprint_sha256"])
    pw = lab.password(host)
    return HttpsRangeReader(api["host"], api["port"], ctx, user="root", password=lambda: pw, streams=streams)


@pytest.fixture
def big_file(lab: LabHandle) -> Iterator[tuple[str, Path]]:
    """A 640 MiB sparse file with random data at a few places, on the free host's datastore."""
    ds_path = "[datastore1] big transfer 'q'.bin"
    local = lab.local_path(lab.free, ds_path)
    rnd = random.Random(7)
    with local.open("wb") as fh:
        fh.truncate(640 * MiB)
        for off in (0, 300 * MiB + 4096, 639 * MiB):
            fh.seek(off)
            fh.write(rnd.randbytes(MiB))
    try:
        yield ds_path, local
    finally:
        local.unlink()


def test_both_transports_read_the_same_scattered_extents(lab: LabHandle) -> None:
    ds_path = '[datastore1] ファイル鯖 "q" $(x)/ファイル鯖 "q" $(x)-flat.vmdk'
    data = lab.local_path(lab.free, ds_path).read_bytes()
    extents = [(0, 512), (4096, 3 * 4096), (MiB - 7, 9 * MiB + 11), (len(data) - 4096, 4096)]
    session = ssh_session(lab, lab.free)
    readers: list[DiskReader] = [
        https_reader(lab, lab.free, 3),
        SshDdReader(session.new_connection, streams=3),
    ]
    try:
        for reader in readers:
            got = list(reader.read(ds_path, extents))
            want = [(o, data[o : o + n]) for ext_o, ext_n in extents for o, n in _pieces(ext_o, ext_n)]
            assert [(o, len(d)) for o, d in got] == [(o, len(d)) for o, d in want]
            assert got == want
            with pytest.raises(TransportError):
                list(reader.read(ds_path, [(len(data) - 10, 20)]))  # past the end
    finally:
        for reader in readers:
            reader.close()
        session.close()


def _pieces(off: int, length: int, size: int = 4 * MiB) -> Iterator[tuple[int, int]]:
    end = off + length
    while off < end:
        yield off, min(size, end - off)
        off += size


def test_transfer_past_the_rekey_point(lab: LabHandle, big_file: tuple[str, Path]) -> None:
    """640 MiB through SSH (one stream, so one connection would pass paramiko's 512 MiB rekey) and HTTPS."""
    ds_path, local = big_file
    want = hashlib.sha256(local.read_bytes()).hexdigest()
    size = local.stat().st_size
    assert size > ROTATE_BYTES
    session = ssh_session(lab, lab.free)
    opened: list[ShellConnection] = []

    def connect() -> ShellConnection:
        conn = session.new_connection()
        opened.append(conn)
        return conn

    ssh = SshDdReader(connect, streams=1)
    try:
        h = hashlib.sha256()
        for _, data in ssh.read(ds_path, [(0, size)]):
            h.update(data)
        assert h.hexdigest() == want
        assert len(opened) == 2  # rotated before paramiko would rekey
    finally:
        ssh.close()
        session.close()
    # one long channel through the rekey (the hostdigest and cat path)
    session = ssh_session(lab, lab.free)
    try:
        conn = session.new_connection()
        h = hashlib.sha256()
        with conn.stream(["cat", "/vmfs/volumes/datastore1/big transfer 'q'.bin"], timeout=120) as stream:
            while chunk := stream.read(MiB):
                h.update(chunk)
        assert h.hexdigest() == want
        conn.close()
    finally:
        session.close()
    https = https_reader(lab, lab.free)
    try:
        h = hashlib.sha256()
        for _, data in https.read(ds_path, [(0, size)]):
            h.update(data)
        assert h.hexdigest() == want
    finally:
        https.close()


def test_ssh_reader_survives_dropped_connections(lab_faults: LabHandle) -> None:
    ds_path = "[datastore1] web01/web01-flat.vmdk"
    data = lab_faults.local_path(lab_faults.free, ds_path).read_bytes()
    session = ssh_session(lab_faults, lab_faults.free)
    reader = SshDdReader(session.new_connection, streams=2, piece_size=MiB)
    try:
        got = bytearray()
        for n, (off, chunk) in enumerate(reader.read(ds_path, [(0, len(data))])):
            assert off == len(got)
            got += chunk
            if n in (2, 9):
                lab_faults.fault(lab_faults.free, "ssh-drop")  # kills the live sessions mid-transfer
        assert bytes(got) == data
    finally:
        reader.close()
        session.close()


def test_ssh_reader_retries_when_the_reconnect_fails_too(lab_faults: LabHandle) -> None:
    """The connection drops and the first reconnect fails as well (a busy host refusing for a moment):
    the next attempt connects again and the read completes. (A failed reconnect used to leave the dead
    connection as the worker's, and the next attempt crashed with ValueError instead of retrying.)"""
    ds_path = "[datastore1] web01/web01-flat.vmdk"
    data = lab_faults.local_path(lab_faults.free, ds_path).read_bytes()
    session = ssh_session(lab_faults, lab_faults.free)
    with socket.socket() as probe:  # a port nothing listens on: connecting there is refused
        probe.bind(("127.0.0.1", 0))
        refused = ShellSession(replace(session.target, port=probe.getsockname()[1]))
    connects: list[str] = []

    def connect() -> ShellConnection:
        connects.append("refused" if len(connects) == 1 else "ok")
        return (refused if connects[-1] == "refused" else session).new_connection()

    reader = SshDdReader(connect, streams=1, piece_size=MiB)
    try:
        got = bytearray()
        for n, (off, chunk) in enumerate(reader.read(ds_path, [(0, len(data))])):
            assert off == len(got)
            got += chunk
            if n == 0:
                lab_faults.fault(lab_faults.free, "ssh-drop")
        assert bytes(got) == data
        assert connects[:3] == ["ok", "refused", "ok"]
    finally:
        reader.close()
        session.close()
