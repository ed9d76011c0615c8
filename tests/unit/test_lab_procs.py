"""esxisim's process bookkeeping with real processes: what a lab kills is its own and nothing else (other
labs, other tests' processes and connections made meanwhile run on the same machine)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from esxisim import procs

# forks a sleeping child every few milliseconds, forever: a tree that grows while it is being killed
FORKER = """
import os, time
while True:
    if os.fork() == 0:
        time.sleep(120)
        os._exit(0)
    time.sleep(0.005)
"""


def marked(token: str) -> list[int]:
    """Live processes started with ``ESXISIM_TEST_MARK=token`` in their environment."""
    found = []
    for pid in procs.all_pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if f"ESXISIM_TEST_MARK={token}".encode() in environ.split(b"\0") and procs.alive(pid):
            found.append(pid)
    return found


def test_kill_trees_kills_a_forking_tree_and_nothing_else() -> None:
    token = secrets.token_hex(8)
    env = dict(os.environ, ESXISIM_TEST_MARK=token)
    forker = subprocess.Popen([sys.executable, "-c", FORKER], env=env)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        deadline = time.monotonic() + 60
        while len(marked(token)) < 4:
            assert time.monotonic() < deadline, "the forker never forked"
            time.sleep(0.01)
        assert procs.kill_trees([forker.pid]) == []
        assert marked(token) == []  # the forker and every child, also those forked during the kill
        assert bystander.poll() is None
    finally:
        for proc in (forker, bystander):
            proc.kill()
            proc.wait()
        procs.kill_trees(marked(token))


def test_mentions_matches_whole_path_components() -> None:
    assert procs.mentions(["--config", "/tmp/lab/hosts/esxi1/sim.json"], "/tmp/lab")
    assert procs.mentions(["/tmp/lab"], "/tmp/lab/")
    assert not procs.mentions(["--config", "/tmp/lab2/hosts/esxi1/sim.json"], "/tmp/lab")  # another lab


def test_listens_on_names_the_process_that_holds_the_listener() -> None:
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        assert not procs.listens_on(os.getpid(), port)  # bound, not listening
        server.listen()
        assert procs.listens_on(os.getpid(), port)
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        try:
            assert not procs.listens_on(other.pid, port)
        finally:
            other.kill()
            other.wait()
