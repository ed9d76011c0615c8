"""Bulk disk writes through the OpenSSH client binary against the lab: logged in with the key or the
password like paramiko, bound to the host key paramiko checked (another host's key is refused), no
secret in argv, environment or a named file, every piece written and checked on the host, failures
reaching the caller, and no ``ssh`` process left behind; when the binary cannot be used, None (the
caller stays on paramiko)."""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler.esxi.errors import CommandError, ShellError
from reconciler.esxi.hostdigest import compare_on_host
from reconciler.esxi.hostwrite import ParallelSshWriter
from reconciler.esxi.openssh import OpenSsh
from reconciler.esxi.shell import ShellConnection, ShellSession, SshTarget
from reconciler.esxi.transport import vmfs_path
from tests.integration.test_esxi_hostwrite import SIZE, expected, scattered, target
from tests.waiting import wait_until

pytestmark = pytest.mark.lab
MiB = 1 << 20
__all__ = ["target"]  # the fixture, shared with the paramiko writer's tests


def target_of(lab: LabHandle, host: str, *, key: bool = True, password: bool = False) -> SshTarget:
    info = lab.host(host)["ssh"]
    text = Path(info["private_key"]).read_text()
    secret = lab.password(host)
    return SshTarget(
        info["host"],
        info["port"],
        "root",
        info["host_key_fingerprint"],
        private_key=(lambda: text) if key else None,
        password=(lambda: secret) if password else None,
    )


def no_paramiko() -> ShellConnection:
    raise AssertionError("the writer opened a paramiko connection although it was given the ssh binary")


def ssh_children() -> list[int]:
    """Our child processes that run ``ssh``."""
    found = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        for pid in children:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "ssh":
                    found.append(int(pid))
            except FileNotFoundError:
                continue
    return found


@pytest.mark.parametrize("login", ["key", "password"])
def test_the_binary_writes_every_piece_and_keeps_holes(
    lab: LabHandle, target: tuple[str, Path], login: str
) -> None:
    ds_path, local = target
    session = ShellSession(target_of(lab, lab.free, key=login == "key", password=login == "password"))
    pieces = scattered(11)
    random.Random(12).shuffle(pieces)
    try:
        bulk = OpenSsh.start(session.connection())
        assert bulk is not None, "the ssh client could not log in"
        try:
            writer = ParallelSshWriter(no_paramiko, streams=3, bulk=bulk)
            written = writer.write(vmfs_path(ds_path), pieces)
        finally:
            bulk.close()
    finally:
        session.close()
    assert written == sum(len(d) for _, d in pieces)
    assert local.read_bytes() == expected(sorted(pieces))
    assert local.stat().st_blocks * 512 < SIZE // 2  # the holes were never written
    assert ssh_children() == []


def test_no_secret_in_argv_environment_or_a_named_file(lab: LabHandle) -> None:
    session = ShellSession(target_of(lab, lab.free, key=True, password=True))
    secrets = [lab.password(lab.free), Path(lab.host(lab.free)["ssh"]["private_key"]).read_text().strip()]
    try:
        bulk = OpenSsh.start(session.connection())
        assert bulk is not None
        try:
            assert bulk._dir is not None  # the askpass script's private directory
            named = [f.read_text() for f in bulk._dir.iterdir()]
            with bulk.stream("sleep 5", timeout=30) as running:
                proc = Path(f"/proc/{running.proc.pid}")  # empty for a moment while ssh starts
                argv = wait_until("ssh's argv", lambda: (proc / "cmdline").read_bytes(), timeout=10).decode()
                environ = (proc / "environ").read_bytes().decode()
                running.abort()
        except ShellError:
            pass  # the killed sleep ends the block with an error; what was read is what counts
        finally:
            bulk.close()
    finally:
        session.close()
    for secret in secrets:
        assert secret not in argv and secret not in environ
        assert all(secret not in text for text in named)
    assert "/proc/" in argv and "StrictHostKeyChecking=yes" in argv


def test_another_hosts_key_is_refused(lab: LabHandle) -> None:
    """The binary trusts only the key paramiko checked: pointed at the other host, it cannot log in."""
    session = ShellSession(target_of(lab, lab.free))
    try:
        conn = session.connection()
        other = lab.host(lab.licensed)["ssh"]
        conn.target = replace(conn.target, port=other["port"])
        assert OpenSsh.start(conn) is None
    finally:
        session.close()


def test_a_refused_login_or_no_binary_leaves_paramiko(
    lab: LabHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = ShellSession(target_of(lab, lab.free))
    try:
        conn = session.connection()
        conn.target = replace(conn.target, private_key=None, password=lambda: "not the password")
        assert OpenSsh.start(conn) is None
        conn.target = target_of(lab, lab.free)
        monkeypatch.setenv("PATH", "/nonexistent")
        assert OpenSsh.start(conn) is None
    finally:
        session.close()
    assert ssh_children() == []


def test_failures_reach_the_caller_and_leave_no_ssh(lab: LabHandle, target: tuple[str, Path]) -> None:
    ds_path, _ = target
    session = ShellSession(target_of(lab, lab.free))

    def fail(offset: int, length: int) -> None:
        raise RuntimeError("the NAS went away")

    try:
        bulk = OpenSsh.start(session.connection())
        assert bulk is not None
        try:
            writer = ParallelSshWriter(no_paramiko, streams=2, bulk=bulk)
            with pytest.raises(RuntimeError, match="the NAS went away"):
                writer.write(vmfs_path(ds_path), iter(scattered(13)), fail)
            assert ssh_children() == []
            with pytest.raises(CommandError, match="no such dir"):
                writer.write(vmfs_path("[datastore1] no such dir/x-flat.vmdk"), scattered(14))
            with (
                pytest.raises(ShellError, match="no progress for 2 s"),
                bulk.stream("sleep 30", timeout=2) as stuck,
            ):
                stuck.write(bytes(8 * MiB))  # nobody reads: the pipe and the channel fill up
        finally:
            bulk.close()
    finally:
        session.close()
    assert ssh_children() == []


def test_the_digest_program_runs_through_the_binary(lab: LabHandle, target: tuple[str, Path]) -> None:
    """The free host's digest compare (backups' reads) reads the same blocks through ``ssh`` as through
    paramiko, changed blocks in disk order."""
    ds_path, local = target
    pieces = scattered(15)
    with local.open("r+b") as fh:
        for off, data in pieces:
            fh.seek(off)
            fh.write(data)
    session = ShellSession(target_of(lab, lab.free))
    try:
        bulk = OpenSsh.start(session.connection())
        assert bulk is not None
        try:
            through_ssh: list[tuple[int, bytes]] = []
            by_ssh = compare_on_host(bulk, vmfs_path(ds_path), None, lambda o, d: through_ssh.append((o, d)))
        finally:
            bulk.close()
        through_paramiko: list[tuple[int, bytes]] = []
        by_paramiko = compare_on_host(
            session.connection(), vmfs_path(ds_path), None, lambda o, d: through_paramiko.append((o, d))
        )
    finally:
        session.close()
    assert through_ssh == through_paramiko and by_ssh.digests == by_paramiko.digests
    image = bytearray(SIZE)
    for off, data in through_ssh:
        image[off : off + len(data)] = data
    assert bytes(image) == expected(pieces)
