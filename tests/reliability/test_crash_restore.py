"""Crash consistency of a restore: the real ``esxi-reconciler restore`` is SIGKILLed at each named step,
as a new VM (free host) and over the original VM (licensed host, CBT on). The same command run again
finishes the job: a new VM's half-written folder (and the VM registered from it) is removed and the
restore done again; an overwrite is finished from its journal and the VM ends on the point's content.
Earlier points verify, and nothing is left on the hosts but what the user asked for."""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Iterator

import pytest

from esxisim.handle import LabHandle
from reconciler.operations.restore import disk_sha256
from tests.integration.labconfig import policy_yaml
from tests.reliability.invariants import assert_nothing_lost, baseline, check_repositories
from tests.reliability.ledger import Ledger
from tests.reliability.site import Site, assert_killed

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

NEW_VM_STEPS = ("restore.folder-created", "restore.disk-written", "restore.vmx-written", "restore.registered")
OVERWRITE_STEPS = (
    "restore.overwrite-powered-off",
    "restore.overwrite-written",
    "restore.overwrite-cbt-reset",
    "restore.overwrite-switched",
)


@pytest.fixture(scope="module")
def site(rlab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    policies = policy_yaml("free", rlab.free, ["web01"]) + policy_yaml("lic", rlab.licensed, ["app202"])
    site = Site.create(rlab, tmp_path_factory.mktemp("crash-restore"), policies)
    for name in ("free", "lic"):
        first = site.run("backup", name)
        assert first.code == 0, first.err[-3000:]
    yield site


def remove_vm(lab: LabHandle, host: str, name: str) -> None:
    """Unregister the powered-off VM ``name`` and delete its folder (what the user does with a copy)."""
    (vm,) = [v for v in lab.client(host).state()["vms"] if v["name"] == name]
    assert lab.vimcmd(host, "vmsvc/unregister", vm["vmid"]).exit == 0
    folder = vm["vmx"].partition("] ")[2].rsplit("/", 1)[0]
    assert lab.run(host, f"rm -rf /vmfs/volumes/datastore1/{shlex.quote(folder)}").exit == 0


@pytest.mark.parametrize("step", NEW_VM_STEPS)
def test_a_restore_as_a_new_vm_killed_at_a_step_is_done_again(
    site: Site, ledger: Ledger, capsys: pytest.CaptureFixture[str], step: str
) -> None:
    lab = site.lab
    before = baseline(lab, {"r": site.repo})
    args = ("restore", "web01", "--name", "web01-copy")
    killed = site.run(*args, kill_at=step)
    assert_killed(killed, step)
    ledger.count("kill_points")
    found = check_repositories(ledger, before)
    assert not found.lost and not found.problems, found

    again = site.cli(capsys, *args)
    assert again.code == 0, again.out + again.err[-3000:]
    assert "restored as new VM 'web01-copy'" in again.out
    assert "restore.unfinished_removed" in again.err  # the leftover is named in the log
    remove_vm(lab, lab.free, "web01-copy")
    assert_nothing_lost(ledger, before)


@pytest.mark.parametrize("step", OVERWRITE_STEPS)
def test_an_overwrite_killed_at_a_step_is_finished_by_the_next_run(
    site: Site, ledger: Ledger, capsys: pytest.CaptureFixture[str], step: str
) -> None:
    lab = site.lab
    (point,) = [p for p in site.repo.list_points() if p.vm.name == "app202"]
    before = baseline(lab, {"r": site.repo})
    args = ("restore", "app202", "--overwrite", "--yes", "--power-on")
    killed = site.run(*args, kill_at=step)
    assert_killed(killed, step)
    ledger.count("kill_points")
    found = check_repositories(ledger, before)
    assert not found.lost and not found.problems, found

    again = site.cli(capsys, *args)
    assert again.code == 0, again.out + again.err[-3000:]
    assert "restore.unfinished_overwrite" in again.err
    (vm,) = [v for v in lab.client(lab.licensed).state()["vms"] if v["name"] == "app202"]
    assert vm["power"] == "poweredOn"
    for disk in point.disks:  # the VM runs on the point's content
        (now,) = [d for d in vm["disks"] if d["key"] == disk.key]
        flat = lab.local_path(lab.licensed, now["chain"][-1]["extent"])
        assert hashlib.sha256(flat.read_bytes()).hexdigest() == disk_sha256(site.repo, disk)
    assert_nothing_lost(ledger, before)
