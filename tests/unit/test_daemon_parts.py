"""The daemon's small parts: sd_notify client, single-instance lock, debouncer and event filter."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from reconciler.daemon.lock import AlreadyRunning, InstanceLock, running_daemon
from reconciler.daemon.notify import Notifier
from reconciler.daemon.watch import ConfigWatcher, Debouncer, relevant


def test_notifier_sends_datagrams_to_an_abstract_socket() -> None:
    name = f"esxi-reconciler-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(10)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready("first cycle\nstarted")
        assert server.recv(1024) == b"READY=1\nSTATUS=first cycle started"
        assert notifier.stopping()
        assert server.recv(1024) == b"STOPPING=1"
        notifier.close()
    finally:
        server.close()


def test_notifier_without_systemd_does_nothing_and_a_vanished_socket_is_not_fatal(tmp_path: Path) -> None:
    assert not Notifier({}).enabled
    assert not Notifier({}).ready()
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")})
    assert gone.enabled
    assert not gone.watchdog()


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(environ: dict[str, str], interval: float | None) -> None:
    assert Notifier(environ).watchdog_interval == interval


def test_a_second_instance_lock_names_the_holder(tmp_path: Path) -> None:
    assert running_daemon(tmp_path) == (False, None)
    with InstanceLock(tmp_path):
        assert running_daemon(tmp_path) == (True, os.getpid())
        with pytest.raises(AlreadyRunning, match=f"PID {os.getpid()}") as error:
            InstanceLock(tmp_path).acquire()
        assert error.value.pid == os.getpid()
    assert running_daemon(tmp_path) == (False, None)
    with InstanceLock(tmp_path):  # released: it can be taken again
        pass


def test_debouncer_fires_once_after_a_quiet_period() -> None:
    assert Debouncer(quiet=2.0).deadline is None  # nothing pending
    debouncer = Debouncer(quiet=2.0)
    assert not debouncer.take(100.0)
    for t in (100.0, 100.5, 101.0, 102.5):  # a burst: each event moves the deadline
        debouncer.note(t)
    assert debouncer.deadline == 104.5
    assert not debouncer.take(104.0)
    assert debouncer.take(104.5)
    assert not debouncer.take(110.0)  # once per burst
    assert debouncer.deadline is None


@pytest.mark.parametrize(
    ("path", "event", "expected"),
    [
        ("/cfg/hosts/esxi1.yaml", "modified", True),
        ("/cfg/hosts/esxi1.yaml", "closed", True),
        ("/cfg/new.yaml", "created", True),
        ("/cfg/old.yaml", "deleted", True),
        ("/cfg/a.yaml", "moved", True),
        ("/cfg/hosts/esxi1.yaml", "opened", False),  # our own reload reads the files
        ("/cfg/hosts/esxi1.yaml", "closed_no_write", False),
        ("/cfg/hosts/esxi1.yaml", "attrib", False),
        ("/cfg/.git/HEAD", "modified", True),  # a checkout or commit changes the revision
        ("/cfg/.git/refs/heads/main", "created", True),
        ("/cfg/.git/objects/ab/cdef", "created", False),
        ("/cfg/.git/index.lock", "created", False),
    ],
)
def test_only_events_that_can_change_the_config_count(path: str, event: str, expected: bool) -> None:
    assert relevant(path, Path("/cfg"), event) is expected


def test_the_watcher_reports_a_changed_file(tmp_path: Path) -> None:
    seen = threading.Event()
    watcher = ConfigWatcher(tmp_path, lambda path: seen.set())
    assert watcher.start()
    try:
        (tmp_path / "hosts").mkdir()
        (tmp_path / "hosts" / "esxi1.yaml").write_text("kind: Host\n")
        assert seen.wait(20)
    finally:
        watcher.stop()


def test_watching_a_missing_directory_is_reported_not_raised(tmp_path: Path) -> None:
    assert not ConfigWatcher(tmp_path / "missing", lambda path: None).start()
