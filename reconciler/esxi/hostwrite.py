"""Writing a restored disk over SSH on parallel connections, checked *on* the host as it is written.

A restore used to send the disk through one ``dd`` channel per run of contiguous data and then read the
whole file back on the host (``sha256sum``) to check it: one paramiko stream (bound by one core's
packet layer) and a second full pass over the disk on the host. Here ``streams`` connections each run
a short stdlib-only receiver (:data:`RECEIVE_PROGRAM`, sent on stdin behind the same bootstrap as
:mod:`.hostdigest`, so ESXi 8's ``execInstalledOnly`` allows it). The client hands the next piece to
whichever connection is free; every piece travels as a frame with its offset, the receiver writes it
there (``pwrite``: holes are never written, so a thin disk stays thin) and hashes each frame as it
arrives. When a session ends the receiver prints the SHA-256 of everything it received and wrote, and
the client compares it with the SHA-256 of the frames it sent on that connection: a byte lost, changed
or not written fails the restore before the disk is used.

Protocol (integers big-endian): client → host ``b"ERHW"`` ``version:u8=1``, then frames
``offset:u64 length:u32`` + ``length`` bytes, then an end frame ``offset:u64=0 length:u32=0``. Host →
client one line ``ERHW <sha256 hex of the frames, headers included> <data bytes written>``. A
connection carries at most :data:`~.transport.ROTATE_BYTES` (paramiko's rekey, see
:mod:`.transport`), then its session ends (and is checked) and a new one starts.

Each session runs through the OpenSSH client binary when the caller passes an :class:`~.openssh.OpenSsh`
(C encryption; see :mod:`.openssh` for why and how it is trusted), else through paramiko. Only paramiko's
sessions rotate after ``rotate_bytes``.

A host without Python (where the probe in :meth:`ParallelSshWriter.available` fails) is written with
:class:`~.transport.SshDdWriter` and checked by reading the file back.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import re
import struct
import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from functools import partial
from typing import Protocol

from reconciler.esxi.errors import ShellError, TransportError
from reconciler.esxi.hostdigest import HostStream
from reconciler.esxi.openssh import OpenSsh
from reconciler.esxi.shell import ShellConnection
from reconciler.esxi.transport import ROTATE_BYTES
from reconciler.esxi.vimcmd import command_line

VERSION = 1
FRAME = struct.Struct(">QI")
END_FRAME = FRAME.pack(0, 0)

RECEIVE_PROGRAM = r"""
import hashlib, os, struct, sys

def main():
    path = sys.argv[1]
    inp = sys.stdin.buffer
    head = inp.read(5)
    if head != b"ERHW\x01":
        sys.stderr.write("hostwrite: bad request header %r\n" % (head,))
        return 2
    fd = os.open(path, os.O_WRONLY)
    digest = hashlib.sha256()
    written = 0
    buf = memoryview(bytearray(1 << 20))  # one buffer for every read: no fresh pages per MiB
    while True:
        frame = inp.read(12)
        if len(frame) != 12:
            sys.stderr.write("hostwrite: stream ended inside a frame header\n")
            return 3
        offset, length = struct.unpack(">QI", frame)
        if length == 0:
            break
        digest.update(frame)
        while length:
            got = inp.readinto(buf[:min(length, len(buf))])
            if not got:
                sys.stderr.write("hostwrite: stream ended inside a frame\n")
                return 3
            view = buf[:got]
            digest.update(view)
            while view:
                n = os.pwrite(fd, view, offset)
                offset += n
                view = view[n:]
            written += got
            length -= got
    os.close(fd)
    sys.stdout.write("ERHW %s %d\n" % (digest.hexdigest(), written))
    sys.stdout.flush()
    return 0

sys.exit(main())
"""
"""The on-host receiver (sent on stdin; see the module doc). Python 3.5 compatible (``os.pwrite``)."""

_PROBE = "import hashlib, os, struct, sys; os.pwrite"
_ANSWER = re.compile(rb"ERHW ([0-9a-f]{64}) (\d+)\n?")


def receive_command(path: str) -> str:
    """The shell line that runs :data:`RECEIVE_PROGRAM` on ``path`` (a ``/vmfs/volumes/...`` file)."""
    n = len(RECEIVE_PROGRAM.encode("utf-8"))
    bootstrap = f'import sys;exec(compile(sys.stdin.buffer.read({n}),"hostwrite","exec"))'
    return command_line(["python", "-c", bootstrap, path])


class DataStream(HostStream, Protocol):
    """A remote command's stdin and stdout (:class:`~.shell.RemoteStream` through paramiko, or
    :class:`~.openssh.ProcessStream` through the ssh binary) that a failed write can also abort."""

    def abort(self) -> None: ...


StreamOpener = Callable[[str], AbstractContextManager[DataStream]]
"""Starts a command line and yields its stream; the exit status is checked when the block ends."""


class _Session:
    """One receiver run on one connection: frames sent, hashed here as on the host."""

    def __init__(self, open_stream: StreamOpener, path: str) -> None:
        self.digest = hashlib.sha256()
        self.sent = 0
        self._cm = open_stream(receive_command(path))
        self.stream = self._cm.__enter__()
        try:
            self.stream.write(RECEIVE_PROGRAM.encode("utf-8") + b"ERHW" + bytes([VERSION]))
        except BaseException as exc:
            self._cm.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def send(self, offset: int, data: bytes) -> None:
        frame = FRAME.pack(offset, len(data))
        self.digest.update(frame)
        self.digest.update(data)
        self.stream.write(frame)
        self.stream.write(data)
        self.sent += len(data)

    def finish(self, path: str) -> None:
        """End the session and compare the host's digest of what it wrote with ours."""
        try:
            self.stream.write(END_FRAME)
            self.stream.close_stdin()
            answer = b""
            while len(answer) < 128:
                part = self.stream.read(128)
                if not part:
                    break
                answer += part
        except BaseException as exc:
            self._cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._cm.__exit__(None, None, None)  # checks the exit status
        found = _ANSWER.fullmatch(answer)
        if found is None:
            raise TransportError(f"writing {path}: unexpected answer from the host {answer[:80]!r}")
        if found.group(1).decode() != self.digest.hexdigest() or int(found.group(2)) != self.sent:
            raise TransportError(
                f"writing {path}: the host wrote {int(found.group(2))} bytes with SHA-256 "
                f"{found.group(1).decode()}, we sent {self.sent} with {self.digest.hexdigest()}"
            )

    def abandon(self) -> None:
        with contextlib.suppress(Exception):
            self.stream.abort()


class ParallelSshWriter:
    """Writes ``(offset, bytes)`` pieces into an existing file on the host over ``streams`` SSH
    connections (see the module doc). ``connect`` opens a new authenticated paramiko connection;
    with ``bulk`` the sessions run through the ssh binary instead."""

    def __init__(
        self,
        connect: Callable[[], ShellConnection],
        *,
        streams: int = 4,
        timeout: float = 600.0,
        rotate_bytes: int = ROTATE_BYTES,
        bulk: OpenSsh | None = None,
    ) -> None:
        if streams < 1:
            raise ValueError("streams must be at least 1")
        self._connect = connect
        self._bulk = bulk
        self.streams = streams
        self.timeout = timeout
        self.rotate_bytes = rotate_bytes

    @staticmethod
    def available(conn: ShellConnection) -> bool:
        """Whether the host runs the receiver (an installed ``python`` with ``os.pwrite``)."""
        try:
            return conn.run(["python", "-c", _PROBE], timeout=60, check=False).exit_status == 0
        except ShellError:
            return False

    def write(  # noqa: C901  the sender threads, the feeder and the shutdown share one stop event and one error list; split they would be passed around
        self,
        path: str,
        data: Iterable[tuple[int, bytes]],
        on_written: Callable[[int, int], None] | None = None,
    ) -> int:
        """Write the pieces (any order, non-overlapping) into ``path`` (a ``/vmfs/volumes`` path) and
        return the bytes written. ``on_written(offset, length)`` runs after each piece was sent (on a
        sender thread, one call at a time). The first failure (a sender's, or ``on_written``'s) is
        raised here as it was, after every connection stopped."""
        work: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=2 * self.streams)
        errors: list[BaseException] = []
        stop = threading.Event()
        report = threading.Lock()
        totals = [0] * self.streams

        def sender(index: int) -> None:
            conn: ShellConnection | None = None
            session: _Session | None = None
            try:
                while True:
                    item = work.get()
                    if item is None or stop.is_set():
                        break
                    off, piece = item
                    full = session is not None and session.sent + len(piece) > self.rotate_bytes
                    if full and session is not None and self._bulk is None:  # paramiko rekeys: ROTATE_BYTES
                        session.finish(path)
                        session = None
                        if conn is not None:
                            conn.close()
                            conn = None
                    if session is None:
                        if self._bulk is not None:
                            session = _Session(partial(self._bulk.stream, timeout=self.timeout), path)
                        else:
                            if conn is None:
                                conn = self._connect()
                            session = _Session(partial(conn.stream, timeout=self.timeout), path)
                    session.send(off, piece)
                    totals[index] += len(piece)
                    if on_written is not None:
                        with report:
                            on_written(off, len(piece))
                if session is not None and not stop.is_set():
                    session.finish(path)
                    session = None
            except BaseException as exc:  # noqa: BLE001  kept for the calling thread, which raises the first one as it was
                errors.append(exc)
                stop.set()
            finally:
                if session is not None:
                    session.abandon()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()

        threads = [
            threading.Thread(target=sender, args=(i,), name=f"disk-write-{i}", daemon=True)
            for i in range(self.streams)
        ]
        for t in threads:
            t.start()
        try:
            for off, piece in data:
                while not stop.is_set():
                    try:
                        work.put((off, piece), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
        except BaseException:
            stop.set()
            raise
        finally:
            for _ in threads:  # every sender ends: after the queued pieces, or at once when stopped
                while any(t.is_alive() for t in threads):
                    try:
                        work.put(None, timeout=0.2)
                        break
                    except queue.Full:
                        if stop.is_set():
                            with contextlib.suppress(queue.Empty):
                                work.get_nowait()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        return sum(totals)
