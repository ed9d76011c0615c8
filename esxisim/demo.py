"""``make demo``: start a two-host lab, show what the product will see through both protocols, stop it.

It walks through what makes a free ESXi host different — the API refuses writes, SSH does not — and
what a licensed one offers (snapshots and changed-block queries through the API), using the same
pinned clients as the tests.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from pyVmomi import vim

from esxisim.handle import LabHandle, find_vm, snapshot_ids, wait_task
from esxisim.lab import Lab, lab_spec

MiB = 1 << 20


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(title: str) -> None:
    _say()
    _say(f"== {title}")


def _inventory(handle: LabHandle, host: str) -> None:
    si = handle.api(host)
    content = si.RetrieveContent()
    about = content.about
    _say(f"{host}: {about.fullName} (API over TLS, pinned to SHA-256 thumbprint)")
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        for vm in view.view:
            disks = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
            sizes = ", ".join(f"{(d.capacityInBytes or 0) // MiB} MiB" for d in disks)
            _say(f"  vm {vm._moId:>2}  {vm.name!r:32} {vm.runtime.powerState:10} disks: {sizes}")
    finally:
        view.Destroy()
    for ds in content.rootFolder.childEntity[0].datastore:
        s = ds.summary
        _say(f"  datastore {s.name}: {s.freeSpace // MiB} MiB free of {s.capacity // MiB} MiB")


def _free_host_writes(handle: LabHandle) -> None:
    host, vm_name = handle.free, "web01"
    vm = find_vm(handle.api(host), vm_name)
    try:
        wait_task(vm.CreateSnapshot_Task(name="demo", description="", memory=False, quiesce=False))
        _say("  API CreateSnapshot_Task: accepted (unexpected on a free host)")
    except vim.fault.RestrictedVersion as fault:
        _say(f"  API CreateSnapshot_Task -> vim.fault.RestrictedVersion: {getattr(fault, 'msg', fault)}")
    vmid = vm._moId
    res = handle.vimcmd(host, "vmsvc/snapshot.create", vmid, "demo", "made over SSH", "0", "0")
    _say(f"  SSH vim-cmd vmsvc/snapshot.create {vmid} demo -> exit {res.exit}: {res.text.strip()}")
    tree = vm.snapshot.rootSnapshotList if vm.snapshot else []
    _say(f"  the API now sees snapshots: {[s.name for s in tree]}")
    snap_id = snapshot_ids(handle.vimcmd(host, "vmsvc/snapshot.get", vmid).text)["demo"]
    res = handle.vimcmd(host, "vmsvc/snapshot.remove", vmid, snap_id)
    _say(f"  SSH vim-cmd vmsvc/snapshot.remove {vmid} {snap_id} -> exit {res.exit}")


def _licensed_cbt(handle: LabHandle) -> None:
    host = handle.licensed
    vm_name = handle.host(host)["vms"][0]["name"]
    vm = find_vm(handle.api(host), vm_name)
    spec = vim.vm.ConfigSpec(changeTrackingEnabled=True)  # type: ignore[no-untyped-call]
    wait_task(vm.ReconfigVM_Task(spec=spec))
    first = wait_task(vm.CreateSnapshot_Task(name="base", description="", memory=False, quiesce=False))
    disk = next(d for d in first.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))
    backing: Any = disk.backing
    change_id = backing.changeId
    _say(f"  CBT enabled on {vm_name!r}; first snapshot's changeId: {change_id}")
    written = handle.client(host).guest_write(vm_name, percent=1, seed=7)
    _say(f"  the guest wrote {written['bytes'] // 1024} KiB while the snapshot was open")
    second = wait_task(vm.CreateSnapshot_Task(name="next", description="", memory=False, quiesce=False))
    areas = vm.QueryChangedDiskAreas(snapshot=second, deviceKey=disk.key, startOffset=0, changeId=change_id)
    extents = [[a.start, a.length] for a in areas.changedArea]
    guest = next(d["written"] for d in written["disks"] if d["key"] == disk.key)
    verdict = "equal to" if extents == guest else "DIFFERENT FROM"
    _say(
        f"  QueryChangedDiskAreas since the first snapshot: {len(extents)} extents, "
        f"{sum(n for _, n in extents) // 1024} KiB, {verdict} what the guest wrote to that disk"
    )
    wait_task(vm.RemoveAllSnapshots_Task())
    _say("  snapshots removed (deltas consolidated into the base disks)")


def _validate_example_config() -> None:
    cmd = [sys.executable, "-m", "reconciler.cli", "validate", "config.example"]
    _say("$ esxi-reconciler validate config.example")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    _say((res.stdout + res.stderr).strip())


def run_demo(state_dir: Path) -> int:
    """Start the lab in ``state_dir``, show it, and always stop it."""
    spec = lab_spec(hosts=2, licenses=("free", "licensed"), vms=3, disk_sizes=(64 * MiB, 16 * MiB))
    lab = Lab(state_dir, hosts=spec)
    _step("starting the simulated lab (vcsim-based API over TLS + OpenSSH per host)")
    info: dict[str, Any] = lab.start()
    handle = LabHandle(lab)
    try:
        for host in info["hosts"]:
            ssh = host["ssh"]
            _say(
                f"{host['name']} ({host['license']}): API {host['api']['url']}  "
                f"SSH {ssh['user']}@{ssh['host']}:{ssh['port']} ({ssh['host_key_fingerprint']})"
            )
        _step("inventory through the vSphere API")
        for host in info["hosts"]:
            _inventory(handle, host["name"])
        _step("the same inventory through SSH: vim-cmd vmsvc/getallvms")
        for host in info["hosts"]:
            _say(f"{host['name']}$ vim-cmd vmsvc/getallvms")
            _say(handle.vimcmd(host["name"], "vmsvc/getallvms").text.rstrip())
        _step(f"free host {handle.free}: the API refuses writes, SSH does not")
        _free_host_writes(handle)
        _step(f"licensed host {handle.licensed}: snapshots and changed blocks through the API")
        _licensed_cbt(handle)
        _step("the product's desired state")
        _validate_example_config()
        _step("a disk read over SSH, as the backup will")
        web = handle.vm(handle.free, "web01")
        path = f"/vmfs/volumes/{web['datastore']}/web01/web01-flat.vmdk"
        res = handle.run(handle.free, f"sha1sum {shlex.quote(path)}")
        _say(f"{handle.free}$ sha1sum {path}\n{res.text.strip()}")
    finally:
        handle.close()
        _step("stopping the lab")
        lab.stop()
        leftovers = lab.leftovers()
        _say(f"lab stopped; left behind: {leftovers}" if leftovers else "lab stopped; nothing left behind")
    return 0
