"""Snapshots in the lab: free host over SSH, licensed host over the API, and delta semantics on disk."""

from __future__ import annotations

import hashlib
import shlex
from typing import Any

import pytest
from pyVmomi import vim

from esxisim.handle import LabHandle, find_vm, snapshot_ids, vmfs_path, wait_task

pytestmark = pytest.mark.lab


def snapshot_tree(vm: Any) -> list[Any]:
    info = vm.snapshot
    return list(info.rootSnapshotList) if info is not None else []


def disk_backings(vm: Any) -> list[Any]:
    return [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


def test_free_host_snapshot_api_restricted_but_vim_cmd_works(lab: LabHandle) -> None:
    host, name = lab.free, "db 01"
    vmid = lab.vm(host, name)["vmid"]
    si = lab.api(host)
    vm = find_vm(si, name)
    with pytest.raises(vim.fault.RestrictedVersion) as err:
        wait_task(vm.CreateSnapshot_Task("api", "", False, False))
    assert "Current license or ESXi version prohibits execution of the requested operation" in getattr(
        err.value, "msg", ""
    )
    assert vm.snapshot is None

    res = lab.vimcmd(host, "vmsvc/snapshot.create", vmid, "over ssh", "made by vim-cmd", "0", "0")
    assert res.exit == 0, res
    assert "Create Snapshot:" in res.text
    got = lab.vimcmd(host, "vmsvc/snapshot.get", vmid)
    assert got.exit == 0 and "over ssh" in snapshot_ids(got.text), got
    snap_id = snapshot_ids(got.text)["over ssh"]

    tree = snapshot_tree(vm)
    assert [s.name for s in tree] == ["over ssh"]
    assert tree[0].description == "made by vim-cmd"
    assert str(tree[0].id) == snap_id
    backing = disk_backings(vm)[0].backing
    assert backing.fileName == f"[datastore1] {name}/{name}-000001.vmdk"
    assert backing.parent.fileName == f"[datastore1] {name}/{name}.vmdk"
    with pytest.raises(vim.fault.RestrictedVersion):
        wait_task(tree[0].snapshot.RemoveSnapshot_Task(removeChildren=False))

    res = lab.vimcmd(host, "vmsvc/snapshot.remove", vmid, snap_id)
    assert res.exit == 0, res
    assert vm.snapshot is None
    assert disk_backings(vm)[0].backing.fileName == f"[datastore1] {name}/{name}.vmdk"
    assert snapshot_ids(lab.vimcmd(host, "vmsvc/snapshot.get", vmid).text) == {}
    vm_dir = lab.local_path(host, f"[datastore1] {name}")
    assert not [p.name for p in vm_dir.iterdir() if "-00000" in p.name]


def test_licensed_api_snapshot_is_seen_by_vim_cmd(lab: LabHandle) -> None:
    host, name = lab.licensed, "app201"
    vmid = lab.vm(host, name)["vmid"]
    vm = find_vm(lab.api(host), name)
    snap = wait_task(vm.CreateSnapshot_Task("from api", "api side", False, False))
    got = lab.vimcmd(host, "vmsvc/snapshot.get", vmid)
    assert got.exit == 0, got
    assert "from api" in snapshot_ids(got.text)
    assert "api side" in got.text
    vmsd = lab.local_path(host, lab.vm(host, name)["vmx"]).with_suffix(".vmsd").read_text()
    assert 'snapshot.numSnapshots = "1"' in vmsd
    assert f'snapshot0.disk0.fileName = "{name}.vmdk"' in vmsd
    wait_task(snap.RemoveSnapshot_Task(removeChildren=False))
    assert snapshot_ids(lab.vimcmd(host, "vmsvc/snapshot.get", vmid).text) == {}


def _remote_bytes(lab: LabHandle, host: str, path: str) -> bytes:
    res = lab.run(host, f"cat {shlex.quote(path)}")
    assert res.exit == 0, res.stderr
    return res.stdout


def _remote_sha1(lab: LabHandle, host: str, path: str) -> str:
    res = lab.run(host, f"sha1sum {shlex.quote(path)}")
    assert res.exit == 0, res.stderr
    return res.text.split()[0]


def _remote_range(lab: LabHandle, host: str, path: str, off: int, length: int) -> bytes:
    assert off % 4096 == 0 and length % 4096 == 0
    cmd = f"dd if={shlex.quote(path)} bs=4096 skip={off // 4096} count={length // 4096} 2>/dev/null"
    res = lab.run(host, cmd)
    assert res.exit == 0, res.stderr
    return res.stdout


def test_base_is_frozen_under_a_snapshot_and_gets_the_writes_at_removal(lab: LabHandle) -> None:
    host, name = lab.free, "web01"
    entry = lab.vm(host, name)
    vmid = entry["vmid"]
    flats = [vmfs_path(d["file"]).removesuffix(".vmdk") + "-flat.vmdk" for d in entry["disks"]]
    before = [_remote_bytes(lab, host, f) for f in flats]
    assert [hashlib.sha1(b).hexdigest() for b in before] == [_remote_sha1(lab, host, f) for f in flats]

    res = lab.vimcmd(host, "vmsvc/snapshot.create", vmid, "backup", "", "0", "0")
    assert res.exit == 0, res
    written = lab.client(host).guest_write(name, 5, seed=11)
    assert written["bytes"] > 0
    by_key = {d["key"]: d for d in written["disks"]}
    expected = []
    for disk, flat, data in zip(entry["disks"], flats, before, strict=True):
        extents = by_key[disk["key"]]["written"]
        assert extents, f"nothing written on {disk['file']}"
        assert sum(length for _, length in extents) >= 0.049 * disk["size"]
        # the base does not change while the snapshot is open
        assert _remote_sha1(lab, host, flat) == hashlib.sha1(data).hexdigest()
        delta = flat.removesuffix("-flat.vmdk") + "-000001-sesparse.vmdk"
        image = bytearray(data)
        for off, length in extents:
            chunk = _remote_range(lab, host, delta, off, length)
            assert len(chunk) == length
            image[off : off + length] = chunk
        expected.append((flat, extents, bytes(image)))

    snaps = snapshot_ids(lab.vimcmd(host, "vmsvc/snapshot.get", vmid).text)
    res = lab.vimcmd(host, "vmsvc/snapshot.remove", vmid, snaps["backup"])
    assert res.exit == 0, res
    for flat, extents, merged in expected:
        for off, length in extents:
            assert _remote_range(lab, host, flat, off, length) == merged[off : off + length]
        assert _remote_sha1(lab, host, flat) == hashlib.sha1(merged).hexdigest()
    check = lab.run(host, f"vmkfstools -e {shlex.quote(vmfs_path(entry['disks'][0]['file']))}")
    assert check.exit == 0 and "Disk chain is consistent." in check.text
