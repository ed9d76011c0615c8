"""Restore building blocks without a host: the restored .vmx (new identity unless kept, CBT keys gone,
disks renamed, missing disks switched off), the whole-disk digest with holes, the HTTPS upload stream,
disk selection and names."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import pytest

from reconciler.esxi.disks import with_zeros
from reconciler.esxi.vmdk import Descriptor, vmfs_descriptor
from reconciler.esxi.vmx import VmxFile, prepare_restored_vmx
from reconciler.facts.points import DiskRecord, RestorePoint, VmRef
from reconciler.operations.restore import (
    ContentHash,
    RestoreError,
    _base_stem,
    default_name,
    fit_stem,
    safe_file_name,
    select_disk,
)

VMX = """\
.encoding = "UTF-8"
displayName = "web01"
nvram = "web01.nvram"
uuid.bios = "56 4d 00 11 22 33 44 55-66 77 88 99 aa bb cc dd"
uuid.location = "56 4d 00 11 22 33 44 55-66 77 88 99 aa bb cc dd"
vc.uuid = "52 00 11 22 33 44 55 66-77 88 99 aa bb cc dd ee"
ctkEnabled = "TRUE"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "web01.vmdk"
scsi0:0.ctkEnabled = "TRUE"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "web01_1.vmdk"
scsi0:1.ctkEnabled = "TRUE"
ethernet0.present = "TRUE"
ethernet0.addressType = "vpx"
ethernet0.generatedAddress = "00:0c:29:aa:bb:cc"
ethernet0.generatedAddressOffset = "0"
ethernet1.present = "TRUE"
ethernet1.addressType = "static"
ethernet1.address = "00:50:56:00:00:01"
sched.swap.derivedName = "/vmfs/volumes/ds/web01/web01-1234.vswp"
"""


def test_new_identity() -> None:
    vmx = VmxFile.parse(VMX)
    dropped = prepare_restored_vmx(
        vmx,
        display_name='new "one"',
        disk_files={"scsi0:0": 'new "one".vmdk'},
        nvram='new "one".nvram',
        keep_identity=False,
    )
    assert dropped == ["scsi0:1"] and vmx.get("scsi0:1.present") == "FALSE"
    assert vmx.get("displayName") == 'new "one"' and 'displayName = "new |22one|22"' in vmx.dumps()
    assert vmx.get("scsi0:0.fileName") == 'new "one".vmdk' and vmx.get("nvram") == 'new "one".nvram'
    old = VmxFile.parse(VMX)
    for key in ("uuid.bios", "vc.uuid"):
        value = vmx.get(key) or ""
        assert value != old.get(key) and len(value.replace(" ", "").replace("-", "")) == 32
    assert vmx.get("uuid.location") is None and vmx.get("uuid.action") == "create"
    for nic in ("ethernet0", "ethernet1"):
        assert vmx.get(f"{nic}.addressType") == "generated"
        assert all(vmx.get(f"{nic}.{k}") is None for k in ("address", "generatedAddress"))
    assert not [k for k, _ in vmx.items() if "ctkenabled" in k.lower()]
    assert vmx.get("sched.swap.derivedName") is None
    VmxFile.parse(vmx.dumps())  # still a valid file


def test_keep_identity() -> None:
    vmx = VmxFile.parse(VMX)
    prepare_restored_vmx(
        vmx, display_name="web01", disk_files={"scsi0:0": "a.vmdk", "scsi0:1": "b.vmdk"}, nvram=None,
        keep_identity=True,
    )  # fmt: skip
    old = VmxFile.parse(VMX)
    for key in ("uuid.bios", "uuid.location", "vc.uuid", "ethernet0.generatedAddress", "ethernet1.address"):
        assert vmx.get(key) == old.get(key)
    assert vmx.get("uuid.action") == "keep" and vmx.get("nvram") is None
    assert not [k for k, _ in vmx.items() if "ctkenabled" in k.lower()]


def test_content_hash_fills_holeswith_zeros() -> None:
    data = bytes(3000) + b"abc" + bytes(5000 - 3003) + b"xyz" + bytes(10_000 - 5003)
    h = ContentHash()
    h.update(3000, b"abc")
    h.update(5000, b"xyz")
    assert h.hexdigest(10_000) == hashlib.sha256(data).hexdigest()
    h2 = ContentHash()
    h2.update(10, b"x")
    with pytest.raises(ValueError, match="before"):
        h2.update(5, b"y")


def test_upload_stream_is_the_whole_disk() -> None:
    written: list[tuple[int, int]] = []
    stream = b"".join(
        with_zeros([(2, b"ab"), (3 << 20, b"cd")], (3 << 20) + 10, lambda o, n: written.append((o, n)))
    )
    expected = bytearray((3 << 20) + 10)
    expected[2:4] = b"ab"
    expected[3 << 20 : (3 << 20) + 2] = b"cd"
    assert stream == bytes(expected) and written == [(2, 2), (3 << 20, 2)]
    with pytest.raises(ValueError, match="past the end"):
        b"".join(with_zeros([(0, b"abc")], 2, None))


def test_select_disk_and_names() -> None:
    from datetime import datetime, timezone

    now = datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc)
    disks = (
        DiskRecord(2000, "Hard disk 1", "[ds] vm/vm.vmdk", 1024, "a"),
        DiskRecord(2001, "Hard disk 2", "[ds] vm/vm_1.vmdk", 1024, "b"),
    )
    point = RestorePoint("20260102T030400000000Z-00000000", "p", VmRef("vm", "u", "h", "1"), now, now, now,
                         "success", "full", "r", disks=disks)  # fmt: skip
    nodes = {2000: "scsi0:0", 2001: "scsi0:1"}
    assert select_disk(point, nodes, "Hard disk 2").key == 2001
    assert select_disk(point, nodes, "SCSI0:1").key == 2001
    assert select_disk(point, nodes, "vm.vmdk").key == 2000
    with pytest.raises(RestoreError, match="Hard disk 1 = scsi0:0"):
        select_disk(point, nodes, "Hard disk 3")
    assert default_name("web01", now) == "web01-restored-20260102-0304"
    assert safe_file_name('a/b\nc "d" $(x)') == 'a_b_c "d" $(x)' and safe_file_name("..") == "vm"


def test_vmfs_descriptor_parses() -> None:
    desc = Descriptor.parse(vmfs_descriptor('a "b"-flat.vmdk', 32 << 20, adapter="pvscsi"))
    assert desc.create_type == "vmfs" and desc.thin and desc.capacity == 32 << 20
    assert desc.flat_extent is not None and desc.flat_extent.file_name == 'a "b"-flat.vmdk'
    assert desc.ddb["ddb.adapterType"] == "pvscsi" and not desc.has_parent


def test_long_names_fit_in_a_file_name() -> None:
    """A VM of 76 Japanese characters (228 bytes) restored as a new VM or over itself: every file name the
    restore makes fits 255 bytes, also while written under its temporary name; cut names stay apart
    (reliability suite, hostile names: "File name too long" and "The file already exists" before)."""
    long = "長い名前" * 19
    name = default_name(long, datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc))
    assert len(name) == 80 and name.endswith("-restored-20260102-0304")
    suffix = "_1-restored-20260101020304-3fa2-flat.vmdk"
    cut = fit_stem(long, suffix)
    assert len((cut + suffix + ".esxi-reconciler.tmp").encode()) <= 255
    assert cut != long and fit_stem(long + "_1", suffix) != cut  # a disk and the next one
    assert fit_stem(cut, suffix) == cut  # a cut name is not cut again (overwrite after overwrite)
    assert fit_stem("web01", suffix) == "web01" and default_name("web01").startswith("web01-restored-")


def test_overwrite_names_do_not_grow() -> None:
    assert _base_stem("vm/web01.vmdk") == "web01"
    assert _base_stem("vm/web01_1-restored-20260101020304-3fa2.vmdk") == "web01_1"
    assert _base_stem("vm/a-restored-20260101020304-3fa2-restored-20260101020305-0000.vmdk") == "a"
    assert _base_stem("vm/a-restored-x.vmdk") == "a-restored-x"
