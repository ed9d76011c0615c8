"""Which VM is being backed up by a process of this machine: one ``flock`` per (host, VM).

A backup holds the lock of its VM from before it looks at the VM's snapshots until its own snapshot is
removed. The kernel drops the lock when the process dies, also on SIGKILL, so a run that gets the lock
knows that a snapshot named as ours on that VM belongs to no live run of this machine: it is an orphan
of a killed run and is removed before the new snapshot is taken. (Two machines backing up the same
host are not supported.)

Lock files live in ``$RUNTIME_DIRECTORY`` (systemd ``RuntimeDirectory=``), else ``/run/esxi-reconciler``
when writable (root), else ``$XDG_RUNTIME_DIR`` or the temp dir, in ``esxi-reconciler-<uid>``. They are
never removed (removing a locked file would let a second process lock a new inode).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class VmBusyError(Exception):
    """Another run of this machine is backing up the VM."""


def default_lock_dir() -> Path:
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0]) / "vm-locks"
    if os.geteuid() == 0:
        return Path("/run/esxi-reconciler/vm-locks")
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"esxi-reconciler-{os.getuid()}" / "vm-locks"


def lock_path(directory: Path, host: str, vm_key: str) -> Path:
    """The lock file of a VM; names are hashed (VM names may hold any character)."""
    digest = hashlib.sha256(f"{host}\0{vm_key}".encode()).hexdigest()[:32]
    return directory / f"{digest}.lock"


@contextlib.contextmanager
def vm_lock(host: str, vm_key: str, directory: Path | None = None) -> Iterator[None]:
    """Hold the lock of VM ``vm_key`` (its vmid) of ``host`` (the API address and port, which tell
    hosts apart better than configured names); :class:`VmBusyError` if another run holds it."""
    directory = directory or default_lock_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = lock_path(directory, host, vm_key)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VmBusyError(f"VM {vm_key} of host {host} is being backed up by another run") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock
