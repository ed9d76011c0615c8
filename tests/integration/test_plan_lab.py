"""Observe + plan against the lab (both hosts), and ``esxi-reconciler plan`` as a user runs it.

Read-only: nothing here changes a VM, so the lab is left as found."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler import cli
from reconciler.config import load_config
from reconciler.operations.observe import observe
from reconciler.planning.actions import Plan, RunBackup, SetCbt
from reconciler.planning.plan import plan
from reconciler.repository import KdfParams, Repository
from tests.integration.labconfig import PASSPHRASE, policy_yaml, write_lab_config

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

HOSTILE = 'ファイル鯖 "q" $(x)'


def app201_cbt(lab: LabHandle) -> bool:
    """CBT of app201 as the licensed host reports it now (the test asks for the opposite)."""
    from esxisim.handle import find_vm

    return bool(find_vm(lab.api(lab.licensed), "app201").config.changeTrackingEnabled)


@pytest.fixture
def config(lab: LabHandle, tmp_path: Path) -> tuple[Path, bool]:
    """A lab config: free host VMs with CBT unmanaged, app201 with CBT switched to the opposite."""
    want = not app201_cbt(lab)
    policies = policy_yaml(
        "free-web", lab.free, ["web01", HOSTILE], extra="  cbt: unmanaged\n"
    ) + policy_yaml(
        "lic",
        lab.licensed,
        ["app201"],
        schedule="{manual: true}",
        extra=f"  cbt: {'enabled' if want else 'disabled'}\n",
    )
    cfg = write_lab_config(lab, tmp_path, policies)
    Repository.init(tmp_path / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
    return cfg, want


def test_observe_and_plan_the_lab(lab: LabHandle, config: tuple[Path, bool]) -> None:
    cfg, want = config
    desired = load_config(cfg)
    now = datetime.now(timezone.utc)
    seen = observe(desired, now=now, history={})
    free, licensed = seen.hosts[lab.free], seen.hosts[lab.licensed]
    assert (free.reachable, free.license, licensed.reachable, licensed.license) == (
        True,
        "free",
        True,
        "licensed",
    )
    assert {"web01", "db 01", HOSTILE} <= {v.name for v in free.vms}
    assert all(v.power_state == "poweredOn" for v in free.vms)
    assert seen.repositories["r"].reachable and seen.repositories["r"].points == ()

    result = plan(desired, seen)
    backups = [a for a in result.actions if isinstance(a, RunBackup)]
    assert sorted(b.vm for b in backups) == sorted(["web01", HOSTILE])
    assert all(b.reason.startswith("first run; due since ") for b in backups)
    hostile = next(b for b in backups if b.vm == HOSTILE)
    assert hostile.vmid == free.vm(HOSTILE).vmid  # type: ignore[union-attr]
    (cbt,) = [a for a in result.actions if isinstance(a, SetCbt)]
    assert (cbt.host_name, cbt.vm, cbt.enabled, cbt.method) == (
        lab.licensed,
        "app201",
        want,
        "reconfigure+stun",
    )
    assert [a.kind for a in result.actions] == ["cbt", "backup", "backup"]
    # Observing again without a change gives the same fingerprint (a saved plan stays valid).
    again = observe(desired, now=now, history={})
    assert plan(desired, again).observed_fingerprint == result.observed_fingerprint


def test_plan_cli_detailed_exitcode_text_json_and_out(
    lab: LabHandle, config: tuple[Path, bool], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, want = config
    state = tmp_path / "state"
    state.mkdir()
    base = ["--config", str(cfg), "--state-dir", str(state), "--log-level", "warning"]
    assert cli.main([*base, "plan", "--detailed-exitcode"]) == 2
    lines = capsys.readouterr().out.splitlines()
    before, after = ("disabled", "enabled") if want else ("enabled", "disabled")
    assert f"  ~ {lab.licensed}/app201  cbt: {before} -> {after} (stun cycle: VM is running)" in lines
    backup_lines = [line for line in lines if line.startswith("  + backup ")]
    assert len(backup_lines) == 2
    assert any(
        line.startswith(f"  + backup {lab.free}/{HOSTILE} -> r (first run; due since ")
        for line in backup_lines
    )
    assert lines[-1] == "Plan: 1 CBT change, 2 backups."

    saved = tmp_path / "tonight.plan"
    assert cli.main([*base, "plan", "--format", "json", "--out", str(saved)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(a["kind"] for a in printed["actions"]) == ["backup", "backup", "cbt"]
    stored = Plan.from_json(saved.read_text())
    assert stored.revision == load_config(cfg).revision.id
    assert [a.kind for a in stored.actions] == ["cbt", "backup", "backup"]


def test_plan_cli_broken_config_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "p.yaml").write_text(
        "apiVersion: esxi-reconciler/v1\nkind: BackupPolicy\nmetadata: {name: x}\nspec: {}\n"
    )
    assert cli.main(["--config", str(cfg), "--state-dir", str(tmp_path), "plan", "--detailed-exitcode"]) == 78
    err = capsys.readouterr().err
    assert "esxi-reconciler plan: the configuration is invalid: p.yaml:4:1" in err and "Traceback" not in err
