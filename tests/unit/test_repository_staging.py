"""Staged files in ``tmp/``: named after their writer, removed when the writer is gone — never while a
live writer in another process still owns them — and dropped by a failed run itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.repository import CHUNK_SIZE, LockInfo, Repository, stale_staged_files
from reconciler.repository.backend import host_tag, staged_owner

ROOT = Path(__file__).resolve().parents[2]

_WRITER = """
import sys
from reconciler.repository import Repository

repo = Repository.open(sys.argv[1])
lock = repo.lock(purpose="backup " + sys.argv[2])
lock.acquire()
repo.write_chunk(sys.argv[2].encode() * 4096)  # staged in tmp/, not flushed
print("staged", flush=True)
sys.stdin.readline()  # the test says when to go on (or kills us)
repo.flush()
lock.release()
print("flushed", flush=True)
"""


def _writer(repo: Repository, tag: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(repo.path), tag],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "staged\n"
    return proc


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


@pytest.fixture
def writers() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def staged(repo: Repository) -> list[str]:
    return sorted(p.name for p in (repo.path / "tmp").iterdir())


def test_a_killed_writers_files_go_and_a_live_writers_stay_and_still_flush(
    repo: Repository, writers: list[subprocess.Popen[str]]
) -> None:
    live = _writer(repo, "live")
    killed = _writer(repo, "killed")
    writers += [live, killed]
    assert len(staged(repo)) == 2
    killed.send_signal(signal.SIGKILL)
    killed.wait()

    removed = repo.remove_stale_staged()  # what the next backup does first
    assert [staged_owner(info.name).pid for info in removed] == [killed.pid]  # type: ignore[union-attr]
    (left,) = staged(repo)
    assert staged_owner(f"tmp/{left}").pid == live.pid  # type: ignore[union-attr]

    assert live.stdin is not None and live.stdout is not None
    live.stdin.write("go\n")
    live.stdin.flush()
    assert live.stdout.readline() == "flushed\n" and live.wait() == 0
    assert staged(repo) == []
    assert repo.has_chunk(repo.chunk_id(b"live" * 4096))
    assert not repo.has_chunk(repo.chunk_id(b"killed" * 4096))


def test_own_files_are_kept_but_not_those_of_an_earlier_process_with_the_same_pid(repo: Repository) -> None:
    repo.write_chunk(b"mine" * 4096)
    (mine,) = staged(repo)
    owner = staged_owner(f"tmp/{mine}")
    assert owner is not None and owner.ours and owner.pid == os.getpid()
    earlier = f"{owner.host}-{owner.pid}-{'0' * 8}-{'1' * 16}"  # our pid, another process token
    (repo.path / "tmp" / earlier).write_bytes(b"left by a killed run that had our pid")
    assert [info.name for info in repo.remove_stale_staged()] == [f"tmp/{earlier}"]
    assert staged(repo) == [mine]
    repo.flush()
    assert staged(repo) == []


def test_other_hosts_writers_are_known_by_their_locks(repo: Repository) -> None:
    """A writer on another host cannot be asked: a live lock of that host and pid keeps its files;
    without one a file goes once older than the grace (a writer stages its lock file before it holds
    the lock); an older version's name goes only when no other process holds a lock."""
    now = datetime.now(timezone.utc)
    tmp = repo.path / "tmp"
    locked = tmp / f"{host_tag('nas2')}-4242-{'a' * 8}-{'1' * 16}"
    orphan = tmp / f"{host_tag('nas2')}-4343-{'a' * 8}-{'2' * 16}"
    young = tmp / f"{host_tag('nas2')}-4444-{'a' * 8}-{'3' * 16}"
    legacy = tmp / ("f" * 32)
    for path in (locked, orphan, young, legacy):
        path.write_bytes(b"x")
    hour_ago = time.time() - 3600
    for path in (locked, orphan, legacy):
        os.utime(path, (hour_ago, hour_ago))
    lock = LockInfo("c" * 32, False, "nas2", 4242, now - timedelta(minutes=3), "backup remote")
    repo.backend.put(lock.name, [lock.to_json()])

    def names() -> set[str]:
        return {info.name.rpartition("/")[2] for info in stale_staged_files(repo.backend)}

    assert names() == {orphan.name}  # the remote lock is live: legacy files may be that writer's
    stale = LockInfo("c" * 32, False, "nas2", 4242, now - timedelta(minutes=31), "backup remote")
    repo.backend.replace(lock.name, [stale.to_json()])  # not refreshed for 30 minutes: stale
    assert names() == {orphan.name, locked.name, legacy.name}
    assert young.name not in {info.name.rpartition("/")[2] for info in repo.remove_stale_staged()}
    assert staged(repo) == [young.name]


def test_a_failed_run_leaves_nothing_staged(repo: Repository) -> None:
    with pytest.raises(RuntimeError, match="host went away"), repo.discard_pending_on_exit():
        writer = repo.chunk_writer(2 * CHUNK_SIZE)
        writer.write(0, os.urandom(CHUNK_SIZE))
        assert len(staged(repo)) == 1
        raise RuntimeError("host went away")
    assert staged(repo) == [] and list(repo.iter_chunk_ids()) == []
