"""The reliability suite's crash hook: ``kill_point("backup.snapshot-created")`` ends this process with
SIGKILL when ``ESXI_RECONCILER_TEST_KILL_AT`` names that step (``step``, or ``step:N`` for its N-th
pass), so a test can kill a run at an exact place and check that nothing is lost. Without the variable
it does nothing. The steps are listed in docs/reliability.md; imports nothing of ours."""

from __future__ import annotations

import os
import signal
import threading

ENV = "ESXI_RECONCILER_TEST_KILL_AT"

_passes: dict[str, int] = {}
_lock = threading.Lock()


def kill_point(step: str) -> None:
    """SIGKILL this process if ``step`` is the one (and this its N-th pass) the environment names."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, _, nth = wanted.partition(":")
    if name != step:
        return
    with _lock:
        _passes[step] = _passes.get(step, 0) + 1
        if _passes[step] < int(nth or "1"):
            return
    os.kill(os.getpid(), signal.SIGKILL)
