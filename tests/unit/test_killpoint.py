"""The reliability suite's crash hook: inert without its variable, SIGKILL at exactly the named pass."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from reconciler.killpoint import ENV, kill_point

SCRIPT = """
from reconciler.killpoint import kill_point
for i in range(3):
    kill_point("other")
    kill_point("step")
    print(i, flush=True)
"""


def run(wanted: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if wanted is not None:
        env[ENV] = wanted
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=False
    )


def test_without_the_variable_nothing_happens() -> None:
    assert os.environ.get(ENV) is None
    kill_point("backup.snapshot-created")  # still here
    done = run(None)
    assert (done.returncode, done.stdout) == (0, "0\n1\n2\n")


def test_the_named_step_kills_on_its_nth_pass() -> None:
    first = run("step")
    assert first.returncode == -signal.SIGKILL and first.stdout == ""
    third = run("step:3")
    assert third.returncode == -signal.SIGKILL and third.stdout == "0\n1\n"
    assert run("nowhere").returncode == 0
