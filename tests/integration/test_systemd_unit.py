"""The systemd unit and the daemon as systemd runs it.

- ``systemd-analyze verify`` must print nothing at all (a misspelt key is only a warning, exit 0);
- ``systemd-analyze security --offline=yes``: exposure at most :data:`MAX_EXPOSURE`;
- ``esxi-reconciler run`` as a subprocess talking to a notify socket the test binds: READY, STATUS,
  WATCHDOG pings, RELOADING on SIGHUP, STOPPING and exit 0 on SIGTERM; a second instance exits 1;
- under a real service manager (``systemd-run``) where there is one.

No ESXi host is needed (the config has only a repository), so these tests do not use the lab.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "esxi-reconciler.service"
MAX_EXPOSURE = 2.0
"""systemd's 0-10 exposure scale (1.4 when written); ``--threshold`` takes it times ten."""
WAIT = 30.0

CONFIG = """\
apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {name: r}
spec:
  backend: {type: local, path: /srv/esxi-reconciler-test-repo}
  encryption: {enabled: false}
"""

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is missing: install the Debian package 'systemd' (make apt does)",
)


def unit_lines() -> list[tuple[str, str]]:
    out = []
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.append((key, value))
    return out


def verifiable_copy(directory: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at an existing program (verify checks it exists)."""
    program = shutil.which("esxi-reconciler") or str(Path(sys.executable).with_name("esxi-reconciler"))
    assert Path(program).exists(), "the esxi-reconciler console script is not installed"
    body = (text if text is not None else UNIT.read_text()).replace("/usr/bin/esxi-reconciler", program)
    copy = directory / UNIT.name
    copy.write_text(body)
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=120, check=False
    )


@needs_analyze
def test_systemd_analyze_verify_prints_nothing(tmp_path: Path) -> None:
    result = analyze("verify", "--man=no", str(verifiable_copy(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).strip() == ""


@needs_analyze
def test_the_drop_in_example_verifies_with_the_unit(tmp_path: Path) -> None:
    copy = verifiable_copy(tmp_path)
    program = shutil.which("esxi-reconciler") or str(Path(sys.executable).with_name("esxi-reconciler"))
    drop_ins = tmp_path / f"{UNIT.name}.d"
    drop_ins.mkdir()
    example = (UNIT.parent / f"{UNIT.name}.d" / "local.conf.example").read_text()
    (drop_ins / "local.conf").write_text(example.replace("/opt/esxi-reconciler/bin/esxi-reconciler", program))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},  # so the drop-in directory is read
    )
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).strip() == ""


@needs_analyze
def test_the_verify_check_would_catch_a_misspelt_key(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("WatchdogSec=", "WatchdogSecs=")
    result = analyze("verify", "--man=no", str(verifiable_copy(tmp_path, broken)))
    assert "WatchdogSecs" in result.stdout + result.stderr


@needs_analyze
def test_exposure_is_below_the_threshold(tmp_path: Path) -> None:
    copy = verifiable_copy(tmp_path)
    result = analyze("security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE


def test_the_unit_is_a_notify_service_that_outlasts_the_daemon_s_stop_timeout() -> None:
    lines = unit_lines()
    settings = dict(lines)
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "WatchdogSec" in settings
    stop_timeout = re.search(r"--stop-timeout (\d+)s", settings["ExecStart"])
    assert stop_timeout is not None
    timeout_stop = re.fullmatch(r"(\d+)s", settings["TimeoutStopSec"])
    assert timeout_stop is not None
    assert int(timeout_stop.group(1)) > int(stop_timeout.group(1))
    assert [k for k, _ in lines].count("LoadCredential") >= 2
    for key in ("StateDirectory", "CacheDirectory", "LogsDirectory", "ConfigurationDirectory"):
        assert settings[key] == "esxi-reconciler"


# -- the daemon as a subprocess with a notify socket -----------------------------------------------


class NotifySocket:
    """A bound AF_UNIX datagram socket standing in for systemd's, read by a thread."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="sdn")  # short: sun_path holds 108 bytes
        self.path = os.path.join(self.directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except OSError:
                return

    def having(self, field: str) -> list[str]:
        return [m for m in list(self.messages) if field in m.split("\n")]

    def wait_for(self, what: str, count: int = 1, prefix: bool = False) -> list[str]:
        deadline = time.monotonic() + WAIT
        while True:
            found = (
                [m for m in list(self.messages) if any(line.startswith(what) for line in m.split("\n"))]
                if prefix
                else self.having(what)
            )
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} (x{count}) in {self.messages}")
            time.sleep(0.02)

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "repo.yaml").write_text(CONFIG)
    return directory


def daemon_command(config_dir: Path, state_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "reconciler.cli",
        "--config",
        str(config_dir),
        "--state-dir",
        str(state_dir),
        "--log-format",
        "json",
        "run",
        "--resync",
        "1h",
        *extra,
    ]


def test_daemon_speaks_sd_notify_and_stops_cleanly_on_sigterm(
    tmp_path: Path, config_dir: Path, notify: NotifySocket
) -> None:
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    state = tmp_path / "state"
    process = subprocess.Popen(
        daemon_command(config_dir, state), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1", count=3)
        statuses = notify.wait_for("STATUS=cycle 1: ", prefix=True)
        assert "next " in statuses[-1]

        second = subprocess.run(
            daemon_command(config_dir, state, "--once"),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        assert second.returncode == 1
        assert f"PID {process.pid}" in second.stderr

        process.send_signal(signal.SIGHUP)
        (reloading,) = notify.wait_for("RELOADING=1")
        assert re.search(r"^MONOTONIC_USEC=\d+$", reloading, re.MULTILINE)
        notify.wait_for("READY=1", count=2)

        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0
        notify.wait_for("STOPPING=1")
    finally:
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate(timeout=WAIT)
    assert b'"event": "daemon.stopped"' in stderr


def _service_manager() -> str | None:
    """Why the daemon cannot be run under systemd here, or None when it can."""
    if shutil.which("systemd-run") is None:
        return "systemd-run is not installed"
    if not Path("/run/systemd/system").is_dir():
        return "no systemd service manager in this machine (not booted with systemd, e.g. a container)"
    if os.geteuid() != 0:
        return "needs root to start a transient system service"
    return None


@pytest.mark.skipif(_service_manager() is not None, reason=str(_service_manager()))
def test_daemon_under_a_real_service_manager(tmp_path: Path, config_dir: Path) -> None:
    state = tmp_path / "state"
    properties = [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "NoNewPrivileges=yes",
        "MemoryDenyWriteExecute=yes",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "LockPersonality=yes",
        f"WorkingDirectory={ROOT}",
    ]
    command = ["systemd-run", "--wait", "--collect", "--quiet"]
    for prop in properties:
        command += ["--property", prop]
    result = subprocess.run(
        [*command, *daemon_command(config_dir, state, "--once")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (state / "status.db").exists()
