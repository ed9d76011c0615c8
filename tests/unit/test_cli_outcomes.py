"""The outcome contract without a lab: exit codes, one-line expected failures (object, cause, fix, never
a traceback), the JSON error object and the documented JSON shapes of the verbs that need no host.

The lab half (every verb through every row of the exit-code contract, the empty-directory refusal of
``backup`` and ``run``) is ``tests/integration/test_outcomes_lab.py``.
"""

from __future__ import annotations

import errno
import json
import os
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from reconciler import cli
from reconciler.commands.status import daemon_problems, rpo_problems
from reconciler.daemon.heartbeat import Heartbeat
from reconciler.daemon.lock import InstanceLock
from reconciler.operations.failures import explain
from reconciler.planning.observed import RunRecord
from reconciler.repository import Repository
from reconciler.repository.errors import StorageError
from tests.unit.test_restore_identity import T0, UUID1, add_point

PASSPHRASE = "correct horse battery staple"
SECRET_VALUE = PASSPHRASE

VERBS = (
    ["validate"],
    ["plan"],
    ["apply", "--yes"],
    ["repo", "init", "r"],
    ["repo", "key-export", "r", "--out", "k"],
    ["repo", "gc"],
    ["repo", "key", "import", "r", "k"],
    ["repo", "key", "passwd", "r", "--yes"],
    ["repo", "key", "list", "r"],
    ["repo", "stats"],
    ["points", "protect", "20261120T020000000000Z-1a2b3c4d"],
    ["points", "forget", "20261120T020000000000Z-1a2b3c4d", "--yes"],
    ["backup", "p"],
    ["points"],
    ["verify"],
    ["restore", "web01"],
    ["export", "web01", "--to", "out"],
    ["run", "--once"],
    ["notify", "test", "ops"],
)


def schema(name: str) -> dict[str, Any]:
    text = resources.files("reconciler.commands").joinpath(f"json_schemas/{name}.schema.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(doc)
    return doc


def check(name: str, doc: object) -> None:
    """``doc`` validates against the shipped schema ``name`` (docs/cli-json.md)."""
    jsonschema.Draft202012Validator(schema(name), format_checker=jsonschema.FormatChecker()).validate(doc)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--log-level", "critical", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    """The single line a verb prints for an expected failure; no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("esxi-reconciler ")]
    assert len(lines) == 1, err
    return lines[0]


def write_config(
    root: Path, *, repo_path: Path, passphrase: str = PASSPHRASE, host_port: int = 9, extra: str = ""
) -> Path:
    """One host on a closed port, one encrypted repository ``r`` at ``repo_path``, policy ``p``."""
    cfg = root / "config"
    cfg.mkdir(parents=True)
    secrets = root / "secrets"
    secrets.mkdir()
    for name, value in (("pw", "x"), ("key", passphrase)):
        (secrets / name).write_text(value)
        (secrets / name).chmod(0o600)
    (cfg / "all.yaml").write_text(
        f"""apiVersion: esxi-reconciler/v1
kind: Host
metadata: {{name: esxi1}}
spec:
  address: 127.0.0.1
  credentials: {{user: root, password: {{file: {secrets / "pw"}}}}}
  api: {{port: {host_port}, thumbprint: "{":".join(["AB"] * 32)}"}}
  ssh: {{enabled: false}}
---
apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: r}}
spec:
  backend: {{type: local, path: {repo_path}}}
  encryption: {{enabled: true, key: {{file: {secrets / "key"}}}}}
{extra}---
apiVersion: esxi-reconciler/v1
kind: BackupPolicy
metadata: {{name: p}}
spec:
  host: esxi1
  repository: r
  vms: {{names: [web01]}}
  schedule: {{daily: {{at: "02:00"}}}}
  retention: {{keep_last: 3}}
"""
    )
    return cfg


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    """An encrypted repository with one point of web01 (from esxi1)."""
    repository = Repository.init(tmp_path / "repo", PASSPHRASE)
    add_point(repository, "esxi1", UUID1, T0)
    return repository


# -- exit codes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", VERBS, ids=[" ".join(v[:2]) for v in VERBS])
def test_every_verb_exits_64_on_a_usage_error_and_78_on_a_missing_config(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as caught:
        cli.main([*argv, "--no-such-option"])
    assert caught.value.code == 64  # EX_USAGE, never 2 (which reads as "changes")
    capsys.readouterr()

    missing = tmp_path / "nowhere"
    code, out, err = run(
        capsys, "--config", str(missing), "--state-dir", str(tmp_path / "s"), *argv, "--json"
    )
    assert code == 78, err
    doc = json.loads(out)
    if argv[0] == "validate":  # its result document is the list of errors
        check("validate", doc)
        assert doc["valid"] is False and "does not exist" in doc["errors"][0]["message"]
    else:
        line = one_line(err)
        assert str(missing) in line and "does not exist" in line
        check("error", doc)
        assert doc["error"]["code"] == "config-invalid" and doc["error"]["exit_code"] == 78


def test_status_exit_codes_and_distinct_reasons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.unit.test_status_cli import fill

    code, out, err = run(capsys, "--state-dir", str(tmp_path / "none"), "status", "--json")
    assert code == 3  # nothing to look at: not the same as "something is Stalled"
    assert "no status data" in one_line(err)
    check("error", json.loads(out))

    fill(tmp_path, stalled=True)
    code, out, _ = run(capsys, "--state-dir", str(tmp_path), "status", "--json")
    doc = json.loads(out)
    check("status", doc)
    assert code == 1 and not doc["healthy"]
    assert [p["code"] for p in doc["problems"]] == ["stalled"]


# -- status: daemon, staleness, RPO (pure parts) ---------------------------------------------------

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)


def test_a_daemon_that_ran_here_is_expected_and_its_data_must_be_fresh() -> None:
    beat = Heartbeat(
        pid=42,
        started=NOW - timedelta(days=3),
        resync_seconds=300,
        once=False,
        cycle_started=NOW - timedelta(days=2, minutes=1),
        cycle_finished=NOW - timedelta(days=2),
    )
    problems = daemon_problems(NOW, beat, False, None, expect_daemon=True, max_age=None)
    assert [p.code for p in problems] == ["daemon-not-running", "stale"]
    assert "PID 42" in problems[0].message and "--no-daemon" in problems[0].message
    assert "2d old" in problems[1].message and "6m" in problems[1].message  # 1.1 x 5m + 1m
    # running, last cycle 4 minutes ago: healthy; a cycle running for hours: not stale
    fresh = Heartbeat(
        42, NOW - timedelta(days=3), 300, False, NOW - timedelta(minutes=5), NOW - timedelta(minutes=4)
    )
    assert daemon_problems(NOW, fresh, True, None, expect_daemon=True, max_age=None) == []
    busy = Heartbeat(
        42, NOW - timedelta(days=3), 300, False, NOW - timedelta(hours=5), NOW - timedelta(hours=6)
    )
    assert daemon_problems(NOW, busy, True, None, expect_daemon=True, max_age=None) == []
    # cron instead of a daemon: nothing expected, age only with --max-age
    assert daemon_problems(NOW, beat, False, None, expect_daemon=False, max_age=None) == []
    aged = daemon_problems(NOW, beat, False, None, expect_daemon=False, max_age=timedelta(days=1))
    assert [p.code for p in aged] == ["stale"]


def test_rpo_from_the_schedule_or_the_policy(tmp_path: Path) -> None:
    from reconciler.config import load_config

    cfg = write_config(tmp_path, repo_path=tmp_path / "repo")
    policies = dict(load_config(cfg).policies)
    history = {
        "backup/p/esxi1/web01": RunRecord(
            last_started=NOW - timedelta(days=3), last_succeeded=NOW - timedelta(days=3)
        ),
        "backup/p/esxi1/db": RunRecord(
            last_started=NOW - timedelta(hours=30), last_succeeded=NOW - timedelta(hours=30)
        ),
        "backup/gone/esxi1/x": RunRecord(last_started=NOW - timedelta(days=30)),
    }
    problems = rpo_problems(NOW, policies, history)
    assert [p.code for p in problems] == ["rpo-missed"]  # daily: RPO 2d; db at 30h is within it
    assert "esxi1/web01" in problems[0].message and "RPO of 2d" in problems[0].message

    (cfg / "all.yaml").write_text(
        (cfg / "all.yaml").read_text().replace("retention:", "rpo: 1d\n  retention:")
    )
    policies = dict(load_config(cfg).policies)
    assert len(rpo_problems(NOW, policies, history)) == 2


# -- one-line expected failures --------------------------------------------------------------------


def test_wrong_passphrase_names_the_repository_and_the_fix(
    repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, repo_path=repo.path, passphrase="not it")
    for argv in (
        ["points"],
        ["restore", "web01", "--repository", "r"],
        ["export", "web01", "--repository", "r", "--to", str(tmp_path / "o")],
        ["restore", "web01"],  # without --repository: the cause, not "no repository has points"
    ):
        code, _, err = run(capsys, "--config", str(cfg), *argv)
        line = one_line(err)
        assert code == 1, (argv, err)
        assert "repository r (" in line and "wrong passphrase" in line and "encryption.key" in line, line
        assert "not it" not in err and PASSPHRASE not in err
    code, out, err = run(capsys, "--config", str(cfg), "restore", "web01", "--repository", "r", "--json")
    doc = json.loads(out)
    check("error", doc)
    assert doc["error"]["code"] == "wrong-passphrase"


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_an_unmounted_repository_is_named_with_the_fix_and_left_untouched(
    state: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mnt" / "nas"
    if state == "empty":
        path.mkdir(parents=True)
    cfg = write_config(tmp_path, repo_path=path)
    for argv in (
        ["points"],
        ["verify"],
        ["backup", "p"],
        ["restore", "web01", "--repository", "r"],
        ["repo", "gc"],
    ):
        code, out, err = run(capsys, "--config", str(cfg), *argv)
        line = one_line(err)
        assert code == 1, (argv, err)
        cause = "does not exist" if state == "missing" else "the directory is empty"
        assert f"repository r ({path})" in line and cause in line and "mount it" in line, line
        assert "no restore points" not in out
    code, out, _ = run(capsys, "--config", str(cfg), "points", "--json")
    doc = json.loads(out)
    check("error", doc)
    assert code == 1 and doc["error"]["code"] == "not-a-repository"
    assert (not path.exists()) if state == "missing" else (list(path.iterdir()) == [])


def test_a_repository_replaced_under_a_pinned_id_is_refused(
    repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, repo_path=repo.path, extra=f"  id: {'0' * 32}\n")
    code, _, err = run(capsys, "--config", str(cfg), "points")
    line = one_line(err)
    assert code == 1 and f"holds repository {repo.id}" in line and "pins id 000" in line


def test_unreachable_host_names_the_host(
    repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, repo_path=repo.path, host_port=9)
    code, out, err = run(capsys, "--config", str(cfg), "backup", "p", "--json")
    line = one_line(err)
    assert code == 1
    assert "host esxi1 (127.0.0.1:9): connection refused" in line and "firewall" in line
    doc = json.loads(out)
    check("error", doc)
    assert doc["error"]["code"] == "host-unreachable"
    # plan: incomplete, never "No changes" (3 with --detailed-exitcode, 1 without)
    code, out, err = run(
        capsys, "--config", str(cfg), "--state-dir", str(tmp_path / "s"), "plan", "--detailed-exitcode"
    )
    assert code == 3 and "No changes" not in out and "Plan INCOMPLETE" in out
    assert "incomplete: host esxi1: 127.0.0.1:9: connection refused" in err
    code, out, _ = run(
        capsys, "--config", str(cfg), "--state-dir", str(tmp_path / "s"), "plan", "--format", "json"
    )
    doc = json.loads(out)
    check("plan", doc)
    assert code == 1 and doc["complete"] is False and doc["unobserved"][0].startswith("host esxi1:")


def test_bad_state_directory_and_a_held_daemon_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, repo_path=tmp_path / "repo")
    a_file = tmp_path / "state-file"
    a_file.write_text("")
    for state, words in ((a_file, "is a file, not a directory"), (a_file / "sub", "Not a directory")):
        code, _, err = run(capsys, "--config", str(cfg), "run", "--once", "--state-dir", str(state))
        line = one_line(err)
        assert code == 1 and f"state directory {state}" in line and words in line and "--state-dir" in line
    state = tmp_path / "state"
    with InstanceLock(state):
        code, out, err = run(
            capsys, "--config", str(cfg), "run", "--once", "--state-dir", str(state), "--json"
        )
    line = one_line(err)
    assert code == 1 and f"PID {os.getpid()} since " in line and "daemon.lock" in line
    check("error", json.loads(out))


def test_repository_lock_held_names_who_and_since_when(
    repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, repo_path=repo.path)
    with repo.lock(exclusive=True, purpose="garbage collection"):
        code, _, err = run(capsys, "--config", str(cfg), "restore", "web01", "--repository", "r")
    line = one_line(err)
    assert code == 1 and f"pid {os.getpid()}" in line and " since " in line and "garbage collection" in line


def test_permission_denied_and_disk_full_are_one_line_with_the_path() -> None:
    denied = explain(PermissionError(errno.EACCES, "Permission denied", "/srv/out/web01.vmx"))
    assert denied is not None and denied.code == "permission-denied"
    assert denied.message.startswith("/srv/out/web01.vmx: Permission denied; give user ")
    full = explain(StorageError("repository r (/srv/r): the volume is full: ...; free space", errno.ENOSPC))
    assert full is not None and full.code == "disk-full" and full.message.startswith("repository r (/srv/r)")


def test_a_bug_is_one_line_asking_for_v_which_shows_the_traceback(
    repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tmp_path, repo_path=repo.path)

    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("an unexpected argument")

    monkeypatch.setattr(Repository, "list_points", broken)
    code, out, err = run(capsys, "--config", str(cfg), "points", "--json")
    line = one_line(err)
    assert code == 70 and "internal error: TypeError: an unexpected argument" in line and "-v" in line
    check("error", json.loads(out))
    code = cli.main(["--config", str(cfg), "-v", "--log-format", "json", "points"])
    err = capsys.readouterr().err
    assert code == 70 and "Traceback" in err and "an unexpected argument" in err


# -- JSON shapes of the verbs that need no host ----------------------------------------------------


def test_json_of_the_local_verbs_validates(
    repo: Repository, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, repo_path=repo.path)
    base = ["--config", str(cfg), "--json"]

    code, out, _ = run(capsys, *base, "validate")
    check("validate", json.loads(out))
    code, out, _ = run(capsys, *base, "points")
    assert code == 0
    check("points", json.loads(out))
    code, out, _ = run(capsys, *base, "verify")
    assert code == 0
    check("verify", json.loads(out))
    code, out, _ = run(capsys, *base, "repo", "gc", "--dry-run")
    assert code == 0
    check("repo-gc", json.loads(out))
    code, out, _ = run(capsys, *base, "repo", "key-export", "r", "--out", str(tmp_path / "k.json"))
    assert code == 0
    check("repo-key-export", json.loads(out))
    code, out, err = run(
        capsys, *base, "export", "web01", "--to", str(tmp_path / "out"), "--disk-format", "vmdk"
    )
    assert code == 0, err
    doc = json.loads(out)
    check("export", doc)
    assert doc["disk_format"] == "vmdk" and doc["disks"]

    other = write_config(tmp_path / "new", repo_path=tmp_path / "new-repo")
    code, out, err = run(capsys, "--config", str(other), "--json", "repo", "init", "r")
    assert code == 0, err
    doc = json.loads(out)
    check("repo-init", doc)
    assert doc["encrypted"] is True and len(doc["id"]) == 32
    code, out, err = run(capsys, "--config", str(other), "--json", "repo", "init", "r")
    assert code == 1 and "is already a repository" in one_line(err)
    check("error", json.loads(out))
