"""Progress of long operations (backups, restores, verifications): bytes, rate and ETA per disk.

On a terminal one status line on stderr is redrawn (``\\r``) twice a second; otherwise a structlog
``<operation>.progress`` event (``backup.progress`` …) per active disk every ``log_interval`` seconds.
Counters are updated from the pipeline threads; one reporter thread renders them.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

import structlog

from reconciler.printable import printable

log = structlog.get_logger(__name__)

MiB = 1 << 20


@dataclass
class DiskProgress:
    """One disk being read. ``total`` is the bytes of disk the run walks (its capacity, or the sum of
    the changed areas); ``position`` how far it got; ``received`` the bytes that crossed the network."""

    vm: str
    disk: str
    total: int
    position: int = 0
    received: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def advance(self, received: int, position: int | None = None) -> None:
        with self._lock:
            self.received += received
            self.position = max(self.position, position if position is not None else self.position + received)

    def done(self) -> None:
        with self._lock:
            self.position = max(self.position, self.total)
            self.finished = time.monotonic()

    def rate(self, now: float) -> float:
        """Bytes of disk walked per second."""
        elapsed = (self.finished or now) - self.started
        return self.position / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float) -> float | None:
        rate = self.rate(now)
        if self.finished is not None:
            return 0.0
        if rate <= 0:
            return None
        return max(0.0, (self.total - self.position) / rate)

    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(1.0, self.position / self.total)


def _eta_text(eta: float | None) -> str:
    if eta is None:
        return "--"
    seconds = int(eta + 0.5)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Collects :class:`DiskProgress` objects and reports them until :meth:`stop`."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        interval: float = 0.5,
        log_interval: float = 10.0,
        operation: str = "backup",
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.event = f"{operation}.progress"
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval if self.tty else log_interval
        self._disks: list[DiskProgress] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._width = 0
        self._draw = threading.Lock()

    def disk(self, vm: str, disk: str, total: int) -> DiskProgress:
        item = DiskProgress(vm, disk, total)
        with self._lock:
            self._disks.append(item)
        return item

    def start(self) -> Progress:
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.clear_line()

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def clear_line(self) -> None:
        """Erase the status line (before printing other output to the terminal)."""
        with self._draw:
            if self.tty and self._width:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()
                self._width = 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.report()

    def active(self) -> list[DiskProgress]:
        with self._lock:
            return [d for d in self._disks if d.finished is None]

    def line(self, now: float | None = None) -> str:
        """The terminal status line for the disks being read."""
        now = time.monotonic() if now is None else now
        parts = [
            f"{printable(d.vm)}/{printable(d.disk)} {d.fraction() * 100:3.0f}% {d.rate(now) / MiB:.1f} MiB/s"
            f" ETA {_eta_text(d.eta(now))}"
            for d in self.active()
        ]
        return " | ".join(parts)

    def report(self) -> None:
        now = time.monotonic()
        if self.tty:
            with self._draw:
                self._draw_line(self.line(now))
            return
        for d in self.active():
            log.info(
                self.event,
                vm=d.vm,
                disk=d.disk,
                position=d.position,
                total=d.total,
                received=d.received,
                rate_mib_s=round(d.rate(now) / MiB, 1),
                eta_s=None if (eta := d.eta(now)) is None else round(eta),
            )

    def _draw_line(self, text: str) -> None:
        columns = shutil.get_terminal_size((100, 20)).columns - 1
        text = text[:columns]
        pad = max(0, self._width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._width = len(text)
