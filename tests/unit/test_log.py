"""Logging: formats, levels, library records, journald priorities and, above all, redaction of secrets."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from reconciler.config import Secret
from reconciler.log import configure_logging, parse_level, redact_secrets, resolve_format

VALUE = "hunter2-Sup3rS3cret"


class TtyStream(io.StringIO):
    """A terminal, as far as ``isatty`` tells."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    reconciler_level = logging.getLogger("reconciler").level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("reconciler").setLevel(reconciler_level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(stream)]


# -- formats -----------------------------------------------------------------------------------------


def test_auto_is_console_on_a_terminal_and_json_otherwise() -> None:
    assert resolve_format("auto", TtyStream()) == "console"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("json", TtyStream()) == "json"
    assert resolve_format("console", io.StringIO()) == "console"


def test_auto_is_json_on_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with (tmp_path / "journal").open("w") as file:

        class JournalTty(io.TextIOWrapper):
            def isatty(self) -> bool:
                return True

        stream = JournalTty(io.FileIO(os.dup(file.fileno()), "w"))
        status = os.fstat(file.fileno())
        try:
            # Inherited from a service but naming another stream (a terminal started by a user service):
            # not the journal.
            monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino + 1}")
            assert resolve_format("auto", stream) == "console"
            monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
            assert resolve_format("auto", stream) == "json"
            monkeypatch.setenv("JOURNAL_STREAM", "garbage")
            assert resolve_format("auto", stream) == "console"
        finally:
            stream.close()


def test_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    assert configure_logging("auto", "info", stream=stream) == "json"
    before = datetime.now().astimezone()
    structlog.get_logger("reconciler.operations").info("backup.done", vm="db 01", seconds=412)
    structlog.get_logger("reconciler.operations").debug("hidden at info")
    (record,) = records(stream)
    timestamp = record.pop("timestamp")
    assert record == {
        "event": "backup.done",
        "vm": "db 01",
        "seconds": 412,
        "level": "info",
        "logger": "reconciler.operations",
    }
    assert timestamp.endswith("Z")
    parsed = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    assert parsed.utcoffset() == timedelta(0)
    assert abs(parsed - before) < timedelta(minutes=1)


def test_console_lines() -> None:
    stream = io.StringIO()
    assert configure_logging("console", "debug", stream=stream) == "console"
    structlog.get_logger("reconciler.operations").debug("plan.ready", actions=3)
    (line,) = lines(stream)
    assert "\x1b[" not in line  # no colours off a terminal
    assert "[debug" in line and "plan.ready" in line and "[reconciler.operations]" in line
    assert "actions=3" in line
    assert line[:4].isdigit() and line.split()[0].endswith("Z")


HOSTILE_NAME = "web01\n+ backup evil\x1b[2J\tend"


def test_console_lines_escape_names_json_keeps_them() -> None:
    """A VM name with a line break or an escape sequence cannot add a log line or drive the terminal;
    JSON lines keep the exact name (JSON escapes it itself)."""
    stream = io.StringIO()
    configure_logging("console", "info", stream=stream)
    log = structlog.get_logger("reconciler.operations")
    log.info("backup.vm_start", vm=HOSTILE_NAME, disk="a\x1b[2Jb\u2028c", host="esxi1")
    log.warning(f"event naming {HOSTILE_NAME}")
    logging.getLogger("reconciler.esxi.host").warning("removing snapshot of VM %s", HOSTILE_NAME)
    out = lines(stream)
    assert len(out) == 3 and not any("\x1b" in line or "\t" in line or "\u2028" in line for line in out), out
    # escaped once: a value with spaces as its repr (structlog's), one without by printable()
    assert "disk=a\\x1b[2Jb\\u2028c host=esxi1 vm='web01\\n+ backup evil\\x1b[2J\\tend'" in out[0]
    assert out[1].split("] ", 1)[1].startswith("event naming web01\\n+ backup evil\\x1b[2J\\tend")
    assert "removing snapshot of VM web01\\n+ backup evil\\x1b[2J\\tend" in out[2]

    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    structlog.get_logger("reconciler.operations").info("backup.vm_start", vm=HOSTILE_NAME)
    (record,) = records(stream)
    assert record["vm"] == HOSTILE_NAME


def test_console_colours_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = TtyStream()
    configure_logging("auto", stream=stream)
    structlog.get_logger("reconciler").info("hello")
    assert "\x1b[" in stream.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    stream = TtyStream()
    configure_logging("auto", stream=stream)
    structlog.get_logger("reconciler").info("hello")
    assert "\x1b[" not in stream.getvalue()


def test_journal_priority_prefixes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "journal"
    with path.open("w") as stream:
        status = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
        assert configure_logging("auto", "debug", stream=stream) == "json"
        log = structlog.get_logger("reconciler.daemon")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")
    written = path.read_text().splitlines()
    assert [line[: line.index("{")] for line in written] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert [json.loads(line[3:])["event"] for line in written] == ["d", "i", "w", "e", "c"]


def test_no_prefix_when_not_the_journal() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    structlog.get_logger("reconciler").warning("w")
    assert stream.getvalue().startswith("{")


def test_levels() -> None:
    assert parse_level("debug") == logging.DEBUG
    assert parse_level("WARNING") == logging.WARNING
    assert parse_level(logging.ERROR) == logging.ERROR
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        parse_level("loud")
    stream = io.StringIO()
    configure_logging("json", "warning", stream=stream)
    log = structlog.get_logger("reconciler.operations")
    log.info("not shown")
    log.warning("shown")
    assert [r["event"] for r in records(stream)] == ["shown"]


def test_library_records_go_through_it_from_warning_up() -> None:
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    logging.getLogger("paramiko.transport").info("Connected (version 2.0, client OpenSSH_9.2)")
    logging.getLogger("paramiko.transport").warning("Authentication (%s) failed.", "password")
    logging.getLogger("pyVmomi.VmomiSupport").error("bad response")
    (first, second) = records(stream)
    assert {k: first[k] for k in ("event", "level", "logger")} == {
        "event": "Authentication (password) failed.",
        "level": "warning",
        "logger": "paramiko.transport",
    }
    assert first["timestamp"].endswith("Z")
    assert (second["logger"], second["level"]) == ("pyVmomi.VmomiSupport", "error")


def test_reconfiguring_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", stream=first)
    configure_logging("console", stream=second)
    structlog.get_logger("reconciler").info("once")
    logging.getLogger("paramiko").warning("once too")
    assert first.getvalue() == ""
    assert len(lines(second)) == 2


def test_default_stream_is_the_current_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json")
    structlog.get_logger("reconciler").warning("to stderr")
    out, err = capsys.readouterr()
    assert out == "" and json.loads(err)["event"] == "to stderr"


# -- redaction ---------------------------------------------------------------------------------------


def test_secret_objects_show_only_their_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESXI1_PASSWORD", VALUE)
    secret = Secret("env", "ESXI1_PASSWORD")
    assert secret.reveal() == VALUE
    assert VALUE not in repr(secret) and VALUE not in str(secret)
    with capture_logs(processors=[redact_secrets]) as logs:
        structlog.get_logger().info("connect", credential=secret, all=[secret], by_host={"esxi1": secret})
    assert logs == [
        {
            "event": "connect",
            "credential": "Secret(env:ESXI1_PASSWORD)",
            "all": ["Secret(env:ESXI1_PASSWORD)"],
            "by_host": {"esxi1": "Secret(env:ESXI1_PASSWORD)"},
            "log_level": "info",
        }
    ]


def test_sensitive_keys_are_redacted_at_any_depth() -> None:
    with capture_logs(processors=[redact_secrets]) as logs:
        structlog.get_logger().info(
            "login",
            user="backup",
            password=VALUE,
            ssh_passphrase=VALUE.encode(),
            api_token=12345678,
            headers={"Authorization": f"Basic {VALUE}", "Accept": "application/json"},
            hosts=[{"name": "esxi1", "credentials": {"user": "root", "password": VALUE}}],
            secret=Secret("credential", "repo-nas-key"),
            resolve_secrets=True,
            client_secret=None,
        )
    assert logs == [
        {
            "event": "login",
            "user": "backup",
            "password": "***",
            "ssh_passphrase": "***",
            "api_token": "***",
            "headers": {"Authorization": "***", "Accept": "application/json"},
            "hosts": [{"name": "esxi1", "credentials": {"user": "root", "password": "***"}}],
            "secret": "***",
            "resolve_secrets": True,  # a flag holds no secret
            "client_secret": None,
            "log_level": "info",
        }
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"sshpass password={VALUE} vim-cmd", "sshpass password=*** vim-cmd"),
        (f"GET /sdk?access_token={VALUE}&x=1", "GET /sdk?access_token=***&x=1"),
        (f'PASSPHRASE = "{VALUE} with spaces" rest', "PASSPHRASE = *** rest"),
        (f"connect https://root:{VALUE}@esxi1.lan/sdk", "connect https://root:***@esxi1.lan/sdk"),
        (
            "spec.credentials.password: Secret(credential:esxi1-password): not set",
            "spec.credentials.password: Secret(credential:esxi1-password): not set",
        ),
        ("backup of web01 done", "backup of web01 done"),
    ],
)
def test_assignments_in_text_are_redacted(text: str, expected: str) -> None:
    with capture_logs(processors=[redact_secrets]) as logs:
        structlog.get_logger().info(text, detail=text)
    assert logs[0]["event"] == logs[0]["detail"] == expected


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_no_secret_value_reaches_the_output(fmt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESXI1_PASSWORD", VALUE)
    stream = io.StringIO()
    configure_logging(fmt, "debug", stream=stream)
    log = structlog.get_logger("reconciler.esxi")
    secret = Secret("env", "ESXI1_PASSWORD")
    log.info("login", host="esxi1", password=secret.reveal(), credential=secret)
    log.debug(f"ssh root@esxi1 password={secret.reveal()}")
    logging.getLogger("paramiko.transport").warning("retrying with password=%s", secret.reveal())

    def connect(password: str) -> None:
        raise ConnectionError("authentication failed")

    try:
        connect(secret.reveal())
    except ConnectionError:
        log.exception("connect.failed", host="esxi1")
    output = stream.getvalue()
    assert VALUE not in output
    assert "Secret(env:ESXI1_PASSWORD)" in output
    assert "authentication failed" in output  # the traceback is there, without local variables
    assert output.count("***") == 3


def test_paramiko_transport_errors_are_left_to_the_caller() -> None:
    """A failed SSH handshake is raised to the caller (one line); paramiko's thread also logs it at
    ERROR with a traceback, line by line: those records are dropped, its warnings are not."""
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    logging.getLogger("paramiko.transport").error("Exception (client): Incompatible ssh peer")
    logging.getLogger("paramiko.transport").error("Traceback (most recent call last):")
    logging.getLogger("paramiko.transport").warning("Authentication (%s) failed.", "password")
    out = stream.getvalue()
    assert "Traceback" not in out and "Incompatible" not in out
    assert "Authentication (password) failed." in out
