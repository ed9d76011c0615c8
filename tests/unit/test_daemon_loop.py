"""The daemon loop driven with an injected cycle: no host, no repository, real files and sockets.

Each test runs ``Daemon.run()`` (in a thread, or in the main thread when real signals are sent) and
waits for what it expects with a generous deadline; nothing asserts how long anything took.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.config import DesiredState, load_config
from reconciler.daemon import CycleContext, CycleResult, Daemon, Notifier
from reconciler.status.store import StatusStore, status_path

WAIT = 20.0

VALID = """\
apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: {name}}}
spec:
  backend: {{type: local, path: /srv/{name}}}
  encryption: {{enabled: false}}
"""
INVALID = VALID.replace("enabled: false", "enabled: maybe")


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


@dataclass
class Recorder:
    """An injected cycle: records what each cycle saw; ``gate`` (if set) blocks cycles until opened."""

    contexts: list[CycleContext] = field(default_factory=list)
    result: CycleResult = field(default_factory=lambda: CycleResult(ok=True, summary="all good"))
    raise_first: bool = False
    gate: threading.Event | None = None
    honour_cancel: bool = True
    cancelled: list[bool] = field(default_factory=list)

    def __call__(self, ctx: CycleContext) -> CycleResult:
        self.contexts.append(ctx)
        if self.raise_first and len(self.contexts) == 1:
            raise RuntimeError("boom")
        if self.gate is not None:
            while not self.gate.wait(0.01):
                if self.honour_cancel and ctx.cancel.is_set():
                    break
        self.cancelled.append(ctx.cancel.is_set())
        return self.result

    @property
    def revisions(self) -> list[str]:
        return [c.desired.revision.id for c in self.contexts]


class Loads:
    """The real config loader, counted."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, path: Path) -> DesiredState:
        self.count += 1
        return load_config(path)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "repo.yaml").write_text(VALID.format(name="r"))
    return directory


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket standing in for systemd's (short path: sun_path is 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="sdn")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(WAIT)
    yield sock, path
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


class Messages:
    """Collects the datagrams sent to the test's notify socket, in a background thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.items: list[str] = []
        self._sock = sock
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                self.items.append(self._sock.recv(4096).decode())
            except OSError:
                return

    def having(self, field: str) -> list[str]:
        return [m for m in list(self.items) if field in m.split("\n")]


def start(daemon: Daemon) -> tuple[threading.Thread, list[int]]:
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(daemon.run()), daemon=True)
    thread.start()
    return thread, codes


def stop(daemon: Daemon, thread: threading.Thread, codes: list[int]) -> int:
    daemon.request_stop()
    thread.join(WAIT)
    assert not thread.is_alive(), "daemon did not stop"
    return codes[0]


def make(config_dir: Path, tmp_path: Path, cycle: Recorder, **kwargs: object) -> Daemon:
    options: dict[str, object] = {
        "resync": 3600.0,
        "debounce": 0.1,
        "stop_timeout": 5.0,
        "min_interval": 0.01,
        "watch": False,
    }
    options.update(kwargs)
    options.setdefault("notifier", Notifier({}))
    return Daemon(config_dir, tmp_path / "state", cycle=cycle, **options)  # type: ignore[arg-type]


def test_a_burst_of_file_events_reloads_once_and_runs_one_cycle_with_the_new_revision(
    config_dir: Path, tmp_path: Path
) -> None:
    cycle, loads = Recorder(), Loads()
    daemon = make(config_dir, tmp_path, cycle, watch=True, load=loads, debounce=0.3)
    thread, codes = start(daemon)
    wait_for(lambda: len(cycle.contexts) == 1 and daemon._worker is None, "the first cycle")
    first = cycle.revisions[0]

    for name in ("a", "b", "c", "d"):
        (config_dir / f"{name}.yaml").write_text(VALID.format(name=name))
    wait_for(lambda: len(cycle.contexts) == 2, "a cycle after the edits")

    assert stop(daemon, thread, codes) == 0
    assert loads.count == 2  # start-up + one for the whole burst
    assert cycle.revisions[1] != first
    assert set(cycle.contexts[1].desired.repositories) == {"r", "a", "b", "c", "d"}


def test_an_invalid_config_keeps_the_last_good_one_and_is_reported(config_dir: Path, tmp_path: Path) -> None:
    cycle = Recorder()
    daemon = make(config_dir, tmp_path, cycle)
    thread, codes = start(daemon)
    wait_for(lambda: len(cycle.contexts) == 1, "the first cycle")
    good = cycle.revisions[0]

    (config_dir / "repo.yaml").write_text(INVALID.format(name="r"))
    daemon.request_reload()
    wait_for(lambda: len(cycle.contexts) == 2, "a cycle after the reload")
    assert cycle.revisions[1] == good
    assert daemon.config_issues
    with StatusStore.open(status_path(tmp_path / "state"), readonly=True) as store:
        (config,) = [c for c in store.conditions() if c.kind == "config"]
    assert (config.status, config.reason, config.revision) == ("Stalled", "InvalidConfig", good)
    assert config.message.startswith("repo.yaml:6:")

    (config_dir / "repo.yaml").write_text(VALID.format(name="fixed"))
    daemon.request_reload()
    wait_for(lambda: len(cycle.contexts) == 3, "a cycle after the fix")
    assert stop(daemon, thread, codes) == 0
    assert list(cycle.contexts[2].desired.repositories) == ["fixed"]
    assert not daemon.config_issues


def test_a_failed_git_merge_keeps_the_last_good_config_and_names_the_marker(
    config_dir: Path, tmp_path: Path
) -> None:
    """A ``git pull`` on the NAS that stopped in a conflict leaves markers in a file: the daemon goes on
    with the config it had, and the condition names the file, the marker's line and the fix."""
    cycle = Recorder()
    daemon = make(config_dir, tmp_path, cycle)
    thread, codes = start(daemon)
    wait_for(lambda: len(cycle.contexts) == 1, "the first cycle")
    good = cycle.revisions[0]

    ours, theirs = VALID.format(name="r").splitlines(), VALID.format(name="offsite").splitlines()
    conflicted = [*ours[:3], "<<<<<<< HEAD", *ours[3:], "=======", *theirs[3:], ">>>>>>> offsite-repo"]
    (config_dir / "repo.yaml").write_text("\n".join(conflicted) + "\n")
    daemon.request_reload()
    wait_for(lambda: len(cycle.contexts) == 2, "a cycle after the reload")
    assert cycle.revisions[1] == good
    assert list(cycle.contexts[1].desired.repositories) == ["r"]
    assert [str(i) for i in daemon.config_issues] == [
        "repo.yaml:4:1 unresolved merge conflict: git conflict marker '<<<<<<< HEAD' (a merge left both"
        " versions in the file); resolve the conflict (keep the right lines, delete the <<<<<<<, ======= and"
        " >>>>>>> lines) and commit"
    ]
    with StatusStore.open(status_path(tmp_path / "state"), readonly=True) as store:
        (config,) = [c for c in store.conditions() if c.kind == "config"]
    assert (config.status, config.reason, config.revision) == ("Stalled", "InvalidConfig", good)
    assert config.message.startswith("repo.yaml:4:1 unresolved merge conflict: git conflict marker")

    (config_dir / "repo.yaml").write_text(VALID.format(name="offsite"))  # resolved and committed
    daemon.request_reload()
    wait_for(lambda: len(cycle.contexts) == 3, "a cycle after the fix")
    assert stop(daemon, thread, codes) == 0
    assert list(cycle.contexts[2].desired.repositories) == ["offsite"]
    assert not daemon.config_issues


def test_an_invalid_first_config_runs_nothing_until_fixed(config_dir: Path, tmp_path: Path) -> None:
    (config_dir / "repo.yaml").write_text(INVALID.format(name="r"))
    cycle = Recorder()
    daemon = make(config_dir, tmp_path, cycle, watch=True, debounce=0.1)
    thread, codes = start(daemon)
    wait_for(lambda: bool(daemon.config_issues), "the config to be rejected")
    assert thread.is_alive()  # it did not exit
    assert cycle.contexts == []

    (config_dir / "repo.yaml").write_text(VALID.format(name="r"))
    wait_for(lambda: len(cycle.contexts) == 1, "a cycle once the config is fixed")
    assert stop(daemon, thread, codes) == 0


def test_an_exception_in_a_cycle_does_not_stop_the_daemon(config_dir: Path, tmp_path: Path) -> None:
    cycle = Recorder(raise_first=True)
    daemon = make(config_dir, tmp_path, cycle)
    thread, codes = start(daemon)
    wait_for(lambda: daemon.last_result is not None, "the failed cycle to finish")
    assert daemon.last_result is not None
    assert not daemon.last_result.ok
    assert "RuntimeError: boom" in daemon.last_result.summary

    daemon.request_reload()
    wait_for(lambda: len(cycle.contexts) == 2 and daemon._worker is None, "the next cycle")
    assert stop(daemon, thread, codes) == 0


def test_cycles_repeat_at_the_resync_and_at_the_plan_s_next_due(config_dir: Path, tmp_path: Path) -> None:
    due_soon = Recorder(result=CycleResult(ok=True, summary="x", next_due=datetime.now(timezone.utc)))
    daemon = make(config_dir, tmp_path, due_soon, resync=3600.0)
    thread, codes = start(daemon)
    wait_for(lambda: len(due_soon.contexts) >= 2, "a cycle at next_due despite a one-hour resync")
    assert stop(daemon, thread, codes) == 0

    resync = Recorder()
    daemon = make(config_dir, tmp_path, resync, resync=0.05)
    thread, codes = start(daemon)
    wait_for(lambda: len(resync.contexts) >= 3, "resync cycles")
    assert stop(daemon, thread, codes) == 0


def test_stop_cancels_the_running_cycle_and_exits_zero(config_dir: Path, tmp_path: Path) -> None:
    cycle = Recorder(gate=threading.Event())
    daemon = make(config_dir, tmp_path, cycle)
    thread, codes = start(daemon)
    wait_for(lambda: len(cycle.contexts) == 1, "the cycle to start")

    assert stop(daemon, thread, codes) == 0
    assert cycle.cancelled == [True]
    assert not daemon.abandoned


def test_stop_waits_at_most_the_stop_timeout_for_a_cycle_that_ignores_cancel(
    config_dir: Path, tmp_path: Path
) -> None:
    gate = threading.Event()
    cycle = Recorder(gate=gate, honour_cancel=False)
    daemon = make(config_dir, tmp_path, cycle, stop_timeout=0.2)
    thread, codes = start(daemon)
    wait_for(lambda: len(cycle.contexts) == 1, "the cycle to start")
    worker = daemon._worker
    try:
        assert stop(daemon, thread, codes) == 0
        assert daemon.abandoned
        assert cycle.cancelled == []  # still running when run() returned
    finally:
        gate.set()
        if worker is not None:
            worker.join(WAIT)


def test_once_runs_one_cycle_and_exits_with_its_result(config_dir: Path, tmp_path: Path) -> None:
    ok = Recorder()
    assert make(config_dir, tmp_path, ok, once=True).run() == 0
    assert len(ok.contexts) == 1

    failed = Recorder(result=CycleResult(ok=False, summary="1 failed"))
    assert make(config_dir, tmp_path, failed, once=True).run() == 1

    (config_dir / "repo.yaml").write_text(INVALID.format(name="r"))
    none = Recorder()
    assert make(config_dir, tmp_path, none, once=True).run() == 78  # EX_CONFIG, as every verb
    assert none.contexts == []


def test_a_second_daemon_on_the_same_state_dir_exits_1(config_dir: Path, tmp_path: Path) -> None:
    cycle = Recorder()
    first = make(config_dir, tmp_path, cycle)
    thread, codes = start(first)
    wait_for(lambda: len(cycle.contexts) == 1, "the first daemon")

    assert make(config_dir, tmp_path, Recorder(), once=True).run() == 1
    assert stop(first, thread, codes) == 0


def test_systemd_hears_ready_status_watchdog_reloading_and_stopping(
    config_dir: Path, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    messages = Messages(sock)
    gate = threading.Event()
    cycle = Recorder(gate=gate)
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    daemon = make(config_dir, tmp_path, cycle, notifier=notifier)
    thread, codes = start(daemon)

    wait_for(lambda: bool(messages.having("READY=1")), "READY=1")
    assert len(cycle.contexts) == 1  # READY after the first cycle started
    # The pings go on while a (long) cycle runs: it runs beside the loop.
    wait_for(lambda: len(messages.having("WATCHDOG=1")) >= 3, "watchdog pings during the cycle")
    gate.set()
    wait_for(lambda: any("all good" in m for m in messages.having("READY=1") + messages.items), "STATUS")

    daemon.request_reload()
    wait_for(lambda: bool(messages.having("RELOADING=1")), "RELOADING=1")
    wait_for(lambda: len(messages.having("READY=1")) >= 2, "READY=1 after the reload")
    (reloading,) = messages.having("RELOADING=1")
    assert any(line.startswith("MONOTONIC_USEC=") for line in reloading.split("\n"))
    assert stop(daemon, thread, codes) == 0
    wait_for(lambda: bool(messages.having("STOPPING=1")), "STOPPING=1")
    statuses = [m for m in messages.items if m.startswith("STATUS=") or "\nSTATUS=" in m]
    assert any("cycle 1: all good; next " in m for m in statuses)


def test_real_signals_reload_and_stop_when_run_in_the_main_thread(config_dir: Path, tmp_path: Path) -> None:
    cycle = Recorder()
    daemon = make(config_dir, tmp_path, cycle)
    previous = signal.getsignal(signal.SIGTERM)

    def drive() -> None:
        wait_for(lambda: len(cycle.contexts) == 1 and daemon._worker is None, "the first cycle")
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(lambda: len(cycle.contexts) == 2, "the cycle after SIGHUP")
        os.kill(os.getpid(), signal.SIGTERM)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    assert daemon.run() == 0
    driver.join(WAIT)
    assert len(cycle.contexts) == 2
    assert signal.getsignal(signal.SIGTERM) is previous


def test_the_cycle_gets_the_daemon_s_clock(config_dir: Path, tmp_path: Path) -> None:
    simulated = datetime(2030, 1, 1, tzinfo=timezone.utc)
    cycle = Recorder()
    assert make(config_dir, tmp_path, cycle, once=True, clock=lambda: simulated).run() == 0
    assert cycle.contexts[0].now == simulated
    assert cycle.contexts[0].state_dir == tmp_path / "state"
    assert simulated - cycle.contexts[0].now == timedelta(0)


_STUCK_DAEMON = """
import sys, threading
from pathlib import Path
from reconciler.daemon import CycleResult, Daemon, Notifier
from reconciler.log import configure_logging

configure_logging("json")

def stuck(ctx):
    print("cycle started", flush=True)
    threading.Event().wait()  # ignores cancel: a host call that never returns
    return CycleResult(ok=True, summary="never")

daemon = Daemon(Path(sys.argv[1]), Path(sys.argv[2]), cycle=stuck, stop_timeout=600, watch=False,
                notifier=Notifier({}))
sys.exit(daemon.run())
"""


def test_a_second_sigterm_exits_at_once(config_dir: Path, tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", _STUCK_DAEMON, str(config_dir), str(tmp_path / "state")],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline().strip() == "cycle started"
        process.send_signal(signal.SIGTERM)  # waits up to 600 s for the stuck cycle ...
        for line in process.stderr:
            if '"daemon.stopping"' in line:
                break
        process.send_signal(signal.SIGTERM)  # ... unless told twice
        assert process.wait(WAIT) == 1
    finally:
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate(timeout=WAIT)
    assert "second SIGTERM, exiting at once" in stderr


class _LateWatcher:
    """A watcher whose events have not arrived yet (a busy machine delays the watcher thread)."""

    def __init__(self, directory: Path, on_change: object) -> None:
        pass

    def start(self) -> bool:
        return True

    def stop(self) -> None:
        pass


def test_a_resync_does_not_read_a_file_written_a_moment_ago(
    config_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen in CI: a resync read a file whose first half had just been written, before the watcher had
    reported it as being written. A config file changed within the quiet period is not read by a resync;
    once it has been quiet that long, the next resync reads it."""
    import reconciler.daemon.loop as loop

    monkeypatch.setattr(loop, "ConfigWatcher", _LateWatcher)
    cycle, loads = Recorder(), Loads()
    daemon = make(config_dir, tmp_path, cycle, watch=True, load=loads, resync=0.05, debounce=1.5)
    thread, codes = start(daemon)
    wait_for(lambda: len(cycle.contexts) >= 3, "resync cycles")
    (config_dir / "repo2.yaml").write_text(VALID.format(name="r2"))
    written = time.monotonic()
    before = len(cycle.contexts)
    wait_for(lambda: len(cycle.contexts) >= before + 3, "resync cycles after the write")
    if time.monotonic() - written < 1.5:  # still within the quiet period: the file was not read
        assert daemon.desired is not None and "r2" not in daemon.desired.repositories
    wait_for(
        lambda: daemon.desired is not None and "r2" in daemon.desired.repositories,
        "a resync reading the file once it has been quiet",
    )
    assert time.monotonic() - written >= 1.5 - 0.2  # never earlier than the quiet period (mtime resolution)
    assert stop(daemon, thread, codes) == 0


@pytest.mark.parametrize("watcher", ["late", "real"])
def test_a_file_open_for_writing_is_read_only_once_closed(
    config_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watcher: str
) -> None:
    """Seen in CI: a policy file whose first part (a valid config on its own) had been written and flushed
    was loaded while its writer still had it open. Whether the watcher's events come (``real``) or never
    do (``late``: a busy machine, or no inotify instance left), the kernel says the file is open for
    writing, so neither the debounced reload nor a resync reads it until it is closed."""
    import reconciler.daemon.loop as loop

    if watcher == "late":
        monkeypatch.setattr(loop, "ConfigWatcher", _LateWatcher)
    cycle, loads = Recorder(), Loads()
    daemon = make(config_dir, tmp_path, cycle, watch=True, load=loads, resync=0.05, debounce=0.2)
    thread, codes = start(daemon)
    wait_for(lambda: len(cycle.contexts) >= 3, "resync cycles")
    with (config_dir / "repo2.yaml").open("w") as f:
        f.write(VALID.format(name="r2"))
        f.flush()
        before = len(cycle.contexts)
        wait_for(lambda: len(cycle.contexts) >= before + 20, "resync cycles while the file is open")
        time.sleep(1.0)  # well past the quiet period: the first part alone is a valid config
        assert daemon.desired is not None and "r2" not in daemon.desired.repositories
        f.write("---\n" + VALID.format(name="r3"))
    wait_for(
        lambda: daemon.desired is not None and {"r2", "r3"} <= set(daemon.desired.repositories),
        "the whole file, read once it is closed",
    )
    assert stop(daemon, thread, codes) == 0
