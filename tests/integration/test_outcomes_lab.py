"""The exit-code contract against the lab: every verb through each row (success, the operation failed,
configuration error, and ``plan``'s incomplete case), each with ``--json`` validated against its
documented schema (or the error object's). The failing row points the repository at an empty directory
(an unmounted NAS): ``backup`` and ``run`` must refuse it and write nothing there.

Only the licensed host's ``app203`` is backed up (CBT unmanaged, so no VM is changed); the test restore
removes the VM it made. Every VM is left as found.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler import cli
from reconciler.repository import KdfParams, Repository
from tests.integration.labconfig import PASSPHRASE, policy_yaml, write_lab_config
from tests.unit.test_cli_outcomes import check, one_line

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

VM = "app203"


@dataclass
class Env:
    root: Path
    good: Path
    empty_repo: Path
    failing: Path
    invalid: Path
    wrong_pin: Path
    lab: LabHandle


@pytest.fixture(scope="module")
def env(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("outcomes")
    policies = policy_yaml("lic", lab.licensed, [VM], extra="  cbt: unmanaged\n")
    good = write_lab_config(lab, root / "good", policies)
    Repository.init(root / "good" / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
    # the same config, its repository path an empty directory: a NAS share that is not mounted
    failing = write_lab_config(lab, root / "failing", policies)
    empty_repo = root / "failing" / "repo"
    empty_repo.mkdir()
    invalid = root / "invalid"
    shutil.copytree(good, invalid)
    (invalid / "policies" / "p.yaml").write_text(policies.replace("keep_last: 3", "keep_last: -1"))
    wrong_pin = root / "pin"
    shutil.copytree(good, wrong_pin)
    host_file = wrong_pin / "hosts" / f"{lab.licensed}.yaml"
    pinned = lab.host(lab.licensed)["api"]["thumbprint_sha256"]
    host_file.write_text(host_file.read_text().replace(pinned, ":".join(["AB"] * 32)))
    return Env(root, good, empty_repo, failing, invalid, wrong_pin, lab)


SCHEMAS = {
    "validate": "validate",
    "plan": "plan",
    "apply": "apply",
    "backup": "backup",
    "points": "points",
    "verify": "verify",
    "restore": "restore",
    "export": "export",
    "run": "run",
    "status": "status",
    "repo gc": "repo-gc",
    "repo key-export": "repo-key-export",
}


def call(
    env: Env, config: Path, state: str, *argv: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """Run a verb with --json; check its stdout against its schema (or the error object's)."""
    code = cli.main(
        [
            "--config",
            str(config),
            "--state-dir",
            str(env.root / state),
            "--log-level",
            "critical",
            "--json",
            *argv,
        ]
    )
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    doc = json.loads(captured.out)
    verb = argv[0] if argv[0] != "repo" else f"repo {argv[1]}"
    if isinstance(doc, dict) and doc.get("ok") is False and isinstance(doc.get("error"), dict):
        check("error", doc)
        assert doc["error"]["exit_code"] == code
    else:
        check(SCHEMAS[verb], doc)
    return code, captured.err


def verbs(env: Env) -> list[tuple[str, ...]]:
    """Every verb, as the rows run it (apply with --yes: --json never asks)."""
    return [
        ("validate",),
        ("plan",),
        ("apply", "--yes"),
        ("backup", "lic"),
        ("points",),
        ("verify", "--no-read-data"),
        ("restore", VM, "--test"),
        ("export", VM, "--to", str(env.root / "export")),
        ("repo", "gc", "--dry-run"),
        ("repo", "key-export", "r", "--out", str(env.root / "key.json")),
        ("run", "--once"),
        ("status", "--no-daemon"),
    ]


def test_every_verb_through_every_row_of_the_contract(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    # incomplete: plan could not look at a host (wrong TLS pin): 3 with --detailed-exitcode, never 0
    code, err = call(env, env.wrong_pin, "s-pin", "plan", "--detailed-exitcode", capsys=capsys)
    assert code == 3 and "presented a TLS certificate" in err, err
    # the operation failed: backup against the wrong pin names the host, the presented thumbprint, the fix
    code, err = call(env, env.wrong_pin, "s-pin", "backup", "lic", capsys=capsys)
    line = one_line(err)
    presented = env.lab.host(env.lab.licensed)["api"]["thumbprint_sha256"]
    assert code == 1 and presented in line and "api.thumbprint" in line, line

    # changes, then success
    code, _ = call(env, env.good, "s-good", "plan", "--detailed-exitcode", capsys=capsys)
    assert code == 2  # the backup of app203 is due
    codes = {argv[:2]: call(env, env.good, "s-good", *argv, capsys=capsys)[0] for argv in verbs(env)}
    assert codes == {argv[:2]: 0 for argv in verbs(env)}, codes
    code, _ = call(env, env.good, "s-good", "plan", "--detailed-exitcode", capsys=capsys)
    assert code == 0

    # the operation failed: the repository is an empty directory (not mounted)
    failed = {}
    for argv in verbs(env):
        if argv[0] == "validate":
            continue  # nothing to fail but the config (the next row)
        code, err = call(env, env.failing, "s-failing", *argv, capsys=capsys)
        failed[argv[:2]] = code
        if argv[0] in ("backup", "points", "restore", "export"):
            line = one_line(err)
            assert "not a repository: the directory is empty" in line and "mount it" in line, line
    assert failed == {argv[:2]: 1 for argv in verbs(env) if argv[0] != "validate"}, failed
    assert list(env.empty_repo.iterdir()) == []  # backup, run, apply wrote nothing there

    # configuration error; status is a health check: an unreadable config is one of its problems
    rows = [argv for argv in verbs(env) if argv[0] != "status"]
    invalid = {argv[:2]: call(env, env.invalid, "s-invalid", *argv, capsys=capsys)[0] for argv in rows}
    assert invalid == {argv[:2]: 78 for argv in rows}, invalid
    code, err = call(env, env.invalid, "s-good", "status", "--no-daemon", capsys=capsys)
    assert code == 1
    code, err = call(env, env.invalid, "s-invalid", "status", "--no-daemon", capsys=capsys)
    assert code == 3 and "no status data" in one_line(err)


def test_backup_and_run_refuse_an_empty_repository_directory(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """The done-when of the issue: a missing NAS mount never fills the root file system."""
    for argv in (("backup", "lic"), ("run", "--once"), ("apply", "--yes")):
        code = cli.main(
            [
                "--config",
                str(env.failing),
                "--state-dir",
                str(env.root / "s-refuse"),
                "--log-level",
                "error",
                *argv,
            ]
        )
        err = capsys.readouterr().err
        assert code == 1, err
        assert "Traceback" not in err
        assert list(env.empty_repo.iterdir()) == [], argv
    status = cli.main(
        ["--config", str(env.failing), "--state-dir", str(env.root / "s-refuse"), "status", "--no-daemon"]
    )
    out = capsys.readouterr().out
    assert status == 1 and "stalled:" in out and "repository r" in out
