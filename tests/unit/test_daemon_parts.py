"""The daemon's small parts: sd_notify client, single-instance lock, debouncer and event filter."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from reconciler.daemon.lock import AlreadyRunning, InstanceLock, running_daemon
from reconciler.daemon.notify import Notifier
from reconciler.daemon.watch import ConfigWatcher, Debouncer, config_file, open_for_writing, relevant


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


def test_a_file_being_written_holds_the_reload_until_it_is_closed() -> None:
    """A writer that pauses longer than the quiet period: the file is not read half-written (reliability
    suite: a policy file cut at a line end loaded as a valid config with fewer VMs)."""
    debouncer = Debouncer(quiet=2.0, hold=30.0)
    debouncer.note(100.0, "/cfg/p.yaml", "modified")
    assert debouncer.writing() == ("/cfg/p.yaml",)
    assert debouncer.deadline == 130.0  # give up waiting then; the close wakes the loop earlier
    assert not debouncer.take(110.0)
    debouncer.note(111.0, "/cfg/p.yaml", "closed")
    assert not debouncer.take(112.0) and debouncer.take(113.0) and not debouncer.abandoned
    # renamed away (an editor's own temporary file) or deleted: no longer being written
    debouncer.note(200.0, "/cfg/a.yaml", "modified")
    debouncer.note(200.0, "/cfg/b.yaml", "modified")
    debouncer.note(201.0, "/cfg/a.yaml", "moved")
    debouncer.note(201.0, "/cfg/b.yaml", "deleted")
    assert debouncer.take(203.0)
    # a writer that never closes holds the reload back for `hold` seconds only
    debouncer.note(300.0, "/cfg/c.yaml", "modified")
    assert not debouncer.take(329.0)
    assert debouncer.take(330.0) and debouncer.abandoned == ("/cfg/c.yaml",)
    assert debouncer.writing() == ()


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


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/cfg/p.yaml", True),
        ("/cfg/hosts/esxi1.yml", True),
        ("/cfg/.p.yaml.swp", False),  # vim's swap file
        ("/cfg/p.yaml~", False),  # a backup copy
        ("/cfg/4913", False),  # vim's check that it may write the directory
        ("/cfg/.#p.yaml", False),  # emacs' lock
        ("/cfg/.git/HEAD", False),
        ("/cfg/p.yaml.tmp", False),
        ("/elsewhere/p.yaml", False),
    ],
)
def test_only_files_the_loader_reads_are_tracked_while_written(path: str, expected: bool) -> None:
    assert config_file(path, Path("/cfg")) is expected


def test_the_watcher_reports_a_changed_file(tmp_path: Path) -> None:
    seen = threading.Event()
    watcher = ConfigWatcher(tmp_path, lambda path, event: seen.set())
    assert watcher.start()
    try:
        (tmp_path / "hosts").mkdir()
        (tmp_path / "hosts" / "esxi1.yaml").write_text("kind: Host\n")
        assert seen.wait(20)
    finally:
        watcher.stop()


def test_watching_a_missing_directory_is_reported_not_raised(tmp_path: Path) -> None:
    assert not ConfigWatcher(tmp_path / "missing", lambda path, event: None).start()


def test_the_kernel_says_which_config_files_are_open_for_writing(tmp_path: Path) -> None:
    """Whatever events the watcher did or did not deliver: files open for writing, by this process or
    another, are listed; files open only for reading, and files the loader does not read, are not."""
    config = tmp_path / "config"
    (config / "hosts").mkdir(parents=True)
    for name in ("p.yaml", "hosts/esxi1.yml", "r.yaml", ".p.yaml.swp"):
        (config / name).write_text("x: 1\n")
    assert open_for_writing(config) == ()
    other = subprocess.Popen(
        ["sh", "-c", 'exec 3>>"$1"; echo open; read line', "sh", str(config / "hosts/esxi1.yml")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline() == "open\n"
        with (config / "p.yaml").open("a"), (config / "r.yaml").open(), (config / ".p.yaml.swp").open("a"):
            assert open_for_writing(config) == (str(config / "hosts/esxi1.yml"), str(config / "p.yaml"))
        assert open_for_writing(config) == (str(config / "hosts/esxi1.yml"),)
    finally:
        other.communicate("\n", timeout=10)
    assert open_for_writing(config) == ()


def test_on_smb_or_nfs_the_kernel_is_not_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SMB refuses a read lease whenever the server granted no read oplock, writer or not: asked there,
    the kernel would hold every reload back for a minute. The watcher's events decide alone."""
    import reconciler.daemon.watch as watch

    (tmp_path / "p.yaml").write_text("x: 1\n")
    with (tmp_path / "p.yaml").open("a"):
        assert open_for_writing(tmp_path) == (str(tmp_path / "p.yaml"),)
        for network in ("cifs", "smb3", "nfs4", "fuse.sshfs"):
            monkeypatch.setattr(watch, "filesystem_type", lambda path, kind=network: kind)
            assert open_for_writing(tmp_path) == (), network


PROBE_LOOP = """
import sys
from pathlib import Path
from reconciler.daemon.watch import open_for_writing
root = Path(sys.argv[1])
print(sum(bool(open_for_writing(root)) for _ in range(10000)))
"""

WRITER_LOOP = """
import os, sys
while True:
    os.close(os.open(sys.argv[1], os.O_WRONLY))
"""


def test_a_writer_opening_a_file_during_the_probe_does_not_end_the_daemon(tmp_path: Path) -> None:
    """A writer that opens the file while the probe holds its read lease makes the kernel signal the
    holder, with SIGIO unless told otherwise, and SIGIO ends a process: without ``F_SETSIG`` a probe
    in a loop against a writer in a loop died of it within a second here."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "p.yaml").write_text("x: 1\n")
    writer = subprocess.Popen([sys.executable, "-c", WRITER_LOOP, str(config / "p.yaml")])
    try:
        probe = subprocess.run(
            [sys.executable, "-c", PROBE_LOOP, str(config)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        writer.kill()
        writer.wait()
    assert probe.returncode == 0, (probe.returncode, probe.stderr)
    assert int(probe.stdout) > 0  # the writer was seen: the two did run into each other
