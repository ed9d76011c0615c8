"""Failures on the host side, with the real product against the lab: a full datastore (the snapshot is
refused, by our free-space floor or by the host), a snapshot removal that fails (retried; if it keeps
failing, reported and cleaned by the next run), CBT reset between runs (a full read, the reason
recorded), a VM deleted, renamed or re-registered (new vmid) while it is backed up, disks added, removed
and resized between runs, a snapshot that is not ours, and the host rebooting in the middle of a run.

Cases that change a VM's identity or disks work on scratch VMs made for them (``create-vm``), so the
suite's lab keeps its VMs as they were."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from itertools import count

import pytest

from esxisim import MiB
from esxisim.handle import LabHandle, find_vm, snapshot_ids, wait_task
from reconciler.config import load_config
from reconciler.facts.inventory import SNAPSHOT_PREFIX, BackupSnapshot, FrozenDisk
from reconciler.operations.backup import BackupOptions, VmResult, backup_policy
from reconciler.operations.ports import BackupHost
from tests.integration.labconfig import policy_yaml
from tests.reliability.invariants import assert_nothing_lost, baseline, host_state
from tests.reliability.ledger import Ledger
from tests.reliability.site import Site

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

_seeds = count(5100)


@pytest.fixture(scope="module")
def site(rlab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Policies ``free`` (db 01) and ``lic`` (app202, CBT on), each with a first point."""
    policies = policy_yaml("free", rlab.free, ["db 01"]) + policy_yaml("lic", rlab.licensed, ["app202"])
    site = Site.create(rlab, tmp_path_factory.mktemp("host"), policies)
    for name in ("free", "lic"):
        first = site.run("backup", name)
        assert first.code == 0, first.err[-3000:]
    yield site


@pytest.fixture
def faults(site: Site) -> Iterator[LabHandle]:
    try:
        yield site.lab
    finally:
        site.lab.clear_faults()


@contextlib.contextmanager
def policies(site: Site, text: str) -> Iterator[None]:
    """The site's policies replaced by ``text`` for the block."""
    path = site.config / "policies" / "p.yaml"
    before = path.read_text()
    path.write_text(text)
    try:
        yield
    finally:
        path.write_text(before)


@contextlib.contextmanager
def scratch_vm(lab: LabHandle, host: str, name: str, *, power: str = "poweredOn") -> Iterator[str]:
    """A VM made for one case (disks of 4 and 2 MiB), destroyed afterwards whatever became of it."""
    seed = next(_seeds)
    lab.client(host).create_vm(
        {
            "name": name,
            "power": power,
            "disks": [
                {"size": 4 * MiB, "fill": 0.25, "seed": seed},
                {"size": 2 * MiB, "fill": 0.25, "seed": seed + 1},
            ],
        }
    )
    try:
        yield name
    finally:
        for vm in lab.client(host).state()["vms"]:
            if vm["name"].startswith(name):
                if vm["power"] != "poweredOff":
                    lab.vimcmd(host, "vmsvc/power.off", vm["vmid"])
                lab.vimcmd(host, "vmsvc/snapshot.removeall", vm["vmid"])
                assert lab.vimcmd(host, "vmsvc/destroy", vm["vmid"]).exit == 0
        lab.run(host, f"rm -rf /vmfs/volumes/datastore1/{name}")


def test_a_full_datastore_refuses_the_snapshot_with_the_space_named(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the host's free-space floor (10 % by default) the backup takes no snapshot; with the floor
    off, the host itself refuses the snapshot (NoDiskSpace). Both name the datastore; the next run,
    once there is room, succeeds."""
    before = baseline(faults, {"r": site.repo})
    faults.fault(faults.free, "datastore-full", datastore="datastore1", free_bytes=600 * MiB)
    ledger.count("faults_injected")
    refused = site.cli(capsys, "backup", "free")
    assert refused.code == 1
    assert "db 01: FAILED" in refused.out and "datastore datastore1 on esxi1 has" in refused.out
    assert "no snapshot taken" in refused.out, refused.out

    host_file = site.config / "hosts" / f"{faults.free}.yaml"
    text = host_file.read_text()
    no_floor = "concurrent_backups_per_datastore: 2, min_datastore_free: {percent: 0}}"
    host_file.write_text(text.replace("concurrent_backups_per_datastore: 2}", no_floor))
    try:
        refused = site.cli(capsys, "backup", "free")
    finally:
        host_file.write_text(text)
    assert refused.code == 1
    assert "db 01: FAILED" in refused.out and "not enough space" in refused.out, refused.out
    assert "Traceback" not in refused.out + refused.err
    faults.fault(faults.free, "clear")
    again = site.cli(capsys, "backup", "free")
    assert again.code == 0, again.out + again.err[-3000:]
    assert_nothing_lost(ledger, before)


def test_a_snapshot_removal_that_fails_once_is_retried(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    before = baseline(faults, {"r": site.repo})
    faults.fault(faults.licensed, "snapshot-remove-fail", count=1)
    ledger.count("faults_injected")
    done = site.cli(capsys, "backup", "lic")
    assert done.code == 0, done.out + done.err[-3000:]
    assert "trying again" in done.err
    assert_nothing_lost(ledger, before)


def test_a_snapshot_removal_that_keeps_failing_is_reported_and_cleaned_by_the_next_run(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    before = baseline(faults, {"r": site.repo})
    faults.fault(faults.licensed, "snapshot-remove-fail")
    ledger.count("faults_injected")
    failed = site.cli(capsys, "backup", "lic")
    assert failed.code == 1
    line = next(line for line in failed.out.splitlines() if line.startswith("app202: "))
    assert "could not be removed (3 attempts" in line and "the next run removes it" in line, line
    assert "Unable to access file" in line  # the host's own reason
    assert set(site.repo.point_ids()) == before.points["r"]  # no point while our snapshot stays
    (left,) = host_state(faults, faults.licensed).snapshots["app202"]
    assert left.startswith(SNAPSHOT_PREFIX)

    faults.fault(faults.licensed, "clear")
    again = site.cli(capsys, "backup", "lic")
    assert again.code == 0, again.out + again.err[-3000:]
    assert "backup.orphaned_snapshot_removed" in again.err
    assert_nothing_lost(ledger, before)


def test_cbt_reset_between_runs_reads_in_full_and_records_why(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    before = baseline(faults, {"r": site.repo})
    faults.client(faults.licensed).guest_write("app202", 5, seed=next(_seeds))
    faults.fault(faults.licensed, "cbt-reset", vm="app202")
    ledger.count("faults_injected")
    done = site.cli(capsys, "backup", "lic")
    assert done.code == 0, done.out + done.err[-3000:]
    point = site.repo.read_point(site.repo.point_ids()[-1])
    assert point.vm.name == "app202" and point.mode == "full"
    assert point.fallback_reason and "CBT was reset" in point.fallback_reason, point.fallback_reason
    assert "fallback:" in done.out  # the user sees it too
    again = site.cli(capsys, "backup", "lic")  # and CBT works again from this point on
    assert again.code == 0 and "app202: ok cbt " in again.out, again.out
    assert_nothing_lost(ledger, before)


def during_the_backup(site: Site, policy: str, act: Callable[[BackupHost, BackupSnapshot], None]) -> VmResult:
    """Run ``policy`` (one VM) in this process and call ``act(host, snapshot)`` once its snapshot exists."""
    (result,) = backup_policy(load_config(site.config), policy, options=BackupOptions(on_snapshot=act))
    return result


def test_a_vm_deleted_during_its_backup(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """The VM is powered off and deleted while its disks are read: the run says the VM is no longer
    registered (no retries against a VM that is gone), writes no point; the next run backs up nothing
    and the plan names the missing VM."""
    with (
        scratch_vm(faults, faults.free, "gone-vm"),
        policies(site, policy_yaml("s", faults.free, ["gone-vm"])),
    ):
        assert site.cli(capsys, "backup", "s").code == 0
        before = baseline(faults, {"r": site.repo})

        def delete(host: BackupHost, bs: BackupSnapshot) -> None:
            faults.vimcmd(faults.free, "vmsvc/power.off", bs.vm.vmid)
            assert faults.vimcmd(faults.free, "vmsvc/destroy", bs.vm.vmid).exit == 0

        result = during_the_backup(site, "s", delete)
        ledger.count("faults_injected")
        assert not result.ok and result.point_id is None
        assert "is no longer registered on esxi1" in (result.error or ""), result.error
        assert set(site.repo.point_ids()) == before.points["r"]
        plan = site.cli(capsys, "plan")
        assert "VM 'gone-vm' not found on host esxi1" in plan.out, plan.out
        before.refresh_hosts()  # the VM is gone on purpose
        assert_nothing_lost(ledger, before)


def test_a_vm_registered_again_during_its_backup(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unregistered and registered again (a new vmid) while it is read: the run fails naming that; our
    snapshot stays with the VM's files under the new id, and the next run removes it and backs the VM
    up incrementally (same UUID)."""
    with (
        scratch_vm(faults, faults.free, "rereg-vm", power="poweredOff"),
        policies(site, policy_yaml("s", faults.free, ["rereg-vm"])),
    ):
        assert site.cli(capsys, "backup", "s").code == 0
        before = baseline(faults, {"r": site.repo})

        def register_again(host: BackupHost, bs: BackupSnapshot) -> None:
            assert faults.vimcmd(faults.free, "vmsvc/unregister", bs.vm.vmid).exit == 0
            vmx = "/vmfs/volumes/datastore1/rereg-vm/rereg-vm.vmx"
            assert faults.vimcmd(faults.free, "solo/registervm", vmx).exit == 0

        result = during_the_backup(site, "s", register_again)
        ledger.count("faults_injected")
        assert not result.ok and "is no longer registered on esxi1" in (result.error or ""), result.error
        again = site.cli(capsys, "backup", "s")
        assert again.code == 0 and "rereg-vm: ok digest" in again.out, again.out + again.err[-2000:]
        assert "backup.orphaned_snapshot_removed" in again.err
        before.refresh_hosts()
        assert_nothing_lost(ledger, before)


def test_a_vm_renamed_during_its_backup(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """Renamed (licensed host, through the API) while it is read: the point is of the VM as it was
    when the run began; the policy, which names the old name, then selects nothing and the plan says
    so; the renamed VM's points stay restorable."""
    with (
        scratch_vm(faults, faults.licensed, "ren-vm"),
        policies(site, policy_yaml("s", faults.licensed, ["ren-vm"])),
    ):
        assert site.cli(capsys, "backup", "s").code == 0
        before = baseline(faults, {"r": site.repo})

        def rename(host: BackupHost, bs: BackupSnapshot) -> None:
            wait_task(find_vm(faults.api(faults.licensed), "ren-vm").Rename_Task("ren-vm-renamed"))

        result = during_the_backup(site, "s", rename)
        ledger.count("faults_injected")
        assert result.ok and result.point_id is not None, result.error
        assert site.repo.read_point(result.point_id).vm.name == "ren-vm"
        plan = site.cli(capsys, "plan")
        assert "VM 'ren-vm' not found on host esxi2" in plan.out, plan.out
        before.refresh_hosts()
        assert_nothing_lost(ledger, before)


def edit_vmx(lab: LabHandle, host: str, vm: str, change: Callable[[str], str]) -> None:
    """Edit a powered-off VM's .vmx and have the host read it again."""
    path = lab.local_path(host, f"[datastore1] {vm}/{vm}.vmx")
    path.write_text(change(path.read_text()))
    (vmid,) = [v["vmid"] for v in lab.client(host).state()["vms"] if v["name"] == vm]
    assert lab.vimcmd(host, "vmsvc/reload", vmid).exit == 0


def test_disks_resized_added_and_removed_between_runs(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each change of the VM's disks is followed by a backup that reads what changed in full with the
    reason (the disk resized; a disk the previous point has no record of), and every point before it
    still restores."""
    with (
        scratch_vm(faults, faults.free, "disk-vm", power="poweredOff"),
        policies(site, policy_yaml("s", faults.free, ["disk-vm"])),
    ):
        assert site.cli(capsys, "backup", "s").code == 0
        before = baseline(faults, {"r": site.repo})

        assert (
            faults.run(faults.free, "vmkfstools -X 6m /vmfs/volumes/datastore1/disk-vm/disk-vm_1.vmdk").exit
            == 0
        )
        (vmid,) = [v["vmid"] for v in faults.client(faults.free).state()["vms"] if v["name"] == "disk-vm"]
        assert faults.vimcmd(faults.free, "vmsvc/reload", vmid).exit == 0
        ledger.count("faults_injected")
        resized = site.cli(capsys, "backup", "s")
        assert resized.code == 0, resized.out + resized.err[-2000:]
        assert "Hard disk 2: the disk was resized from 2.0 MiB to 6.0 MiB" in resized.out, resized.out

        assert (
            faults.run(
                faults.free, "vmkfstools -c 2m -d thin /vmfs/volumes/datastore1/disk-vm/disk-vm_2.vmdk"
            ).exit
            == 0
        )
        third = (
            'scsi0:2.deviceType = "scsi-hardDisk"\nscsi0:2.fileName = "disk-vm_2.vmdk"\n'
            'scsi0:2.present = "TRUE"\n'
        )
        edit_vmx(faults, faults.free, "disk-vm", lambda t: t + third)
        ledger.count("faults_injected")
        added = site.cli(capsys, "backup", "s")
        assert added.code == 0, added.out + added.err[-2000:]
        assert "Hard disk 3: the previous restore point" in added.out, added.out
        assert "has no record of this disk" in added.out
        assert len(site.repo.read_point(site.repo.point_ids()[-1]).disks) == 3

        edit_vmx(faults, faults.free, "disk-vm", lambda t: re.sub(r"^scsi0:1\..*\n", "", t, flags=re.M))
        ledger.count("faults_injected")
        removed = site.cli(capsys, "backup", "s")
        assert removed.code == 0, removed.out + removed.err[-2000:]
        newest = site.repo.read_point(site.repo.point_ids()[-1])
        assert sorted(d.key for d in newest.disks) == [2000, 2002]
        assert removed.out.count("fallback") == 0 or "Hard disk 1" not in removed.out  # incremental
        before.refresh_hosts()
        assert_nothing_lost(ledger, before)


def test_a_snapshot_that_is_not_ours_is_left_alone_and_named(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    before = baseline(faults, {"r": site.repo})
    vmid = faults.vm(faults.free, "db 01")["vmid"]
    assert faults.vimcmd(faults.free, "vmsvc/snapshot.create", vmid, "before upgrade", "", "0", "0").exit == 0
    ledger.count("faults_injected")
    try:
        refused = site.cli(capsys, "backup", "free")
        assert refused.code == 1
        assert "has snapshots that are not ours ('before upgrade')" in refused.out, refused.out
        assert "remove or consolidate them" in refused.out
        assert host_state(faults, faults.free).snapshots["db 01"] == ["before upgrade"]  # untouched
    finally:
        snap = snapshot_ids(faults.vimcmd(faults.free, "vmsvc/snapshot.get", vmid).text)["before upgrade"]
        assert faults.vimcmd(faults.free, "vmsvc/snapshot.remove", vmid, snap).exit == 0  # the admin's
    again = site.cli(capsys, "backup", "free")
    assert again.code == 0, again.out + again.err[-3000:]
    assert_nothing_lost(ledger, before)


def test_the_host_rebooting_in_the_middle_of_a_run(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """While the disks are read the host goes down (API and SSH refuse, open connections cut) and
    comes back 3 s later: the run fails naming the lost connection; our snapshot, which survived the
    reboot, is removed once the host answers again (the removal is retried), else by the next run,
    which succeeds."""
    faults.client(faults.free).guest_write("db 01", 5, seed=next(_seeds))
    before = baseline(faults, {"r": site.repo})
    rebooted: list[threading.Timer] = []

    def reboot(disk: FrozenDisk, offset: int, length: int) -> None:
        if not rebooted:
            faults.fault(faults.free, "host-down")
            faults.fault(faults.free, "ssh-drop")
            timer = threading.Timer(3.0, lambda: faults.fault(faults.free, "host-up"))
            timer.start()
            rebooted.append(timer)

    desired = load_config(site.config)
    (result,) = backup_policy(desired, "free", options=BackupOptions(on_data=reboot, transport="ssh"))
    for timer in rebooted:
        timer.join()
    ledger.count("faults_injected")
    assert rebooted and not result.ok and result.point_id is None
    assert "connection" in (result.error or "").lower() or "refused" in (result.error or "").lower(), (
        result.error
    )
    again = site.cli(capsys, "backup", "free")
    assert again.code == 0, again.out + again.err[-3000:]
    assert_nothing_lost(ledger, before)
