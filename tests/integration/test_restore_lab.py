"""Restore against the lab, free (SSH) and licensed (API + HTTPS, SSH disabled) hosts: restored disks
equal the snapshot-time content (the guest writes after the backup), new VMs get a new identity,
overwrite is refused without ``--overwrite``, a SIGKILL at each stage of an overwrite leaves the VM
powered off where the next command (``--abort`` or ``--overwrite`` again) gives it back, a failed one
powers it on again, and the next backup after an overwrite is correct; ``--disk`` and ``--test``; the
same VM name on both hosts: an overwrite uses the overwritten VM's own points, the bare name is refused."""

from __future__ import annotations

import hashlib
import json
import posixpath
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler import cli
from reconciler.config import load_config
from reconciler.config.model import DesiredState
from reconciler.esxi.vmx import VmxFile
from reconciler.facts.inventory import BackupSnapshot
from reconciler.facts.points import RestorePoint
from reconciler.operations.backup import BackupOptions, backup_policy
from reconciler.operations.hosts import connect
from reconciler.operations.observe import observe
from reconciler.operations.ports import BackupHost
from reconciler.operations.repositories import open_repository
from reconciler.operations.restore import (
    OverwriteFailed,
    OverwriteJournal,
    RestoreOptions,
    disk_content,
    journal_path,
    restore_new_vm,
    restore_overwrite,
    test_restore,
)
from reconciler.repository import KdfParams, Repository
from tests.integration.labconfig import PASSPHRASE, policy_yaml, write_lab_config

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

HOSTILE = 'ファイル鯖 "q" $(x)'
SCRATCH_API = "app201 scratch"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Env:
    lab: LabHandle
    config: Path
    desired: DesiredState
    repo: Repository
    frozen: dict[tuple[str, int], str] = field(default_factory=dict)

    def on_snapshot(self, host: BackupHost, bs: BackupSnapshot) -> None:
        lab_host = self.lab.free if host.name == self.lab.free else self.lab.licensed
        for disk in bs.disks:
            data = self.lab.local_path(lab_host, disk.data_file).read_bytes()
            self.frozen[(bs.vm.name, disk.key)] = sha(data)

    def backup(self, policy: str, vm: str | None = None) -> RestorePoint:
        (res,) = backup_policy(
            self.desired, policy, vm=vm, options=BackupOptions(on_snapshot=self.on_snapshot)
        )
        assert res.ok and res.point_id, res.error
        return self.repo.read_point(res.point_id)

    def cli(self, *args: str) -> int:
        return cli.main(["--config", str(self.config), "--log-level", "warning", *args])


@pytest.fixture(scope="module")
def env(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("restore")
    policies = (
        policy_yaml("free", lab.free, ["web01", "db 01", HOSTILE])
        + policy_yaml("lic", lab.licensed, ["app201"])
        + policy_yaml("lic-scratch", lab.licensed, [SCRATCH_API])
    )
    cfg = write_lab_config(lab, root, policies)
    # the licensed host as in config.example: API only, no SSH
    host_file = cfg / "hosts" / f"{lab.licensed}.yaml"
    lines = [ln for ln in host_file.read_text().splitlines() if not ln.strip().startswith("ssh:")]
    host_file.write_text("\n".join([*lines, "  ssh: {enabled: false}"]) + "\n")
    Repository.init(root / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
    desired = load_config(cfg)
    return Env(lab, cfg, desired, open_repository(desired.repository("r")))


def vm_state(lab: LabHandle, host: str, name: str) -> dict[str, object] | None:
    return next((v for v in lab.client(host).state()["vms"] if v["name"] == name), None)


def remove_vm(env: Env, host_name: str, name: str) -> None:
    """Unregister a restored VM and delete its folder (lab cleanup)."""
    with connect(env.desired.host(host_name)) as host:
        vm = host.find_vm(name)
        if vm.power_state != "poweredOff":
            host.power_off(vm)
        host.unregister_vm(vm)
        host.delete_path(vm.vmx_path.rsplit("/", 1)[0])


def check_new_vm(env: Env, host_name: str, name: str, point: RestorePoint) -> None:
    """The restored VM: registered, its disks equal to the frozen content, a new identity."""
    lab = env.lab
    with connect(env.desired.host(host_name)) as host:
        vm = host.find_vm(name)
        assert vm.vmx_path.startswith("[datastore1] ")
        assert len(vm.disks) == len(point.disks)
        for disk, rec in zip(sorted(vm.disks, key=lambda d: d.key), point.disks, strict=True):
            desc = host.read_descriptor(disk.file)
            assert desc.flat_extent is not None and desc.flat_extent.file_name
            assert desc.capacity == rec.capacity
            flat = disk.file.rsplit("/", 1)[0] + "/" + desc.flat_extent.file_name
            assert sha(lab.local_path(host_name, flat).read_bytes()) == env.frozen[(point.vm.name, rec.key)]
        vmx = VmxFile.parse(lab.local_path(host_name, vm.vmx_path).read_text(encoding="utf-8"))
        assert vmx.get("displayName") == name
        assert vmx.get("uuid.action") == "create" and vmx.get("uuid.location") is None
        assert (
            vmx.get("ethernet0.generatedAddress") is None and vmx.get("ethernet0.addressType") == "generated"
        )
        assert not any(k.lower().endswith("ctkenabled") for k, _ in vmx.items())
        original = host.find_vm(point.vm.name)
        assert vm.uuid != original.uuid and vm.uuid
        assert vm.uuid.replace("-", "") == (vmx.get("uuid.bios") or "").replace(" ", "").replace("-", "")


# -- as a new VM -------------------------------------------------------------------------------------


def test_free_host_new_vm_equals_the_snapshot_content(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    lab = env.lab
    point = env.backup("free", "web01")
    lab.client(lab.free).guest_write("web01", 10, seed=901)  # after the point: must not be restored
    assert env.cli("restore", "web01", "--name", "web01 copy", "--power-on") == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "restored as new VM 'web01 copy'" in out and "powered on" in out
    # the host's receiver checked every piece as it wrote it: no whole-disk hash to print
    assert out.count("checked on the host as written") == len(point.disks) and "sha256" not in out
    try:
        check_new_vm(env, lab.free, "web01 copy", point)
        assert vm_state(lab, lab.free, "web01 copy")["power"] == "poweredOn"  # type: ignore[index]
        # the name is taken now: a second restore with it is refused, pointing at --overwrite
        assert env.cli("restore", "web01", "--name", "web01 copy") == 1
        assert "--overwrite" in capsys.readouterr().err
    finally:
        remove_vm(env, lab.free, "web01 copy")
    assert vm_state(lab, lab.free, "web01 copy") is None


def test_hostile_name_default_new_name(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    lab = env.lab
    point = env.backup("free", HOSTILE)
    assert env.cli("restore", HOSTILE) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    names = [
        v["name"] for v in lab.client(lab.free).state()["vms"] if str(v["name"]).startswith(HOSTILE + "-")
    ]
    assert len(names) == 1 and "-restored-" in str(names[0]), names
    copy = str(names[0])
    try:
        assert copy in out
        check_new_vm(env, lab.free, copy, point)
        # overwrite that copy from the same point (hostile names all the way through the swap)
        with connect(env.desired.host(lab.free)) as host:
            host.power_on(host.find_vm(copy))
        lab.client(lab.free).guest_write(copy, 10, seed=903)
        assert env.cli("restore", HOSTILE, "--overwrite", "--yes", "--to-vm", copy) == 0, capsys.readouterr()
        assert f"overwrote 2 disks of {copy}" in capsys.readouterr().out
        assert flat_sha(env, lab.free, copy) == {d.key: env.frozen[(HOSTILE, d.key)] for d in point.disks}
    finally:
        remove_vm(env, lab.free, str(names[0]))


def test_licensed_host_without_ssh_new_vm(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    lab = env.lab
    assert env.desired.host(lab.licensed).ssh.enabled is False
    point = env.backup("lic", "app201")
    lab.client(lab.licensed).guest_write("app201", 10, seed=902)
    capsys.readouterr()
    assert env.cli("--json", "restore", "app201", "--name", "app201-r") == 0, capsys.readouterr()
    try:
        check_new_vm(env, lab.licensed, "app201-r", point)
        # uploaded over HTTPS and read back: the whole disk's SHA-256 was compared
        report = json.loads(capsys.readouterr().out)
        assert [(d["verified"], d["sha256"]) for d in report["disks"]] == [
            ("read-back", env.frozen[("app201", rec.key)]) for rec in point.disks
        ]
    finally:
        remove_vm(env, lab.licensed, "app201-r")
    assert vm_state(lab, lab.licensed, "app201-r") is None


def test_licensed_host_without_ssh_overwrite(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    lab = env.lab
    with connect(env.desired.host(lab.licensed)) as host:
        seed = env.backup("lic", "app201")
        restore_new_vm(host, env.repo, seed, RestoreOptions(name=SCRATCH_API, power_on=True))
        try:
            p1 = env.backup("lic-scratch", SCRATCH_API)
            expected = {d.key: env.frozen[(SCRATCH_API, d.key)] for d in p1.disks}
            uuid = host.find_vm(SCRATCH_API).uuid
            lab.client(lab.licensed).guest_write(SCRATCH_API, 20, seed=961)
            old = disk_files(lab, lab.licensed, SCRATCH_API)
            code = env.cli("restore", SCRATCH_API, "--overwrite", "--yes", "--power-on")
            assert code == 0, capsys.readouterr()
            assert f"overwrote 2 disks of {SCRATCH_API}" in capsys.readouterr().out
            vm = host.find_vm(SCRATCH_API)
            assert vm.power_state == "poweredOn" and vm.uuid == uuid  # same identity
            assert flat_sha(env, lab.licensed, SCRATCH_API) == expected
            for files in old.values():
                assert not any(lab.local_path(lab.licensed, f).exists() for f in files)
            p2 = env.backup("lic-scratch", SCRATCH_API)
            for disk in p2.disks:
                assert sha(disk_content(env.repo, p2, disk.key)) == expected[disk.key]
        finally:
            remove_vm(env, lab.licensed, SCRATCH_API)


def test_a_journal_is_found_through_the_api_on_a_host_without_ssh(env: Env) -> None:
    """Without SSH, the daemon's observation finds overwrite journals with the datastore browser (one
    recursive search per datastore): the journal of app201 (as a killed overwrite leaves it) is seen,
    with its point and power state; a file of the same suffix deeper down or not a VM's is not."""
    lab = env.lab
    with connect(env.desired.host(lab.licensed)) as host:
        app = host.find_vm("app201")
    journal = OverwriteJournal(
        point="20261201T020000Z-feed", source="app201 on esxi2", started=datetime.now(timezone.utc),
        power_state="poweredOn", stamp="s", point_vm="app201",
    )  # fmt: skip
    planted = lab.local_path(lab.licensed, journal_path(app))
    deeper = planted.parent / "sub" / planted.name
    try:
        planted.write_bytes(journal.to_json())
        deeper.parent.mkdir()
        deeper.write_bytes(journal.to_json())
        seen = observe(env.desired, now=datetime.now(timezone.utc), history={})
        ((name, notice),) = seen.hosts[lab.licensed].unfinished_overwrites
        assert name == "app201" and "--point 20261201T020000Z-feed" in notice and "it was poweredOn" in notice
        assert seen.hosts[lab.free].unfinished_overwrites == ()
    finally:
        planted.unlink(missing_ok=True)
        deeper.unlink(missing_ok=True)
        if deeper.parent.exists():
            deeper.parent.rmdir()
    seen = observe(env.desired, now=datetime.now(timezone.utc), history={})
    assert seen.hosts[lab.licensed].unfinished_overwrites == ()


def test_test_restore_boots_and_removes_the_vm(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    lab = env.lab
    env.backup("lic", "app201")
    before = {v["name"] for v in lab.client(lab.licensed).state()["vms"]}
    result = test_restore(env.desired, "r", "app201", None, lab.licensed, "datastore1")
    assert result.ok, result.error
    assert result.power_state == "poweredOn" and result.heartbeat in ("green", "gray")
    assert {v["name"] for v in lab.client(lab.licensed).state()["vms"]} == before
    ds = lab.local_path(lab.licensed, "[datastore1] x").parent
    assert not [p for p in ds.iterdir() if "testrestore" in p.name]
    # the CLI, on the free host
    env.backup("free", "db 01")
    assert env.cli("restore", "db 01", "--test") == 0, capsys.readouterr()
    assert "poweredOn" in capsys.readouterr().out
    assert not [v for v in lab.client(lab.free).state()["vms"] if "testrestore" in str(v["name"])]


# -- overwrite ---------------------------------------------------------------------------------------


SCRATCH = "web01 scratch"
SCRATCH_LIC = "app202 scratch"


@pytest.fixture(scope="module")
def ssh_env(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """Both hosts with SSH (the licensed host's CBT overwrite edits the .vmx over SSH), and two scratch
    VMs (restored copies of web01 and app202, powered on) to overwrite, removed at the end: the lab's
    own VMs keep their disk files for the other tests of the session."""
    root = tmp_path_factory.mktemp("restore-ssh")
    policies = (
        policy_yaml("seed", lab.free, ["web01"])
        + policy_yaml("seed-lic", lab.licensed, ["app202"])
        + policy_yaml("free", lab.free, [SCRATCH, "db 01"])
        + policy_yaml("lic-cbt", lab.licensed, [SCRATCH_LIC])
    )
    cfg = write_lab_config(lab, root, policies)
    Repository.init(root / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
    desired = load_config(cfg)
    env = Env(lab, cfg, desired, open_repository(desired.repository("r")))
    made = []
    try:
        for policy, host_name, vm, scratch in (
            ("seed", lab.free, "web01", SCRATCH),
            ("seed-lic", lab.licensed, "app202", SCRATCH_LIC),
        ):
            point = env.backup(policy, vm)
            with connect(desired.host(host_name)) as host:
                restore_new_vm(host, env.repo, point, RestoreOptions(name=scratch, power_on=True))
            made.append((host_name, scratch))
        yield env
    finally:
        for host_name, scratch in made:
            remove_vm(env, host_name, scratch)


def disk_files(lab: LabHandle, host: str, name: str) -> dict[int, tuple[str, str]]:
    """Disk key -> (descriptor, extent) of the VM's base disks, as the lab's state reports them."""
    vm = vm_state(lab, host, name)
    assert vm is not None
    out = {}
    for d in vm["disks"]:  # type: ignore[attr-defined]
        base = d["chain"][-1]
        out[int(d["key"])] = (str(base["descriptor"]), str(base["extent"]))
    return out


def flat_sha(env: Env, host_name: str, vm_name: str) -> dict[int, str]:
    """SHA-256 of each current (base) disk of a VM, read from the lab's files."""
    out = {}
    with connect(env.desired.host(host_name)) as host:
        for disk in host.find_vm(vm_name).disks:
            desc = host.read_descriptor(disk.file)
            assert desc.flat_extent is not None and desc.flat_extent.file_name
            flat = disk.file.rsplit("/", 1)[0] + "/" + desc.flat_extent.file_name
            out[disk.key] = sha(env.lab.local_path(host_name, flat).read_bytes())
    return out


def test_overwrite_is_refused_without_overwrite_and_confirmation(
    ssh_env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    env, lab = ssh_env, ssh_env.lab
    env.backup("free", "db 01")
    before = flat_sha(env, lab.free, "db 01")
    assert env.cli("restore", "db 01", "--name", "db 01") == 1  # its own name: that is an overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert env.cli("restore", "db 01", "--disk", "scsi0:1") == 64
    assert "--overwrite" in capsys.readouterr().err
    assert env.cli("restore", "db 01", "--overwrite") == 64  # not a terminal and no --yes: no question
    assert "Not asked: no terminal; nothing changed (add --yes)" in capsys.readouterr().err
    assert env.cli("restore", "db 01", "--overwrite", "--yes", "--to-vm", "nope") == 64
    assert "nothing to overwrite" in capsys.readouterr().err
    assert flat_sha(env, lab.free, "db 01") == before
    assert vm_state(lab, lab.free, "db 01")["power"] == "poweredOn"  # type: ignore[index]


def test_free_overwrite_then_the_next_backup_is_correct(
    ssh_env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    env, lab = ssh_env, ssh_env.lab
    p1 = env.backup("free", SCRATCH)
    expected = {d.key: env.frozen[(SCRATCH, d.key)] for d in p1.disks}
    lab.client(lab.free).guest_write(SCRATCH, 20, seed=911)
    env.backup("free", SCRATCH)  # a newer point with other content
    lab.client(lab.free).guest_write(SCRATCH, 5, seed=912)
    with connect(env.desired.host(lab.free)) as host:  # someone changes the VM's settings
        vm = host.power_off(host.find_vm(SCRATCH))
        backed_up = host.read_vmx(vm)
        changed = host.read_vmx(vm)
        changed.set("memSize", str(int(backed_up.get("memSize") or "1024") * 2))
        host.write_file(vm.vmx_path, changed.dumps().encode())
        host.power_on(host.reload_vm(vm))
    folder = lab.local_path(lab.free, f"[datastore1] {SCRATCH}")
    old_nvram = folder / str(backed_up.get("nvram"))
    assert old_nvram.exists()
    old = disk_files(lab, lab.free, SCRATCH)
    assert env.cli("restore", SCRATCH, "--point", p1.id, "--overwrite", "--yes", "--power-on") == 0, (
        capsys.readouterr()
    )
    assert "overwrote 2 disks of web01 scratch" in capsys.readouterr().out
    assert flat_sha(env, lab.free, SCRATCH) == expected
    # the whole VM is back as backed up: its configuration (memory) and its .nvram, under its name
    with connect(env.desired.host(lab.free)) as host:
        restored_vmx = host.read_vmx(host.find_vm(SCRATCH))
    assert restored_vmx.get("memSize") == backed_up.get("memSize")
    assert restored_vmx.get("displayName") == SCRATCH
    nvram = str(restored_vmx.get("nvram"))
    assert "-restored-" in nvram and (folder / nvram).exists() and not old_nvram.exists()
    new = disk_files(lab, lab.free, SCRATCH)
    assert all("-restored-" in new[k][0] for k in old)
    for files in old.values():  # the originals are gone once the restored disks are in use
        assert not any(lab.local_path(lab.free, f).exists() for f in files)
    assert vm_state(lab, lab.free, SCRATCH)["power"] == "poweredOn"  # type: ignore[index]
    # the next backup (digest compare against the newer point) stores exactly the restored content
    p3 = env.backup("free", SCRATCH)
    assert p3.mode == "digest"
    for disk in p3.disks:
        assert (
            sha(disk_content(env.repo, p3, disk.key)) == expected[disk.key] == env.frozen[(SCRATCH, disk.key)]
        )


def test_licensed_cbt_overwrite_makes_the_next_backup_full(ssh_env: Env) -> None:
    env, lab = ssh_env, ssh_env.lab
    with connect(env.desired.host(lab.licensed)) as host:
        host.set_cbt(host.find_vm(SCRATCH_LIC), True)
        try:
            p1 = env.backup("lic-cbt", SCRATCH_LIC)
            lab.client(lab.licensed).guest_write(SCRATCH_LIC, 10, seed=921)
            p2 = env.backup("lic-cbt", SCRATCH_LIC)
            assert p2.mode == "cbt"
            args = ["restore", SCRATCH_LIC, "--point", p1.id, "--overwrite", "--yes", "--power-on"]
            code = cli.main(["--config", str(env.config), "--log-level", "warning", *args])
            assert code == 0
            vm = host.find_vm(SCRATCH_LIC)
            assert vm.power_state == "poweredOn" and vm.cbt_enabled
            lab.client(lab.licensed).guest_write(SCRATCH_LIC, 2, seed=922)
            p3 = env.backup("lic-cbt", SCRATCH_LIC)
            # the old changeIds belong to the replaced disks: CBT must not be trusted, the read is full
            assert p3.mode == "full" and p3.fallback_reason, p3
            for disk in p3.disks:
                assert sha(disk_content(env.repo, p3, disk.key)) == env.frozen[(SCRATCH_LIC, disk.key)]
            p4 = env.backup("lic-cbt", SCRATCH_LIC)  # and CBT works again from the new baseline
            assert p4.mode == "cbt"
        finally:
            host.set_cbt(host.find_vm(SCRATCH_LIC), False)
            host.power_on(host.find_vm(SCRATCH_LIC))  # as the fixture made it


def test_single_disk_overwrite(ssh_env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env, lab = ssh_env, ssh_env.lab
    p1 = env.backup("free", SCRATCH)
    lab.client(lab.free).guest_write(SCRATCH, 20, seed=931)
    after_write = flat_sha(env, lab.free, SCRATCH)
    (second,) = [d for d in p1.disks if d.key == 2001]
    assert env.cli("restore", SCRATCH, "--overwrite", "--yes", "--disk", second.label, "--power-on") == 0
    assert "overwrote 1 disk of web01 scratch" in capsys.readouterr().out
    now = flat_sha(env, lab.free, SCRATCH)
    assert now[2001] == env.frozen[(SCRATCH, 2001)]
    assert now[2000] == after_write[2000]  # the other disk is untouched


_KILLED_RESTORE = """
import pathlib, sys, time
from reconciler.config import load_config
from reconciler.operations.repositories import open_repository
from reconciler.operations.restore import RestoreOptions, find_point, restore_overwrite
from reconciler.operations.hosts import connect

config, marker, vm, stage = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]

def hang(*_):
    marker.write_text(stage)
    time.sleep(600)

def on_stage(name):
    if name == stage:
        hang()

desired = load_config(config)
repo = open_repository(desired.repository("r"))
point = find_point(repo, vm, None)
options = RestoreOptions(on_data=hang if stage == "writing" else None, on_stage=on_stage, shutdown_timeout=5)
with connect(desired.host("esxi1")) as host:
    restore_overwrite(host, repo, point, host.find_vm(vm), options)
"""


def kill_overwrite_at(env: Env, tmp_path: Path, vm: str, stage: str) -> None:
    """Run an overwrite of ``vm`` in another process and SIGKILL it at ``stage`` (see RestoreOptions)."""
    marker = tmp_path / f"at-{stage}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RESTORE, str(env.config), str(marker), vm, stage],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"the restore never reached {stage}"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()


def leftovers(env: Env, vm: str) -> list[Path]:
    """``-restored-`` files in the VM's folder that the VM does not use (disks or .nvram)."""
    lab = env.lab
    vmx_path = str(vm_state(lab, lab.free, vm)["vmx"])  # type: ignore[index]
    vmx = lab.local_path(lab.free, vmx_path)
    in_use = {posixpath.basename(f) for pair in disk_files(lab, lab.free, vm).values() for f in pair}
    in_use.add(str(VmxFile.parse(vmx.read_text(encoding="utf-8")).get("nvram")))
    return sorted(p for p in vmx.parent.iterdir() if "-restored-" in p.name and p.name not in in_use)


@pytest.mark.parametrize(
    ("stage", "then"),
    [
        ("powered-off", "abort"),  # powered off, nothing written yet
        ("writing", "abort"),  # half-written restored disks beside the untouched originals
        ("writing", "overwrite"),
        ("switched", "abort"),  # on the verified restored disks, the originals not deleted yet
        ("switched", "overwrite"),
    ],
)
def test_killed_overwrite_leaves_the_vm_powered_off_and_the_next_command_gives_it_back(
    ssh_env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str], stage: str, then: str
) -> None:
    """SIGKILL at each stage of an overwrite: the VM is left powered off (the overwrite powered it off),
    on its original disks before the switch and on the verified restored ones after it; the journal in
    its folder lets the next command say so, and `--abort` (power back on, leftovers gone, nothing of
    the VM deleted) or a new `--overwrite` (finished, replaced files gone) get it back."""
    env, lab = ssh_env, ssh_env.lab
    point = env.backup("free", SCRATCH)
    restored = {d.key: sha(disk_content(env.repo, point, d.key)) for d in point.disks}
    seed = 9400 + 10 * ["powered-off", "writing", "switched"].index(stage) + (then == "abort")
    lab.client(lab.free).guest_write(SCRATCH, 10, seed=seed)  # the VM now differs from the point
    files = disk_files(lab, lab.free, SCRATCH)
    content = flat_sha(env, lab.free, SCRATCH)
    assert content != restored
    vmx_path = str(vm_state(lab, lab.free, SCRATCH)["vmx"])  # type: ignore[index]
    vmx_before = lab.local_path(lab.free, vmx_path).read_bytes()
    assert vm_state(lab, lab.free, SCRATCH)["power"] == "poweredOn"  # type: ignore[index]
    kill_overwrite_at(env, tmp_path, SCRATCH, stage)

    # what the kill leaves: the VM powered off, the journal beside its .vmx
    assert vm_state(lab, lab.free, SCRATCH)["power"] == "poweredOff"  # type: ignore[index]
    with connect(env.desired.host(lab.free)) as host:
        journal_file = lab.local_path(lab.free, journal_path(host.find_vm(SCRATCH)))
    assert json.loads(journal_file.read_text())["power_state"] == "poweredOn"
    if stage == "switched":
        assert flat_sha(env, lab.free, SCRATCH) == restored
        now = disk_files(lab, lab.free, SCRATCH)
        assert all("-restored-" in now[k][0] for k in files)
        originals = [lab.local_path(lab.free, f) for pair in files.values() for f in pair]
        assert all(p.exists() for p in originals)  # not referenced any more, not deleted yet
    else:
        assert disk_files(lab, lab.free, SCRATCH) == files
        assert flat_sha(env, lab.free, SCRATCH) == content
        assert lab.local_path(lab.free, vmx_path).read_bytes() == vmx_before
        assert bool(leftovers(env, SCRATCH)) == (stage == "writing")  # half-written, never used

    # the next restore of the VM says what happened and the way on (here: not confirmed, nothing done)
    assert env.cli("restore", SCRATCH, "--overwrite") == 64
    assert "an overwrite that did not finish" in capsys.readouterr().out
    # and so do the daemon's status and `plan`: every cycle looks for the journals
    assert unfinished(env).startswith(f"VM {SCRATCH!r} on {lab.free} is powered off after an overwrite")
    assert env.cli("plan") in (0, 2)
    assert f"{SCRATCH!r} on {lab.free} is powered off after an overwrite that did not finish" in (
        capsys.readouterr().out
    )

    if then == "abort":
        assert env.cli("restore", SCRATCH, "--abort", "--host", lab.free) == 0, capsys.readouterr()
        out = capsys.readouterr().out
        assert "powered on again" in out
        assert vm_state(lab, lab.free, SCRATCH)["power"] == "poweredOn"  # type: ignore[index]
        if stage == "switched":  # cannot be undone: stays on the restored disks, the replaced kept
            assert "had already switched" in out and flat_sha(env, lab.free, SCRATCH) == restored
            for descriptor, _ in files.values():
                assert descriptor in out and lab.local_path(lab.free, descriptor).exists()
            with connect(env.desired.host(lab.free)) as host:  # the admin deletes them
                for descriptor, _ in files.values():
                    host.delete_disk(descriptor)
        else:
            assert "gave up" in out and flat_sha(env, lab.free, SCRATCH) == content
            assert disk_files(lab, lab.free, SCRATCH) == files and not leftovers(env, SCRATCH)
            assert lab.local_path(lab.free, vmx_path).read_bytes() == vmx_before
    else:
        assert env.cli("restore", SCRATCH, "--overwrite", "--yes") == 0, capsys.readouterr()
        out = capsys.readouterr().out
        assert "did not finish" in out and "left powered off (it was on before" in out
        assert flat_sha(env, lab.free, SCRATCH) == restored
        for pair in files.values():  # what the killed run replaced is gone too
            assert not any(lab.local_path(lab.free, f).exists() for f in pair)
        assert not leftovers(env, SCRATCH)  # none of the killed run
        with connect(env.desired.host(lab.free)) as host:
            host.power_on(host.find_vm(SCRATCH))  # as the fixture made it
    assert not journal_file.exists()
    assert unfinished(env) == ""
    assert env.cli("restore", SCRATCH, "--abort") == 0  # nothing left to abort
    assert "nothing to abort" in capsys.readouterr().out


def unfinished(env: Env) -> str:
    """What a daemon cycle's observation says of an unfinished overwrite of SCRATCH ("" for nothing)."""
    seen = observe(env.desired, now=datetime.now(timezone.utc), history={})
    return dict(seen.hosts[env.lab.free].unfinished_overwrites).get(SCRATCH, "")


def test_failed_overwrite_gives_the_vm_its_power_back(ssh_env: Env) -> None:
    """A failure that is not a kill (here: mid-write) removes what was written and powers the VM on again."""
    env, lab = ssh_env, ssh_env.lab
    point = env.backup("free", SCRATCH)
    content = flat_sha(env, lab.free, SCRATCH)

    def fail(disk: object, offset: int, length: int) -> None:
        raise RuntimeError("the NAS went away")

    with connect(env.desired.host(lab.free)) as host:
        with pytest.raises(OverwriteFailed) as failed:
            restore_overwrite(
                host, env.repo, point, host.find_vm(SCRATCH), RestoreOptions(on_data=fail, shutdown_timeout=5)
            )
        assert failed.value.cause == "the NAS went away"
        assert (
            failed.value.vm_state
            == f"VM {SCRATCH!r} is unchanged, on its original disks, and powered on again"
        )
        vm = host.find_vm(SCRATCH)
        assert vm.power_state == "poweredOn" and not host.file_exists(journal_path(vm))
    assert flat_sha(env, lab.free, SCRATCH) == content and not leftovers(env, SCRATCH)


# -- the same VM name on both hosts ------------------------------------------------------------------

TWIN = "twin web"


@pytest.fixture(scope="module")
def twin_env(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A VM named ``twin web`` on each host (scratch copies of web01 and app201, so different VMs with
    different content), each backed up from its own host; removed at the end."""
    root = tmp_path_factory.mktemp("restore-twin")
    policies = (
        policy_yaml("seed", lab.free, ["web01"])
        + policy_yaml("seed-lic", lab.licensed, ["app201"])
        + policy_yaml("twin-1", lab.free, [TWIN])
        + policy_yaml("twin-2", lab.licensed, [TWIN])
    )
    cfg = write_lab_config(lab, root, policies)
    Repository.init(root / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
    desired = load_config(cfg)
    env = Env(lab, cfg, desired, open_repository(desired.repository("r")))
    made = []
    try:
        for policy, host_name, vm in (("seed", lab.free, "web01"), ("seed-lic", lab.licensed, "app201")):
            point = env.backup(policy, vm)
            with connect(desired.host(host_name)) as host:
                restore_new_vm(host, env.repo, point, RestoreOptions(name=TWIN, power_on=True))
            made.append(host_name)
        yield env
    finally:
        for host_name in made:
            remove_vm(env, host_name, TWIN)


def test_same_vm_name_on_both_hosts_overwrite_uses_that_hosts_point(
    twin_env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    env, lab = twin_env, twin_env.lab
    p1 = env.backup("twin-1", TWIN)
    p2 = env.backup("twin-2", TWIN)  # the newest point of the name: the one the old code took
    assert (p1.vm.host, p2.vm.host) == (lab.free, lab.licensed) and p1.vm.uuid != p2.vm.uuid
    own = {d.key: sha(disk_content(env.repo, p1, d.key)) for d in p1.disks}
    assert own != {d.key: sha(disk_content(env.repo, p2, d.key)) for d in p2.disks}
    lab.client(lab.free).guest_write(TWIN, 20, seed=971)  # esxi1's VM differs from its point now

    def snapshot() -> dict[str, object]:
        """Everything an overwrite would change, on both hosts."""
        out: dict[str, object] = {}
        for h in (lab.free, lab.licensed):
            vm = vm_state(lab, h, TWIN)
            assert vm is not None
            folder = lab.local_path(h, str(vm["vmx"])).parent
            out[h] = (
                flat_sha(env, h, TWIN),
                disk_files(lab, h, TWIN),
                vm["power"],
                lab.local_path(h, str(vm["vmx"])).read_bytes(),
                sorted(p.name for p in folder.iterdir()),
            )
        return out

    before = snapshot()
    # the name alone is ambiguous: refused, the candidates listed, nothing written
    assert env.cli("restore", TWIN, "--overwrite", "--yes") == 64
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 different VMs named 'twin web'" in err
    for p in (p1, p2):
        assert f"{p.vm.host} uuid {p.vm.uuid} newest" in err and p.id in err
    assert "--from-host" in err
    assert snapshot() == before
    # the other host's point named explicitly is not put over esxi1's VM without --to-vm
    assert env.cli("restore", TWIN, "--point", p2.id, "--overwrite", "--yes", "--host", lab.free) == 64
    err = capsys.readouterr().err
    assert f"is of VM 'twin web' from {lab.licensed}" in err and "--to-vm" in err
    assert snapshot() == before
    # --host esxi1 with --overwrite: esxi1's VM, from its own newest point
    with connect(env.desired.host(lab.free)) as host:
        uuid = host.find_vm(TWIN).uuid
    assert env.cli("restore", TWIN, "--overwrite", "--yes", "--host", lab.free, "--power-on") == 0, (
        capsys.readouterr()
    )
    out = capsys.readouterr().out
    assert f"restore point {p1.id} of VM 'twin web' from {lab.free} (uuid {p1.vm.uuid})" in out
    assert f"overwrote 2 disks of twin web on {lab.free}" in out and "DIFFERENT" not in out
    assert flat_sha(env, lab.free, TWIN) == own
    with connect(env.desired.host(lab.free)) as host:
        vm = host.find_vm(TWIN)
        assert vm.uuid == uuid and vm.power_state == "poweredOn"
    assert snapshot()[lab.licensed] == before[lab.licensed]  # the other host's VM untouched
