"""Changed block tracking in the lab: exact answers of QueryChangedDiskAreas, resets and refusals."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim, vmodl

from esxisim.handle import LabHandle, find_vm, wait_task

pytestmark = pytest.mark.lab
ConfigSpec: Any = vim.vm.ConfigSpec


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, length in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][0] + out[-1][1], off + length) - start)
        else:
            out.append((off, length))
    return out


def allocated(path: Path) -> list[tuple[int, int]]:
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole - data))
            pos = hole
    finally:
        os.close(fd)
    return coalesce(out)


def changed(vm: Any, snap: Any, key: int, change_id: str, capacity: int) -> list[tuple[int, int]]:
    """Every changed area of disk ``key`` up to ``snap`` since ``change_id``, looping like a product would."""
    areas: list[tuple[int, int]] = []
    off = 0
    while off < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=off, changeId=change_id)
        areas.extend((a.start, a.length) for a in info.changedArea or [])
        if info.length == 0:
            break
        off = info.startOffset + info.length
    return areas


def snapshot_disks(snap: Any) -> dict[int, Any]:
    return {d.key: d for d in snap.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)}


def test_cbt_changed_areas_are_exactly_the_guest_writes(lab: LabHandle) -> None:
    host, name = lab.licensed, "app202"
    si = lab.api(host)
    vm = find_vm(si, name)
    wait_task(vm.ReconfigVM_Task(ConfigSpec(changeTrackingEnabled=True)))
    assert vm.config.changeTrackingEnabled
    # a stun point activates tracking
    wait_task(vm.PowerOffVM_Task())
    wait_task(vm.PowerOnVM_Task())
    first = wait_task(vm.CreateSnapshot_Task("cbt-1", "", False, False))
    try:
        written = lab.client(host).guest_write(name, 4, seed=21)
        second = wait_task(vm.CreateSnapshot_Task("cbt-2", "", False, False))
        disks1, disks2 = snapshot_disks(first), snapshot_disks(second)
        assert sorted(disks1) == [2000, 2001]
        for disk in written["disks"]:
            key = disk["key"]
            cid1 = disks1[key].backing.changeId
            cid2 = disks2[key].backing.changeId
            assert cid1 and cid2 and cid1 != cid2
            assert cid1.split("/")[0] == cid2.split("/")[0]
            capacity = disks2[key].capacityInBytes
            got = coalesce(changed(vm, second, key, cid1, capacity))
            assert got == coalesce([(off, length) for off, length in disk["written"]])
            # "*": the allocated areas of the chain frozen by the first snapshot (the base disk)
            base = lab.local_path(host, disks1[key].backing.fileName).with_name(
                Path(disks1[key].backing.fileName.split("/")[-1]).stem + "-flat.vmdk"
            )
            assert coalesce(changed(vm, first, key, "*", capacity)) == allocated(base)

        lab.fault(host, "cbt-reset", vm=name)
        key = written["disks"][0]["key"]
        with pytest.raises(vmodl.fault.InvalidArgument):
            vm.QueryChangedDiskAreas(
                snapshot=second, deviceKey=key, startOffset=0, changeId=disks1[key].backing.changeId
            )
    finally:
        wait_task(vm.RemoveAllSnapshots_Task())
        wait_task(vm.ReconfigVM_Task(ConfigSpec(changeTrackingEnabled=False)))
    assert vm.snapshot is None


def test_qcda_refusals(lab: LabHandle) -> None:
    free_vm = find_vm(lab.api(lab.free), "web01")
    with pytest.raises(vim.fault.RestrictedVersion):
        free_vm.QueryChangedDiskAreas(snapshot=None, deviceKey=2000, startOffset=0, changeId="*")
    vm = find_vm(lab.api(lab.licensed), "app201")
    assert not vm.config.changeTrackingEnabled
    snap = wait_task(vm.CreateSnapshot_Task("no-cbt", "", False, False))
    try:
        assert snapshot_disks(snap)[2000].backing.changeId is None
        with pytest.raises(vim.fault.FileFault):
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=2000, startOffset=0, changeId="*")
    finally:
        wait_task(snap.RemoveSnapshot_Task(removeChildren=False))
