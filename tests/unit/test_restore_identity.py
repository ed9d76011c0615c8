"""Same-named VMs are different VMs: a real repository holding points of ``web01`` from two hosts (the
newest point from the other host, as with a DR copy backed up later) and of a VM re-created under the
same name. Restore and export pick points by VM identity (host, uuid), refuse an ambiguous name with the
candidates listed and nothing written, and an overwrite takes only the VM's own points unless the other
VM is named (``--to-vm``), which then keeps its own identity. The overwrite journal a killed run leaves
tells the next command where the VM is and how to get it back."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler import cli
from reconciler.esxi.vmx import VmxFile
from reconciler.facts.inventory import VmInfo
from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.operations.restore import (
    AmbiguousVmError,
    OverwriteJournal,
    RestoreError,
    _keep_identity,
    check_overwrite,
    find_point,
    same_vm,
)
from reconciler.repository import CHUNK_SIZE, Repository

UUID1 = "564d0011-2233-4455-6677-8899aabbcc01"
UUID2 = "564d0011-2233-4455-6677-8899aabbcc02"
UUID3 = "564d0011-2233-4455-6677-8899aabbcc03"
T0 = datetime(2026, 3, 1, 2, 0, tzinfo=timezone.utc)


def vmx_text(host: str, uuid: str) -> str:
    return (
        '.encoding = "UTF-8"\ndisplayName = "web01"\n'
        f'uuid.bios = "{uuid}"\nannotation = "the web01 of {host}"\n'
        'scsi0:0.present = "TRUE"\nscsi0:0.fileName = "web01.vmdk"\n'
    )


def add_point(repo: Repository, host: str, uuid: str, when: datetime, *, vm: str = "web01") -> RestorePoint:
    """A successful point of a one-disk VM whose disk and .vmx say which host's VM it is."""
    writer = repo.chunk_writer(CHUNK_SIZE)
    writer.write(0, (f"disk of {host} {uuid} at {when}".encode() * 40000)[:CHUNK_SIZE])
    point = RestorePoint(
        id=new_point_id(when),
        policy=f"nightly-{host}",
        vm=VmRef(vm, uuid, host, "7"),
        started=when,
        snapshot_time=when,
        finished=when + timedelta(minutes=5),
        status="success",
        mode="full",
        config_revision="git:abc",
        files=(repo.write_file("web01.vmx", vmx_text(host, uuid).encode()),),
        disks=(
            DiskRecord(2000, "Hard disk 1", "[datastore1] web01/web01.vmdk", CHUNK_SIZE, writer.finish()),
        ),
    )
    repo.write_point(point)
    return point


@pytest.fixture
def two_hosts(tmp_path: Path) -> tuple[Repository, dict[str, RestorePoint]]:
    """web01 backed up on esxi1 (two points) and on esxi2 (newest of all)."""
    repo = Repository.init(tmp_path / "repo")
    points = {
        "esxi1-old": add_point(repo, "esxi1", UUID1, T0),
        "esxi1": add_point(repo, "esxi1", UUID1, T0 + timedelta(days=1)),
        "esxi2": add_point(repo, "esxi2", UUID2, T0 + timedelta(days=1, hours=1)),
    }
    return repo, points


def vm_info(name: str, uuid: str | None, power_state: str = "poweredOn") -> VmInfo:
    vmx = "[datastore1] web01/web01.vmx"
    return VmInfo("7", name, uuid, None, power_state, vmx, "datastore1", (), (), False, "vmx-14")


def test_same_name_on_two_hosts_is_never_resolved_by_time(
    two_hosts: tuple[Repository, dict[str, RestorePoint]],
) -> None:
    repo, points = two_hosts
    with pytest.raises(AmbiguousVmError) as refused:
        find_point(repo, "web01", None)  # the old behaviour took esxi2's point: the newest by name
    message = str(refused.value)
    assert "\n" not in message and "2 different VMs named 'web01'" in message
    for key, uuid in (("esxi1", UUID1), ("esxi2", UUID2)):
        assert (
            f"{key} uuid {uuid} newest {points[key].time:%Y-%m-%d %H:%M} UTC (point {points[key].id})"
            in message
        )
    assert "--from-host HOST" in message and "--point ID" in message
    assert [(c.host, c.uuid, c.points) for c in refused.value.candidates] == [
        ("esxi1", UUID1, 2),
        ("esxi2", UUID2, 1),
    ]
    # the source chosen by host, or by host and uuid (the VM being overwritten): that VM's newest point
    assert find_point(repo, "web01", "latest", host="esxi1") == points["esxi1"]
    assert find_point(repo, "web01", None, host="esxi1", uuid=UUID1) == points["esxi1"]
    assert find_point(repo, "web01", None, host="esxi2") == points["esxi2"]
    with pytest.raises(RestoreError, match="no successful restore point of VM 'web01' from esxi1 with uuid"):
        find_point(repo, "web01", None, host="esxi1", uuid=UUID2)
    # an explicit point is of one VM: asking for it from another host is refused
    assert find_point(repo, "web01", points["esxi2"].id) == points["esxi2"]
    with pytest.raises(RestoreError, match=r"is of VM 'web01' from esxi2 \(uuid .*cc02\), not from esxi1"):
        find_point(repo, "web01", points["esxi2"].id, host="esxi1")


def test_a_recreated_vm_on_one_host_is_ambiguous_too(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    old = add_point(repo, "esxi1", UUID1, T0)
    new = add_point(repo, "esxi1", UUID3, T0 + timedelta(days=2))
    with pytest.raises(AmbiguousVmError) as refused:
        find_point(repo, "web01", None, host="esxi1")
    message = str(refused.value)
    assert UUID1 in message and UUID3 in message and old.id in message and new.id in message
    assert "--from-host" not in message and "--point ID" in message  # the host does not tell them apart
    assert find_point(repo, "web01", None, host="esxi1", uuid=UUID3) == new


def test_overwrite_takes_only_the_vms_own_points(
    two_hosts: tuple[Repository, dict[str, RestorePoint]],
) -> None:
    _, points = two_hosts
    esxi1_web01 = vm_info("web01", UUID1)
    assert same_vm(points["esxi1"], "esxi1", esxi1_web01)
    assert same_vm(points["esxi1"], "esxi1", vm_info("web01-renamed", UUID1))  # a rename keeps the VM
    assert not same_vm(points["esxi2"], "esxi1", esxi1_web01)  # same name, other host
    assert not same_vm(points["esxi1"], "esxi1", vm_info("web01", UUID3))  # re-created: another VM
    assert not same_vm(points["esxi1"], "esxi2", esxi1_web01)
    check_overwrite(points["esxi1"], "esxi1", esxi1_web01, other_vm=False)
    with pytest.raises(RestoreError) as refused:  # e.g. `--point <esxi2's> --overwrite --host esxi1`
        check_overwrite(points["esxi2"], "esxi1", esxi1_web01, other_vm=False)
    message = str(refused.value)
    assert (
        "\n" not in message and "from esxi2" in message and UUID1 in message and "nothing changed" in message
    )
    assert "--to-vm web01" in message
    check_overwrite(points["esxi2"], "esxi1", esxi1_web01, other_vm=True)  # said explicitly: allowed


def test_a_cross_vm_overwrite_keeps_the_targets_identity() -> None:
    point_vmx = VmxFile.parse(
        'uuid.bios = "11 11"\nuuid.location = "22 22"\nvc.uuid = "33 33"\nmemSize = "4096"\n'
        'ethernet0.present = "TRUE"\nethernet0.addressType = "generated"\n'
        'ethernet0.generatedAddress = "00:0c:29:00:00:01"\nethernet0.generatedAddressOffset = "0"\n'
        'ethernet1.present = "TRUE"\nethernet1.addressType = "static"\n'
        'ethernet1.address = "00:50:56:00:00:09"\n'
    )
    target = VmxFile.parse(
        'uuid.bios = "aa aa"\nvc.uuid = "bb bb"\nuuid.action = "keep"\nmemSize = "1024"\n'
        'ethernet0.present = "TRUE"\nethernet0.addressType = "static"\n'
        'ethernet0.address = "00:50:56:00:00:01"\n'
    )
    _keep_identity(point_vmx, target)
    assert point_vmx.get("memSize") == "4096"  # the configuration is the point's
    assert (point_vmx.get("uuid.bios"), point_vmx.get("vc.uuid")) == ("aa aa", "bb bb")
    assert point_vmx.get("uuid.location") is None and point_vmx.get("uuid.action") == "keep"
    assert point_vmx.get("ethernet0.addressType") == "static"
    assert point_vmx.get("ethernet0.address") == "00:50:56:00:00:01"
    assert point_vmx.get("ethernet0.generatedAddress") is None
    # a card the target does not have gets a generated address, not the other VM's
    assert (
        point_vmx.get("ethernet1.addressType") == "generated" and point_vmx.get("ethernet1.address") is None
    )


def test_the_overwrite_journal_round_trips_and_says_the_way_back() -> None:
    journal = OverwriteJournal(
        point="20260301T020000000000Z-0badcafe",
        source="VM 'web01' from esxi2 (uuid x)",
        started=T0,
        power_state="poweredOn",
        stamp="20260301020000-abcd",
        replaced=("[datastore1] web01/web01.vmdk",),
        nvram="[datastore1] web01/web01.nvram",
        cbt_nodes=("scsi0:0",),
        point_vm="web01",
        other_vm=True,
    )
    assert OverwriteJournal.from_json(journal.to_json()) == journal
    notice = journal.notice(vm_info("web 01's", UUID1, "poweredOff"), "esxi1")
    assert "\n" not in notice and "is powered off" in notice and "it was poweredOn before" in notice
    assert "restore point 20260301T020000000000Z-0badcafe" in notice
    target = """'web 01'"'"'s'"""  # as a shell needs it
    # the same overwrite again (same point, same explicitly named other VM), or give it up
    assert (
        "`esxi-reconciler restore web01 --host esxi1 --overwrite --point 20260301T020000000000Z-0badcafe"
        f" --to-vm {target}` to finish it"
    ) in notice
    assert (
        f"`esxi-reconciler restore {target} --host esxi1 --abort` to give it up and power the VM back on"
        in notice
    )
    broken = OverwriteJournal.from_json(b"{half a journ")
    assert broken.power_state is None and broken.replaced == ()
    notice = broken.notice(vm_info("web01", UUID1, "poweredOff"), "esxi1")
    assert (
        "power state is unknown" in notice
        and "--point" not in notice
        and "power the VM back on" not in notice
    )


# -- the commands, on a real repository and config (the refusals happen before any host is contacted) --


def write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "config"
    (cfg / "hosts").mkdir(parents=True)
    secret = tmp_path / "pw"
    secret.write_text("x")
    secret.chmod(0o600)
    for name, port in (("esxi1", 9), ("esxi2", 19)):  # closed ports: a host contacted by mistake fails
        (cfg / "hosts" / f"{name}.yaml").write_text(
            f"""apiVersion: esxi-reconciler/v1
kind: Host
metadata: {{name: {name}}}
spec:
  address: 127.0.0.1
  credentials: {{user: root, password: {{file: {secret}}}}}
  api: {{port: {port}, thumbprint: "{":".join(["AB"] * 32)}"}}
  ssh: {{enabled: false}}
"""
        )
    (cfg / "repo.yaml").write_text(
        f"""apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: r}}
spec:
  backend: {{type: local, path: {tmp_path / "repo"}}}
  encryption: {{enabled: false}}
"""
    )
    return cfg


def run(cfg: Path, *args: str) -> int:
    return cli.main(["--config", str(cfg), "--log-level", "error", *args])


def test_commands_refuse_the_ambiguous_name_and_use_the_chosen_host(
    two_hosts: tuple[Repository, dict[str, RestorePoint]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, points = two_hosts
    cfg = write_config(tmp_path)
    out_dir = tmp_path / "out"
    assert run(cfg, "export", "web01", "--to", str(out_dir)) == 64
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and points["esxi1"].id in err
        and points["esxi2"].id in err
        and "--from-host" in err
    )
    assert not out_dir.exists()  # nothing written
    # the bug: `restore web01 --overwrite --yes` took esxi2's newer point; now refused before any host
    assert run(cfg, "restore", "web01", "--overwrite", "--yes") == 64
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"esxi1 uuid {UUID1}" in err and f"esxi2 uuid {UUID2}" in err
    assert run(cfg, "restore", "web01") == 64 and "2 different VMs named 'web01'" in capsys.readouterr().err
    assert run(cfg, "restore", "web01", "--from-host", "esxi3") == 1  # no such points: failed
    assert "no repository has restore points of VM 'web01' from esxi3" in capsys.readouterr().err
    # chosen by source host: esxi1's VM (not the newer esxi2 one), named in the output
    assert run(cfg, "export", "web01", "--from-host", "esxi1", "--to", str(out_dir)) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert f"restore point {points['esxi1'].id} of VM 'web01' from esxi1 (uuid {UUID1})" in out
    assert "the web01 of esxi1" in (out_dir / "web01.vmx").read_text()
    assert run(cfg, "restore", "web01", "--point", points["esxi2"].id, "--from-host", "esxi1") == 64
    assert "not from esxi1" in capsys.readouterr().err
    # options that make no sense together are refused before anything is read
    assert (
        run(cfg, "restore", "web01", "--to-vm", "web02") == 64
        and "add --overwrite" in capsys.readouterr().err
    )
    assert run(cfg, "restore", "web01", "--abort", "--overwrite") == 64
    assert "--abort" in capsys.readouterr().err


def test_points_shows_which_vm_each_point_is_of(
    two_hosts: tuple[Repository, dict[str, RestorePoint]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, points = two_hosts
    cfg = write_config(tmp_path)
    assert run(cfg, "points", "--vm", "web01") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["ID", "REPOSITORY", "POLICY", "VM", "HOST", "UUID"]
    row = next(line for line in lines if points["esxi2"].id in line)
    assert " esxi2 " in row and UUID2 in row
    assert run(cfg, "points", "--vm", "web01", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["host"], r["uuid"]) for r in rows} == {("esxi1", UUID1), ("esxi2", UUID2)}


def test_one_vm_per_name_shows_no_uuid_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = Repository.init(tmp_path / "repo")
    add_point(repo, "esxi1", UUID1, T0)
    cfg = write_config(tmp_path)
    assert run(cfg, "points") == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert "HOST" in header and "UUID" not in header
