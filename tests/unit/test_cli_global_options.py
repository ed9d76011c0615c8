"""The CLI shape every verb shares: global options, help with examples, logging set up before a verb."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from reconciler.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
VALUE = "hunter2-Sup3rS3cret"


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
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


@pytest.fixture
def config(tmp_path: Path) -> Path:
    directory = tmp_path / "config"
    shutil.copytree(REPO / "config.example", directory)
    return directory


def verbs() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(commands.choices)


def test_global_options_before_or_after_the_verb(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(config), "validate"]) == 0
    assert main(["validate", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count("OK: ") == 2
    # Given twice, the one after the verb wins (argparse: the last one).
    assert main(["--config", str(config / "missing"), "validate", "--config", str(config)]) == 0
    assert main(["--config", str(config), "validate", str(config / "hosts")]) == 64
    assert "either as DIR or --config" in capsys.readouterr().err


def test_every_verb_has_the_global_options() -> None:
    for name, parser in verbs().items():
        options = set(parser._option_string_actions)
        assert {"--config", "--log-format", "--log-level", "-v", "--verbose"} <= options, name
    args = build_parser().parse_args(["validate"])
    assert (args.config, args.log_format, args.log_level) == (None, "auto", "info")


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["validate"], "info"),
        (["-v", "validate"], "debug"),
        (["validate", "--verbose"], "debug"),
        (["--log-level", "ERROR", "validate"], "error"),
        (["--log-level", "error", "validate", "-v"], "debug"),
        (["-v", "--log-level", "warning", "validate"], "warning"),
    ],
)
def test_log_level_options(argv: list[str], level: str) -> None:
    assert build_parser().parse_args(argv).log_level == level


@pytest.mark.parametrize("argv", [["--log-format", "xml", "validate"], ["validate", "--log-level", "loud"]])
def test_bad_global_options_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 64  # EX_USAGE, never 2 ("changes")
    assert "invalid choice" in capsys.readouterr().err


def test_json_logs_on_stderr_output_on_stdout(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--log-format", "json", "-v", "validate", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("OK: 2 hosts") and out.count("\n") == 1
    events = [json.loads(line) for line in err.splitlines()]
    assert [e["event"] for e in events] == ["command", "validate.start"]
    assert events[0]["command"] == "validate" and events[0]["logger"] == "reconciler.cli"
    assert all(e["level"] == "debug" and e["timestamp"].endswith("Z") for e in events)


def test_console_logs(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(config), "--log-format", "console", "--log-level", "debug"]) == 0
    err = capsys.readouterr().err
    assert "[debug" in err and "validate.start" in err and "[reconciler.cli]" in err
    assert not err.lstrip().startswith("{")


def test_default_level_logs_nothing_for_a_valid_config(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--log-format", "json", "validate", str(config)]) == 0
    assert capsys.readouterr().err == ""


def test_secret_values_never_printed(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name in (
        "esxi1-password",
        "repo-nas-key",
        "b2-key-id",
        "b2-application-key",
        "repo-cloud-key",
        "smtp-password",
        "ntfy-token",
    ):
        (credentials / name).write_text(VALUE + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    # The file references point outside tmp_path and fail; the credentials resolve.
    assert main(["-v", "--log-format", "json", "validate", "--resolve-secrets", str(config)]) == 78
    out, err = capsys.readouterr()
    assert "FAILED: 2 errors" in out
    assert VALUE not in out and VALUE not in err


def test_no_verb_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 64
    assert capsys.readouterr().err.startswith("usage: esxi-reconciler")


def test_help_lists_global_options_and_examples_of_existing_verbs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config DIR", "--log-format", "--log-level", "-v, --verbose", "--version"):
        assert option in out
    assert "examples:" in out and "esxi-reconciler validate config.example/" in out
    examples = out[out.index("examples:") : out.index("\n\n", out.index("examples:"))]
    commands = [
        re.split(r"\s{2,}", line.strip())[0]
        for line in examples.splitlines()
        if line.strip().startswith("esxi-reconciler ") and "COMMAND" not in line
    ]
    assert len(commands) >= 4, examples
    for command in commands:
        # Every example parses, so it names only verbs and options that exist.
        args = build_parser().parse_args(shlex.split(command)[1:])
        assert args.command in verbs(), command


def test_verb_help_shows_global_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    out = capsys.readouterr().out
    assert "global options:" in out and "--log-format" in out and "--config DIR" in out
