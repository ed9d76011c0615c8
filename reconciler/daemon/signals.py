"""Signals of the daemon, turned into requests to its loop, and a wake-up pipe the loop sleeps on.

Handlers only set a flag and write a byte to a pipe (both safe inside a signal handler: no lock is
taken), the loop does the work. ``SIGHUP`` = reload now; ``SIGTERM``/``SIGINT`` = stop (cancel running
work, wait a bounded time); a second stop signal exits at once, for the operator who cannot wait.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
from collections.abc import Callable
from types import FrameType

EXIT_FORCED = 1
"""Exit code after a second stop signal: running work was abandoned (snapshots are cleaned next run)."""


class Waker:
    """A self-pipe: :meth:`wake` from any thread or signal handler ends the loop's :meth:`wait`."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)

    def wake(self) -> None:
        # A full pipe means already awake; a closed one, shutting down.
        with contextlib.suppress(OSError):
            os.write(self._write, b"\0")

    def wait(self, timeout: float | None) -> None:
        """Sleep until woken or ``timeout`` seconds (None: forever); drains pending wake-ups."""
        ready, _, _ = select.select([self._read], [], [], None if timeout is None else max(0.0, timeout))
        if ready:
            try:
                while os.read(self._read, 4096):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


def install(on_reload: Callable[[], None], on_stop: Callable[[int], None]) -> Callable[[], None]:
    """Route SIGHUP to ``on_reload`` and SIGTERM/SIGINT to ``on_stop(signum)`` when called from the main
    thread (Python delivers signals only there); return a function restoring the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def hup(signum: int, frame: FrameType | None) -> None:
        on_reload()

    def stop(signum: int, frame: FrameType | None) -> None:
        on_stop(signum)

    previous = {
        signal.SIGHUP: signal.signal(signal.SIGHUP, hup),
        signal.SIGTERM: signal.signal(signal.SIGTERM, stop),
        signal.SIGINT: signal.signal(signal.SIGINT, stop),
    }

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


def force_exit(signum: int) -> None:
    """The second stop signal: a line on stderr (no logging lock inside a signal handler) and out."""
    name = signal.Signals(signum).name
    os.write(
        2, f"esxi-reconciler: second {name}, exiting at once without waiting for running work\n".encode()
    )
    os._exit(EXIT_FORCED)
