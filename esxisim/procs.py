"""Process and mount bookkeeping from /proc: find a lab's processes, end them, check nothing is left."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path

PROC = Path("/proc")


def all_pids() -> list[int]:
    """Pids of all processes visible in /proc."""
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def mnt_ns(pid: int | str) -> str | None:
    """The mount namespace of ``pid`` (``mnt:[4026531841]``), or None if it is gone."""
    try:
        return str(Path(f"/proc/{pid}/ns/mnt").readlink())
    except OSError:
        return None


def own_mnt_ns() -> str:
    ns = mnt_ns("self")
    if ns is None:  # pragma: no cover - /proc is always there on Linux
        raise RuntimeError("cannot read /proc/self/ns/mnt")
    return ns


def state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (R, S, Z ...), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split(" ", 1)[0]


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    st = state(pid)
    return st is not None and st not in ("Z", "X")


def root_dir(pid: int) -> str | None:
    """The root directory of ``pid`` as this process sees its path (its chroot), or None if it is gone."""
    try:
        return str(Path(f"/proc/{pid}/root").readlink())
    except OSError:
        return None


def parent(pid: int) -> int | None:
    """The parent pid of ``pid``, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split(" ")[1])


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(part) for part in raw.split(b"\0") if part]


def pids_in_ns(ns: str, member: Callable[[int], bool] | None = None) -> list[int]:
    """Live pids whose mount namespace is ``ns`` (never the caller's own namespace) and, if given, for
    which ``member`` is true.

    A namespace id alone does not name a lab's processes for long: once its last process is gone the
    kernel hands the same id to the next namespace it makes (another lab's sshd, say), so callers that
    kill pass ``member`` to check that a process really is theirs.
    """
    if ns == own_mnt_ns():
        raise RuntimeError(f"refusing to treat the caller's own mount namespace {ns} as a lab namespace")
    return [pid for pid in all_pids() if mnt_ns(pid) == ns and alive(pid) and (member is None or member(pid))]


def ancestors() -> set[int]:
    """The caller and its ancestors (never to be signalled)."""
    out = {os.getpid()}
    pid = os.getppid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rindex(")") + 2 :].split(" ")[1])
    return out


def mentions(args: list[str], path: str) -> bool:
    """True if an argument is ``path`` or a path below it (``/tmp/lab`` is not mentioned by
    ``/tmp/lab2/...``: that is another lab's)."""
    path = path.rstrip("/") or "/"
    below = path.rstrip("/") + "/"
    return any(a.rstrip("/") == path or a.startswith(below) for a in args)


def pids_mentioning(path: str) -> list[int]:
    """Live pids (not the caller or its ancestors) with ``path`` or a path below it on their command
    line."""
    skip = ancestors()
    return [pid for pid in all_pids() if pid not in skip and alive(pid) and mentions(cmdline(pid), path)]


LAB_PROGRAMS = ("esxisim-host", "unshare")


def lab_pids(state_dir: str) -> list[int]:
    """Processes a lab in ``state_dir`` starts (esxisim-host, unshare, esxisim.nsroot) that are alive."""
    out = []
    for pid in pids_mentioning(state_dir):
        cmd = cmdline(pid)
        if cmd and (Path(cmd[0]).name in LAB_PROGRAMS or "esxisim.nsroot" in cmd):
            out.append(pid)
    return out


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the process that started it dies (even by SIGKILL).

    Used for labs owned by a test session, so that a killed pytest does not leave hosts running.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def reap(pid: int) -> None:
    """Collect ``pid`` if it is our own exited child (no-op otherwise)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` is alive; return the ones still alive at the deadline."""
    left = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        for pid in left:
            reap(pid)
        left = [pid for pid in left if alive(pid)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def end_processes(pids: Iterable[int], term_timeout: float = 3.0, kill_timeout: float = 5.0) -> list[int]:
    """SIGTERM, wait, SIGKILL, wait; return pids that survived even that."""
    left = [pid for pid in pids if alive(pid)]
    if not left:
        return []
    signal_pids(left, signal.SIGTERM)
    left = wait_gone(left, term_timeout)
    if not left:
        return []
    signal_pids(left, signal.SIGKILL)
    return wait_gone(left, kill_timeout)


def kill_trees(pids: Iterable[int], timeout: float = 5.0) -> list[int]:
    """SIGKILL ``pids`` and every process they forked, also while being killed; nothing else.

    Each process is stopped (SIGSTOP) before it is killed, and the children of stopped processes are
    looked for until there are no more: a stopped process cannot fork, so none escapes, and no process
    that merely started meanwhile (a new SSH connection, say) is touched. Returns the pids still alive
    at the deadline.
    """
    frozen: set[int] = set()
    todo = {pid for pid in pids if alive(pid)}
    while todo:
        signal_pids(todo, signal.SIGSTOP)
        frozen |= todo
        todo = {pid for pid in all_pids() if pid not in frozen and parent(pid) in frozen and alive(pid)}
    signal_pids(frozen, signal.SIGKILL)
    return wait_gone(frozen, timeout)


def kill_namespace(
    ns: str, keep: Iterable[int] = (), timeout: float = 5.0, member: Callable[[int], bool] | None = None
) -> list[int]:
    """SIGKILL every process in mount namespace ``ns`` (for which ``member`` is true) except ``keep``,
    until none is left.

    Repeated because a process may fork while we kill; returns the pids still alive at the deadline.
    Pass ``member``: the last round runs after the namespace may have died and its id been reused.
    """
    spare = set(keep)
    deadline = time.monotonic() + timeout
    while True:
        victims = [pid for pid in pids_in_ns(ns, member) if pid not in spare]
        if not victims:
            return []
        signal_pids(victims, signal.SIGKILL)
        left = wait_gone(victims, 0.5)
        if time.monotonic() >= deadline:
            return left


def listens_on(pid: int, port: int, host: str = "127.0.0.1") -> bool:
    """True if ``pid`` itself holds the socket listening on ``host:port`` (IPv4 TCP).

    A banner on the port is not enough to know that a server we started is up: another lab's server may
    have taken the port first, and ours is about to fail its bind.
    """
    want = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    inodes = set()
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 9 and fields[1] == want and fields[3] == "0A":  # 0A: LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if str(fd.readlink()) in inodes:
                return True
    return False


def _unescape_mountinfo(field: str) -> str:
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)  # only space, tab, newline and backslash are escaped: all ASCII


def mounts_under(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """Mount points at or below ``path`` in the mount table ``mountinfo``."""
    prefix = str(path.resolve())
    found = []
    try:
        lines = mountinfo.read_text(errors="surrogateescape").splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        point = _unescape_mountinfo(fields[4])
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found
