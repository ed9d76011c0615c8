"""Signals around a snapshot's life: the snapshot of a backup must be removed however the run ends.

:func:`sigterm_raises` (the CLI verbs wrap their work in it, in the main thread) turns SIGTERM into
``SystemExit`` so ``finally`` blocks run; :func:`deferred_signals` holds SIGINT/SIGTERM while a snapshot
is being removed and re-raises the first one afterwards, so a second Ctrl-C cannot cut the removal
short. Both do nothing outside the main thread (only it receives signals in Python).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """In the main thread: turn SIGTERM into ``SystemExit(143)`` so ``finally`` blocks (snapshot
    removal) run. Without it Python dies on SIGTERM without cleaning up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while cleaning up; re-raise the first one afterwards (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    olds = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in olds.items():
            signal.signal(s, old)
    if caught:
        if caught[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + caught[0])
