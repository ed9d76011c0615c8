"""``<state dir>/daemon.json``: what ``status`` needs to judge the daemon, written by the daemon itself.

A daemon (``run`` without ``--once``) that has used a state directory is *expected* to be running there;
its resync interval says how old the status data may get; the start and end of its cycles say whether
the data is being renewed. Written atomically (temporary file + rename) by the loop thread at start and
at each cycle's start and end; read by ``status`` without any lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

HEARTBEAT_FILE = "daemon.json"


@dataclass(frozen=True)
class Heartbeat:
    pid: int
    started: datetime
    resync_seconds: float
    once: bool
    cycle_started: datetime | None = None
    cycle_finished: datetime | None = None

    @property
    def cycle_running(self) -> bool:
        return self.cycle_started is not None and (
            self.cycle_finished is None or self.cycle_finished < self.cycle_started
        )

    def to_dict(self) -> dict[str, object]:
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in asdict(self).items()}


def write_heartbeat(state_dir: Path, beat: Heartbeat) -> None:
    """Replace ``daemon.json`` (never half-written: a reader sees the old or the new one)."""
    fd, tmp = tempfile.mkstemp(prefix=".daemon.json.", dir=state_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(beat.to_dict(), handle)
        Path(tmp).replace(state_dir / HEARTBEAT_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise


def read_heartbeat(state_dir: Path) -> Heartbeat | None:
    """The last heartbeat, or None when no daemon wrote one (or it is unreadable)."""
    try:
        doc = json.loads((state_dir / HEARTBEAT_FILE).read_text(encoding="utf-8"))

        def when(key: str) -> datetime | None:
            value = doc.get(key)
            return datetime.fromisoformat(value) if value else None

        started = when("started")
        if started is None:
            return None
        return Heartbeat(
            pid=int(doc["pid"]),
            started=started,
            resync_seconds=float(doc["resync_seconds"]),
            once=bool(doc["once"]),
            cycle_started=when("cycle_started"),
            cycle_finished=when("cycle_finished"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
