"""vmkfstools in the lab's SSH shell: create, clone (flattening a live chain), check, rename, delete."""

from __future__ import annotations

import hashlib
import shlex

import pytest

from esxisim.handle import LabHandle, snapshot_ids, vmfs_path

pytestmark = pytest.mark.lab

SCRATCH = "/vmfs/volumes/datastore1/scratch"


def q(path: str) -> str:
    return shlex.quote(path)


def test_create_check_rename_delete(lab: LabHandle) -> None:
    host = lab.free
    assert lab.run(host, f"mkdir -p {SCRATCH}").exit == 0
    res = lab.run(host, f"vmkfstools -c 8M -d thin {SCRATCH}/new.vmdk")
    assert res.exit == 0, res
    local = lab.local_path(host, "[datastore1] scratch")
    desc = (local / "new.vmdk").read_text()
    assert 'createType="vmfs"' in desc
    assert 'RW 16384 VMFS "new-flat.vmdk"' in desc
    assert 'ddb.thinProvisioned = "1"' in desc
    assert (local / "new-flat.vmdk").stat().st_size == 8 << 20
    assert (local / "new-flat.vmdk").stat().st_blocks == 0
    res = lab.run(host, f"vmkfstools -e {SCRATCH}/new.vmdk")
    assert res.exit == 0 and res.text == "Disk chain is consistent.\n"
    res = lab.run(host, f"vmkfstools -t0 {SCRATCH}/new.vmdk")
    assert res.exit == 0 and "NOMP -- :" in res.text
    again = lab.run(host, f"vmkfstools -c 8M {SCRATCH}/new.vmdk")
    assert again.exit != 0 and b"already exists" in again.stderr
    assert lab.run(host, f"vmkfstools -X 16M {SCRATCH}/new.vmdk").exit == 0
    assert (local / "new-flat.vmdk").stat().st_size == 16 << 20
    assert lab.run(host, f"vmkfstools -E {SCRATCH}/new.vmdk {SCRATCH}/renamed.vmdk").exit == 0
    assert sorted(p.name for p in local.iterdir()) == ["renamed-flat.vmdk", "renamed.vmdk"]
    assert 'RW 32768 VMFS "renamed-flat.vmdk"' in (local / "renamed.vmdk").read_text()
    assert lab.run(host, f"vmkfstools -U {SCRATCH}/renamed.vmdk").exit == 0
    assert list(local.iterdir()) == []
    missing = lab.run(host, f"vmkfstools -e {SCRATCH}/renamed.vmdk")
    assert missing.exit != 0


def test_clone_flattens_a_live_snapshot_chain(lab: LabHandle) -> None:
    host, name = lab.free, 'ファイル鯖 "q" $(x)'
    entry = lab.vm(host, name)
    vmid = entry["vmid"]
    base = vmfs_path(entry["disks"][0]["file"])
    top = base.removesuffix(".vmdk") + "-000001.vmdk"
    assert lab.run(host, f"mkdir -p {SCRATCH}").exit == 0
    assert lab.vimcmd(host, "vmsvc/snapshot.create", vmid, "clone-src", "", "0", "0").exit == 0
    try:
        lab.client(host).guest_write(name, 10, seed=3)
        res = lab.run(host, f"vmkfstools -e {q(top)}")
        assert res.exit == 0 and "Disk chain is consistent." in res.text
        res = lab.run(host, f"vmkfstools -i {q(top)} {SCRATCH}/flat.vmdk -d thin")
        assert res.exit == 0, res
        assert "Clone: 100% done." in res.text
        clone = lab.local_path(host, "[datastore1] scratch/flat-flat.vmdk").read_bytes()
    finally:
        snaps = snapshot_ids(lab.vimcmd(host, "vmsvc/snapshot.get", vmid).text)
        assert lab.vimcmd(host, "vmsvc/snapshot.remove", vmid, snaps["clone-src"]).exit == 0
    # after the merge the base holds exactly what the clone flattened
    merged = lab.local_path(host, entry["disks"][0]["file"]).with_name(
        base.rsplit("/", 1)[1].removesuffix(".vmdk") + "-flat.vmdk"
    )
    assert hashlib.sha1(clone).hexdigest() == hashlib.sha1(merged.read_bytes()).hexdigest()
    assert lab.run(host, f"vmkfstools -U {SCRATCH}/flat.vmdk").exit == 0
