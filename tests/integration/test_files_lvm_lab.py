"""File-level restore of LVM guests against the lab: a VM installed the Ubuntu/RHEL way (GPT, ext4
``/boot``, a volume group ``ubuntu-vg`` with ``root`` — ext4 in two segments after an ``lvextend`` — and
``data`` — XFS) plus a volume group ``data-vg`` over two more disks with one volume spanning both;
backed up twice with a file of each filesystem changed by a guest write in between. ``files`` lists
the volumes (named as ``/dev/mapper`` names them) and copies each version back from its point with
times and modes; a killed ``files`` leaves nothing mounted; without lvm2 the volumes are listed with the
reason. Helpers and the kill pattern come from :mod:`tests.integration.test_files_lab`."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from esxisim import guestdisk
from esxisim.handle import LabHandle
from reconciler.repository import KdfParams, Repository
from tests.integration.labconfig import PASSPHRASE, policy_yaml, write_lab_config
from tests.integration.test_files_lab import NEW_TIME, OLD_TIME, _cli, _leftovers
from tests.waiting import wait_until

pytestmark = [pytest.mark.lab]

MiB = 1 << 20
VM = "files-lvm"
ROOT_BIG = random.Random(1808).randbytes(14 * MiB)
"""Larger than root's first segment (8 MiB): its blocks reach into the second."""
XFS_REPORT = random.Random(1809).randbytes(MiB + 123)
SPAN_BIG = random.Random(1810).randbytes(24 * MiB)
"""Larger than data-vg's first disk holds: part of it is on the second."""


@dataclass
class LvmEnv:
    lab: LabHandle
    root: Path
    config: Path
    state: Path
    volumes: dict[str, guestdisk.GuestDisk]
    points: list[str] = field(default_factory=list)
    """Oldest first."""

    def run(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            _cli(self, *args), capture_output=True, text=True, timeout=300, check=False, env=env
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result


def _file(path: Path, data: bytes, mode: int, when: int, owner: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    os.chown(path, owner, owner)
    os.utime(path, (when, when))


@pytest.fixture(scope="module")
def lvm_env(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LvmEnv]:
    if not guestdisk.lvm_available() or not guestdisk.available("ext4"):
        pytest.skip("LVM guests need root, lvm2, losetup, sfdisk, mkfs.ext4, debugfs, mkfs.xfs and xfs_db")
    root = tmp_path_factory.mktemp("files-lvm")
    boot = root / "boot"
    _file(boot / "vmlinuz", b"not a kernel\n", 0o644, OLD_TIME)
    rootfs = root / "rootfs"
    _file(rootfs / "etc" / "app.conf", b"version = 1\n", 0o640, OLD_TIME)
    _file(rootfs / "home" / "ann" / "big.bin", ROOT_BIG, 0o644, OLD_TIME + 60, owner=1000)
    (rootfs / "home" / "ann" / "conf-link").symlink_to("../../etc/app.conf")
    xfs = root / "xfs"
    _file(xfs / "etc" / "app.conf", b"version = 1\n", 0o640, OLD_TIME)
    _file(xfs / "srv" / "report.bin", XFS_REPORT, 0o600, OLD_TIME + 120, owner=1000)
    span = root / "span"
    _file(span / "archive.bin", SPAN_BIG, 0o644, OLD_TIME + 180)
    disks = [root / "sda.img", root / "sdb.img", root / "sdc.img"]
    volumes = guestdisk.build_lvm_disks(
        disks[:1],
        96 * MiB,
        "ubuntu-vg",
        [
            guestdisk.Volume("root", "ext4", rootfs, 8 * MiB, grow_to=28 * MiB),
            guestdisk.Volume("data", "xfs", xfs, 24 * MiB),
        ],
        boot=boot,
    )
    volumes |= guestdisk.build_lvm_disks(
        disks[1:], 24 * MiB, "data-vg", [guestdisk.Volume("archive", "ext4", span, 36 * MiB)]
    )
    assert len(volumes["root"].pieces) == 2 and len(volumes["archive"].pieces) == 2
    second_disk_part = volumes["archive"].pieces[1]
    assert second_disk_part[0] == disks[2]
    client = lab.client(lab.free)
    client.create_vm(
        {
            "name": VM,
            "disks": [{"size": d.stat().st_size, "image": str(d)} for d in disks],
            "power": "poweredOn",
        }
    )
    try:
        config = write_lab_config(lab, root, policy_yaml("files-lvm", lab.free, [VM]))
        Repository.init(root / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
        env = LvmEnv(lab, root, config, root / "state", volumes)
        env.run("backup", "files-lvm")
        root_v2 = root / "sda-root-v2.img"
        ranges = guestdisk.change_file(
            volumes["root"], root_v2, "/etc/app.conf", b"version = 2\n", mtime=NEW_TIME, mode=0o600
        )
        assert any(offset >= volumes["root"].pieces[0][1] for offset, _ in ranges)
        client.guest_write_from(VM, 0, root_v2, ranges)
        xfs_v2 = root / "sda-data-v2.img"
        ranges = guestdisk.change_file(
            volumes["data"], xfs_v2, "/etc/app.conf", b"version = 2\n", mtime=NEW_TIME, mode=0o600
        )
        client.guest_write_from(VM, 0, xfs_v2, ranges)
        env.run("backup", "files-lvm")
        repo = Repository.open(root / "repo", PASSPHRASE)
        env.points = sorted(p.id for p in repo.list_points(vm=VM))
        assert len(env.points) == 2
        yield env
    finally:
        for vm in client.state()["vms"]:
            if vm["name"] == VM:
                client.vimcmd(["vmsvc/power.off", str(vm["vmid"])])
                client.vimcmd(["vmsvc/destroy", str(vm["vmid"])])


def test_ls_lists_the_logical_volumes_and_their_trees(lvm_env: LvmEnv) -> None:
    top = lvm_env.run("files", VM, "ls").stdout
    lines = {line.split()[0]: line for line in top.splitlines() if line and not line.startswith((" ", "VM"))}
    assert "ext4" in lines["sda1"] and "mounted read-only" in lines["sda1"]
    assert "LVM physical volume of volume group ubuntu-vg (root, data)" in lines["sda2"]
    assert "ext4" in lines["ubuntu--vg-root"] and "mounted read-only" in lines["ubuntu--vg-root"]
    assert "'ubuntu-vg/root'" in lines["ubuntu--vg-root"]
    assert "xfs" in lines["ubuntu--vg-data"] and "mounted read-only" in lines["ubuntu--vg-data"]
    assert "LVM logical volume on sdb + sdc" in lines["data--vg-archive"]
    assert "mounted read-only" in lines["data--vg-archive"]
    tree = lvm_env.run("files", VM, "ls", "ubuntu--vg-root", "-R").stdout
    assert "ubuntu--vg-root/etc/app.conf" in tree and "ubuntu--vg-root/home/ann/big.bin" in tree
    assert "ubuntu--vg-root/home/ann/conf-link -> ../../etc/app.conf" in tree
    schema = json.loads(
        resources.files("reconciler.commands").joinpath("json_schemas/files.schema.json").read_text()
    )
    listed = json.loads(lvm_env.run("--json", "files", VM, "ls", "ubuntu--vg-data/srv").stdout)
    jsonschema.Draft202012Validator(schema).validate(listed)
    assert [(e["path"], e["size"], e["uid"]) for e in listed["entries"]] == [
        ("ubuntu--vg-data/srv/report.bin", len(XFS_REPORT), 1000)
    ]
    top_json = json.loads(lvm_env.run("--json", "files", VM, "ls").stdout)
    jsonschema.Draft202012Validator(schema).validate(top_json)
    kinds = {row["name"]: (row["kind"], row["label"]) for row in top_json["filesystems"]}
    assert kinds["ubuntu--vg-data"] == ("xfs", "ubuntu-vg/data")
    wrong = lvm_env.run("files", VM, "ls", "ubuntu-vg/root", check=False)
    assert wrong.returncode == 64 and "ubuntu--vg-root" in wrong.stderr
    assert _leftovers(lvm_env.state) == []


def test_cp_brings_back_each_version_from_its_point_out_of_ext4_and_xfs_volumes(
    lvm_env: LvmEnv, tmp_path: Path
) -> None:
    old, new = lvm_env.points
    for volume in ("ubuntu--vg-root", "ubuntu--vg-data"):
        for point, version, when, mode in ((old, 1, OLD_TIME, 0o640), (new, 2, NEW_TIME, 0o600)):
            out = tmp_path / f"{volume}-{version}"
            lvm_env.run("files", VM, "--point", point, "cp", f"{volume}/etc/app.conf", "--to", str(out))
            copied = out / "app.conf"
            assert copied.read_bytes() == f"version = {version}\n".encode(), (volume, point)
            assert (copied.stat().st_mtime, copied.stat().st_mode & 0o7777) == (when, mode), (volume, point)
    lvm_env.run("files", VM, "cp", "ubuntu--vg-root/home", "--to", str(tmp_path / "home"))
    big = tmp_path / "home" / "home" / "ann" / "big.bin"
    assert big.read_bytes() == ROOT_BIG
    assert (big.stat().st_mtime, big.stat().st_uid) == (OLD_TIME + 60, 1000)
    assert os.readlink(tmp_path / "home" / "home" / "ann" / "conf-link") == "../../etc/app.conf"
    lvm_env.run("files", VM, "--point", old, "cp", "ubuntu--vg-data/srv", "--to", str(tmp_path / "srv"))
    report = tmp_path / "srv" / "srv" / "report.bin"
    assert report.read_bytes() == XFS_REPORT
    assert (report.stat().st_mtime, report.stat().st_mode & 0o7777, report.stat().st_uid) == (
        OLD_TIME + 120,
        0o600,
        1000,
    )
    lvm_env.run("files", VM, "cp", "data--vg-archive/archive.bin", "--to", str(tmp_path / "span"))
    assert (tmp_path / "span" / "archive.bin").read_bytes() == SPAN_BIG
    assert lvm_env.run("files", VM, "--point", old, "cat", "ubuntu--vg-data/etc/app.conf").stdout == (
        "version = 1\n"
    )
    assert _leftovers(lvm_env.state) == []


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_files_leaves_no_mount_loop_device_or_helper(
    lvm_env: LvmEnv, tmp_path: Path, how: signal.Signals
) -> None:
    proc = subprocess.Popen(
        _cli(lvm_env, "files", VM, "cp", "ubuntu--vg-root/home", "--to", str(tmp_path / "out")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def copying() -> bool:
        assert proc.poll() is None, proc.communicate()
        return any("/fs/ubuntu--vg-root" in m for m in _leftovers(lvm_env.state))

    wait_until("the two-segment volume mounted", copying, timeout=60, poll=0.01)
    assert any(m.endswith("/volumes") for m in _leftovers(lvm_env.state))  # the composing helper's
    proc.send_signal(how)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    if how == signal.SIGKILL:  # the next run releases what the killed one left
        lvm_env.run("files", VM, "ls")
    assert _leftovers(lvm_env.state) == []
    assert list((lvm_env.state / "files").iterdir()) == []


def test_without_lvm2_the_volumes_are_listed_with_the_reason(lvm_env: LvmEnv, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("losetup", "mount", "umount", "fusermount3"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    env = {**os.environ, "PATH": str(bin_dir)}
    listed = lvm_env.run("files", VM, "ls", env=env)
    (pv,) = [line for line in listed.stdout.splitlines() if line.startswith("sda2 ")]
    assert "not browsable: LVM physical volume: its logical volumes cannot be listed:" in pv
    assert "the lvm2 tools are not installed here (apt install lvm2)" in pv
    assert "ubuntu--vg-root" not in listed.stdout
    assert "mounted read-only" in next(ln for ln in listed.stdout.splitlines() if ln.startswith("sda1 "))
    missing = lvm_env.run("files", VM, "ls", "ubuntu--vg-root", check=False, env=env)
    assert missing.returncode == 64 and "has no filesystem 'ubuntu--vg-root'" in missing.stderr
    assert _leftovers(lvm_env.state) == []
