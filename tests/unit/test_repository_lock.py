"""Repository locks: shared/exclusive conflicts, stale-lock rules, refresh, release."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.repository import LocalBackend, LockedError, RepositoryLock, remove_stale_locks
from reconciler.repository.errors import FormatError
from reconciler.repository.lock import LockInfo, list_locks

T0 = datetime(2026, 11, 26, 2, 0, tzinfo=timezone.utc)


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    for d in ("locks", "tmp"):
        (tmp_path / d).mkdir()
    return LocalBackend(tmp_path)


def lock(
    backend: LocalBackend,
    exclusive: bool,
    *,
    clock: FakeClock | None = None,
    host: str = "nas1",
    pid: int = 100,
    alive: set[int] | None = None,
    purpose: str = "",
) -> RepositoryLock:
    living = {100, 200, 300} if alive is None else alive
    return RepositoryLock(
        backend,
        exclusive=exclusive,
        purpose=purpose,
        clock=clock or FakeClock(),
        host=host,
        pid=pid,
        alive=lambda p: p in living,
    )


class TestConflicts:
    def test_shared_locks_coexist(self, backend: LocalBackend) -> None:
        a = lock(backend, False, pid=100)
        b = lock(backend, False, pid=200)
        a.acquire()
        b.acquire()
        assert len(list_locks(backend)) == 2
        a.release()
        b.release()
        assert list_locks(backend) == []

    def test_exclusive_conflicts_with_shared_and_names_the_holder(self, backend: LocalBackend) -> None:
        lock(backend, False, pid=100, purpose="backup nightly/web01").acquire()
        with pytest.raises(LockedError) as err:
            lock(backend, True, pid=200).acquire()
        message = str(err.value)
        assert "pid 100 on nas1" in message and "backup nightly/web01" in message
        assert "2026-11-26T02:00:00" in message
        assert len(list_locks(backend)) == 1  # the loser removed its own file

    def test_shared_conflicts_with_exclusive(self, backend: LocalBackend) -> None:
        lock(backend, True, pid=100, purpose="gc").acquire()
        with pytest.raises(LockedError, match=r"locked exclusively by pid 100 on nas1 .*\(gc\)"):
            lock(backend, False, pid=200).acquire()

    def test_exclusive_conflicts_with_exclusive(self, backend: LocalBackend) -> None:
        lock(backend, True, pid=100).acquire()
        with pytest.raises(LockedError):
            lock(backend, True, pid=200).acquire()

    def test_context_manager_releases_on_error(self, backend: LocalBackend) -> None:
        with pytest.raises(RuntimeError), lock(backend, True):
            raise RuntimeError("boom")
        assert list_locks(backend) == []
        lock(backend, True).acquire()


class TestStale:
    def test_lock_older_than_30_minutes_is_taken_over(self, backend: LocalBackend) -> None:
        clock = FakeClock()
        lock(backend, False, clock=clock, host="other-host", pid=999).acquire()
        clock.now = T0 + timedelta(minutes=29)
        with pytest.raises(LockedError):
            lock(backend, True, clock=clock).acquire()
        clock.now = T0 + timedelta(minutes=31)
        taker = lock(backend, True, clock=clock)
        taker.acquire()
        assert [i.id for i in list_locks(backend)] == [taker.info.id if taker.info else ""]

    def test_lock_of_a_dead_process_on_this_host_is_stale(self, backend: LocalBackend) -> None:
        """A fresh lock of a process of this host that is gone is taken over at once (no 30 minutes)."""
        dead = lock(backend, True, pid=4242)  # 4242 is not alive
        dead.acquire()
        taker = lock(backend, True, pid=100)
        taker.acquire()
        assert dead.info is not None and taker.info is not None
        assert [(i.id, i.pid) for i in list_locks(backend)] == [(taker.info.id, 100)]

    def test_dead_pid_on_another_host_is_not_stale(self, backend: LocalBackend) -> None:
        lock(backend, True, host="other", pid=4242).acquire()
        with pytest.raises(LockedError, match="on other"):
            lock(backend, True, pid=100).acquire()

    def test_refresh_keeps_a_lock_alive(self, backend: LocalBackend) -> None:
        clock = FakeClock()
        held = lock(backend, False, clock=clock, host="other", pid=1)
        held.acquire()
        clock.now = T0 + timedelta(minutes=25)
        held.refresh()
        clock.now = T0 + timedelta(minutes=45)
        with pytest.raises(LockedError):
            lock(backend, True, clock=clock).acquire()

    def test_lost_lock_is_reported_on_refresh(self, backend: LocalBackend) -> None:
        held = lock(backend, False)
        held.acquire()
        assert held.info is not None
        backend.delete(held.info.name)
        with pytest.raises(LockedError, match="was removed"):
            held.refresh()
        with pytest.raises(LockedError):
            held.check()

    def test_remove_stale_locks(self, backend: LocalBackend) -> None:
        clock = FakeClock()
        lock(backend, False, clock=clock, host="h", pid=1).acquire()
        lock(backend, False, clock=clock, pid=100).acquire()
        clock.now = T0 + timedelta(hours=1)
        removed = remove_stale_locks(backend, clock=clock, host="nas1", alive=lambda p: True)
        assert len(removed) == 2 and list_locks(backend) == []

    def test_refresher_thread_refreshes(self, backend: LocalBackend) -> None:
        clock = FakeClock()
        held = RepositoryLock(
            backend, exclusive=False, clock=clock, refresh_interval=timedelta(milliseconds=10)
        )
        held.acquire()
        clock.now = T0 + timedelta(minutes=3)
        held.start_refresher()
        import time

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            (info,) = list_locks(backend)
            if info.time == clock.now:
                break
            time.sleep(0.01)
        held.release()
        assert info.time == T0 + timedelta(minutes=3)


class TestLockFile:
    def test_format(self, backend: LocalBackend, tmp_path: Path) -> None:
        held = lock(backend, True, purpose="gc")
        held.acquire()
        (path,) = (tmp_path / "locks").iterdir()
        doc = json.loads(path.read_text())
        assert doc == {
            "version": 1,
            "id": path.stem,
            "exclusive": True,
            "host": "nas1",
            "pid": 100,
            "time": "2026-11-26T02:00:00.000000+00:00",
            "purpose": "gc",
        }

    def test_unknown_version_is_rejected(self) -> None:
        info = LockInfo("a" * 32, True, "h", 1, T0)
        doc = json.loads(info.to_json())
        doc["version"] = 5
        with pytest.raises(FormatError, match="unsupported lock version 5"):
            LockInfo.from_json("locks/x.json", json.dumps(doc).encode())
