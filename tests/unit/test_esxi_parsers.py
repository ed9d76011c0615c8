"""Parsers and builders of reconciler.esxi: .vmx, VMDK descriptors, vim-cmd output, quoting."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from reconciler.esxi import vimcmd
from reconciler.esxi.errors import ProtocolError
from reconciler.esxi.shell import to_line
from reconciler.esxi.vmdk import Descriptor, Extent
from reconciler.esxi.vmx import VmxFile, decode_value, encode_value, is_true
from tests import vimcmd_listing

HOSTILE = [
    "db 01",
    'ファイル鯖 "q" $(x)',
    "it's `id` $HOME ; rm -rf / & | > <",
    "tab\there",
    "back\\slash *?[a]",
    "-n",
    "",
    "web01\n+ backup evil",
    "cr\rlf\r\n; reboot\n",
    "'\n'\"\n\"\\\n$(id)\n`id`",
    "esc\x1b[31mred\x7f \u2028 \x85",
]

VMX = """.encoding = "UTF-8"
config.version = "8"
displayName = "ファイル鯖 |22q|22 $(x)"
ctkEnabled = "true"
scsi0.present = "TRUE"
scsi0:0.present = "TRUE"
scsi0:0.deviceType = "scsi-hardDisk"
scsi0:0.fileName = "ファイル鯖 |22q|22 $(x)-000001.vmdk"
scsi0:0.ctkEnabled = "TRUE"
scsi0:1.present = "true"
scsi0:1.filename = "/vmfs/volumes/ds2/other/data.vmdk"
scsi0:2.present = "TRUE"
scsi0:2.fileName = "indep.vmdk"
scsi0:2.mode = "independent-persistent"
scsi0:3.present = "FALSE"
scsi0:3.fileName = "gone.vmdk"
ide1:0.present = "TRUE"
ide1:0.deviceType = "cdrom-image"
ide1:0.fileName = "/vmfs/volumes/ds/iso/x.iso"
sata0:0.present = "TRUE"
sata0:0.fileName = "sata.vmdk"
nvme0:0.present = "TRUE"
nvme0:0.deviceType = "atapi-cdrom"
nvme0:0.fileName = "weird.vmdk"
"""


def test_vmx_escaping_roundtrip() -> None:
    for value in [*HOSTILE, "pipe | and #hash", "line\nbreak", "ctl\x01", "日本語"]:
        encoded = encode_value(value)
        assert '"' not in encoded and "\n" not in encoded
        assert decode_value(encoded) == value
    assert decode_value("a|22b|7Cc") == 'a"b|c'
    assert decode_value("|E3|83|95") == "フ"  # escaped UTF-8 bytes
    assert decode_value("100|") == "100|"  # a lone bar is kept


def test_vmx_disks_booleans_and_cbt() -> None:
    vmx = VmxFile.parse(VMX)
    assert vmx.get("displayname") == 'ファイル鯖 "q" $(x)'
    assert [(d.node, d.file_name) for d in vmx.disks()] == [
        ("scsi0:0", 'ファイル鯖 "q" $(x)-000001.vmdk'),
        ("scsi0:1", "/vmfs/volumes/ds2/other/data.vmdk"),
        ("sata0:0", "sata.vmdk"),
    ]
    assert [d.node for d in vmx.disks(include_independent=True)] == [
        "scsi0:0",
        "scsi0:1",
        "scsi0:2",
        "sata0:0",
    ]
    assert vmx.ctk_enabled and not vmx.ctk_disallowed
    assert vmx.cbt_usable("scsi0:0") and not vmx.cbt_usable("scsi0:1")
    assert is_true("True") and is_true("TRUE") and not is_true("FALSE") and not is_true(None)
    vmx.set("ctkDisallowed", "TRUE")
    assert not vmx.cbt_usable("scsi0:0")


def test_vmx_edit_keeps_other_lines() -> None:
    vmx = VmxFile.parse(VMX)
    vmx.set_cbt(False)
    vmx.set("annotation", 'a "note"\nline 2')
    vmx.remove("config.version")
    text = vmx.dumps()
    before, after = VMX.splitlines(), text.splitlines()
    changed = set(after) - set(before)
    assert changed == {
        'ctkEnabled = "FALSE"',
        'scsi0:0.ctkEnabled = "FALSE"',
        'scsi0:1.ctkEnabled = "FALSE"',
        'sata0:0.ctkEnabled = "FALSE"',
        'annotation = "a |22note|22|0Aline 2"',
    }
    assert set(before) - set(after) == {
        'config.version = "8"',
        'ctkEnabled = "true"',
        'scsi0:0.ctkEnabled = "TRUE"',
    }
    again = VmxFile.parse(text)
    assert again.get("annotation") == 'a "note"\nline 2'
    assert again.get("scsi0:1.filename") == "/vmfs/volumes/ds2/other/data.vmdk"
    assert "config.version" not in again
    with pytest.raises(ProtocolError):
        VmxFile.parse("not a vmx line")


BASE = """# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=d189c84d
parentCID=ffffffff
isNativeSnapshot="no"
createType="vmfs"

# Extent description
RW 65536 VMFS "ファイル鯖 "q" $(x)-flat.vmdk"

# Change Tracking File
changeTrackPath="ファイル鯖 "q" $(x)-ctk.vmdk"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.thinProvisioned = "1"
ddb.uuid = "60 00 C2 91 87 74 c9 53-d9 0d c2 23 db c5 be 17"
"""

DELTA = """# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=0d7cb221
parentCID=9c9a2c57
isNativeSnapshot="no"
createType="seSparse"
parentFileNameHint="/vmfs/volumes/ds/a b/a b.vmdk"

# Extent description
RW 65536 SESPARSE "a b-000002-sesparse.vmdk"

#DDB
ddb.grain = "8"
"""


def test_descriptor_base_and_delta() -> None:
    base = Descriptor.parse(BASE)
    assert base.create_type == "vmfs" and base.cid == "d189c84d" and not base.has_parent
    assert base.capacity == 65536 * 512 and base.thin
    assert base.change_track_path == 'ファイル鯖 "q" $(x)-ctk.vmdk'
    flat = base.flat_extent
    assert flat is not None and flat.file_name == 'ファイル鯖 "q" $(x)-flat.vmdk' and flat.type == "VMFS"
    assert base.ddb["ddb.uuid"].startswith("60 00 C2")
    again = Descriptor.parse(base.dumps())
    assert again == base

    delta = Descriptor.parse(DELTA)
    assert delta.has_parent and delta.parent_cid == "9c9a2c57" and delta.flat_extent is None
    assert delta.parent_file_name_hint == "/vmfs/volumes/ds/a b/a b.vmdk"
    assert delta.extents == [Extent("RW", 65536, "SESPARSE", "a b-000002-sesparse.vmdk")]


def test_descriptor_flat_with_offset_zero_and_refusals() -> None:
    d = Descriptor.parse('createType="monolithicFlat"\nRW 100 FLAT "x y.bin" 0\nRW 28 ZERO\n')
    assert [(e.type, e.file_name, e.offset) for e in d.extents] == [("FLAT", "x y.bin", 0), ("ZERO", None, 0)]
    assert d.capacity == 128 * 512 and d.flat_extent is None  # two extents
    with pytest.raises(ProtocolError):
        Descriptor.parse("KDMV\x00\x00binary")
    with pytest.raises(ProtocolError):
        Descriptor.parse('createType="vmfs"\n')
    with pytest.raises(ValueError):
        Extent("RW", 1, "VMFS", "a\nb").line()


GETALLVMS = """Vmid  Name                      File                                                                  Guest OS           Version   Annotation
1     web01                     [datastore1] web01/web01.vmx                                          otherLinux64Guest  vmx-14    
2     db 01                     [datastore1] db 01/db 01.vmx                                          otherLinux64Guest  vmx-14    first line
second line
3     ファイル鯖 "q" $(x)  [datastore1] ファイル鯖 "q" $(x)/ファイル鯖 "q" $(x).vmx    otherLinux64Guest  vmx-14    
Skipping invalid VM '48'
12    [x] odd  [ds 2] [x] odd/[x] odd.vmx  centos8_64Guest  vmx-19  
"""  # noqa: E501, W291


def test_getallvms() -> None:
    rows = vimcmd_listing.parse_getallvms(GETALLVMS)
    assert [(r.vmid, r.name, r.vmx) for r in rows] == [
        ("1", "web01", "[datastore1] web01/web01.vmx"),
        ("2", "db 01", "[datastore1] db 01/db 01.vmx"),
        ("3", 'ファイル鯖 "q" $(x)', '[datastore1] ファイル鯖 "q" $(x)/ファイル鯖 "q" $(x).vmx'),
        ("12", "[x] odd", "[ds 2] [x] odd/[x] odd.vmx"),
    ]
    assert rows[1].annotation == "first line\nsecond line"
    with pytest.raises(ProtocolError):
        vimcmd_listing.parse_getallvms("garbage")


# A name holding line breaks makes a row span lines: only in the name (the lab escapes the folder as
# %0a) or in the name and the path (a folder named with the line break).
GETALLVMS_MULTILINE = (
    "Vmid  Name                  File                                           Guest OS           Version"
    "   Annotation\n"
    "1     web01                 [datastore1] web01/web01.vmx                   otherLinux64Guest  vmx-14"
    "    notes:\n"
    "2023 migrated\n"
    "2     web01\n"
    "+ backup evil   [datastore1] web01%0a+ backup evil/web01%0a+ backup evil.vmx"
    "  otherLinux64Guest  vmx-14    \n"
    "3     a\n"
    "7     b\tz   [datastore1] a\n"
    "7     b\tz/a\n"
    "7     b\tz.vmx  otherGuest  vmx-19    ann\n"
    "4     \u2028odd\x85    [datastore1] odd/odd.vmx    otherGuest  vmx-19    \n"
    "5     db 01                 [datastore1] db 01/db 01.vmx               otherLinux64Guest  vmx-14    \n"
)


NOTES = "notes:\n2023 migrated"


def test_getallvms_names_with_line_breaks() -> None:
    rows = vimcmd_listing.parse_getallvms(GETALLVMS_MULTILINE)
    assert [(r.vmid, r.name, r.vmx, r.guest, r.version, r.annotation) for r in rows] == [
        ("1", "web01", "[datastore1] web01/web01.vmx", "otherLinux64Guest", "vmx-14", NOTES),
        (
            "2",
            "web01\n+ backup evil",
            "[datastore1] web01%0a+ backup evil/web01%0a+ backup evil.vmx",
            "otherLinux64Guest",
            "vmx-14",
            "",
        ),
        ("3", "a\n7     b\tz", "[datastore1] a\n7     b\tz/a\n7     b\tz.vmx", "otherGuest", "vmx-19", "ann"),
        ("4", "\u2028odd\x85", "[datastore1] odd/odd.vmx", "otherGuest", "vmx-19", ""),
        ("5", "db 01", "[datastore1] db 01/db 01.vmx", "otherLinux64Guest", "vmx-14", ""),
    ]


SNAPSHOT_GET = """Get Snapshot:
|-ROOT
--Snapshot Name        : user: nightly
--Snapshot Id        : 5
--Snapshot Desciption  : desc
--Snapshot Created On  : 12/17/2022 15:34:49
--Snapshot State       : powered on
--|-CHILD
----Snapshot Name        : esxi-reconciler-x
----Snapshot Id        : 7
----Snapshot Desciption  : 
----Snapshot Created On  : 1/2/2023 3:04:05
----Snapshot State       : powered off
----|-CHILD
------Snapshot Name        : deep "q"
------Snapshot Id        : 9
------Snapshot Desciption  : 
------Snapshot Created On  : 1/2/2023 3:04:06
------Snapshot State       : powered off
--|-CHILD
----Snapshot Name        : sibling
----Snapshot Id        : 8
----Snapshot Desciption  : 
----Snapshot Created On  : 1/2/2023 3:04:07
----Snapshot State       : powered off
"""  # noqa: W291


def test_snapshot_get_tree() -> None:
    snaps = vimcmd.parse_snapshot_get(SNAPSHOT_GET)
    assert [(s.id, s.name, s.parent_id, s.depth) for s in snaps] == [
        ("5", "user: nightly", None, 1),
        ("7", "esxi-reconciler-x", "5", 2),
        ("9", 'deep "q"', "7", 3),
        ("8", "sibling", "5", 2),
    ]
    assert snaps[0].description == "desc" and snaps[0].state == "powered on"
    assert snaps[0].created is not None and snaps[0].created.year == 2022
    assert snaps[1].created is not None and snaps[1].created.month == 1 and snaps[1].created.hour == 3
    assert vimcmd.parse_snapshot_get("Get Snapshot:\n") == []


def test_faults_power_config_license() -> None:
    text = (
        "(vim.fault.NotFound) {\n   faultCause = (vmodl.MethodFault) null, \n   faultMessage = <unset>\n"
        '   msg = "Unable to find a VM corresponding to "99""\n}\n'
    )
    fault = vimcmd.find_fault(text)
    assert fault == vimcmd.VimFault("vim.fault.NotFound", 'Unable to find a VM corresponding to "99"')
    assert vimcmd.find_fault("Create Snapshot:\n") is None
    assert vimcmd.find_fault("(vmodl.fault.InvalidArgument) {\n}") == vimcmd.VimFault(
        "vmodl.fault.InvalidArgument", ""
    )
    assert vimcmd_listing.parse_power_state("Retrieved runtime info\nPowered off\n") == "poweredOff"
    assert vimcmd_listing.parse_power_state("Retrieved runtime info\nSuspended\n") == "suspended"
    with pytest.raises(ProtocolError):
        vimcmd_listing.parse_power_state("")
    assert vimcmd.parse_license_editions(
        "   serial: 0\n   vmodl key: esx.hypervisor.cpuPackageCoreLimited\n"
    ) == ["esx.hypervisor.cpuPackageCoreLimited"]


def test_commands_are_quoted_for_sh() -> None:
    """Every builder quotes every value: a POSIX shell (dash; BusyBox ash quotes the same way) gets the
    exact arguments back."""
    for name in HOSTILE:
        argv = vimcmd.snapshot_create("3", name, f"desc {name}", memory=False, quiesce=True)
        line = vimcmd.command_line(["printf", "%s\\0", *argv])
        out = subprocess.run(["sh", "-c", line], capture_output=True, check=True).stdout
        assert out.split(b"\0")[:-1] == [a.encode() for a in argv]
        assert shlex.split(line)[1:] == ["%s\\0", *argv]
    with pytest.raises(ValueError):
        vimcmd.command_line(["echo", "nul\x00byte"])
    with pytest.raises(ValueError):
        vimcmd.snapshot_remove("3", "1; reboot")
    assert to_line(["vim-cmd", "vmsvc/get.config", "3"]) == "vim-cmd vmsvc/get.config 3"
    # a prepared line passes only when its line breaks are quoted (as command_line quotes them)
    line = vimcmd.command_line(["cat", "/vmfs/volumes/ds/web01\n+ backup evil/x.vmx"]) + " 2>/dev/null"
    assert to_line(line) == line
    for unsafe in (
        "echo a\nreboot",
        "echo a\rreboot",
        "echo 'a'\nreboot",
        'echo "a\\\nb"',
        "echo a\\\nreboot",
        "echo 'unclosed\n",
        "echo nul\x00",
    ):
        assert not vimcmd.line_breaks_quoted(unsafe), unsafe
        with pytest.raises(ValueError):
            to_line(unsafe)
    assert vimcmd.line_breaks_quoted("printf '%s' 'a\nb' \"c\nd\" 'it'\\''s\n'")


def test_datastore_paths() -> None:
    from reconciler.esxi.files import ds_join, same_file
    from reconciler.esxi.transport import dd_block, pieces, vmfs_path
    from reconciler.facts.inventory import split_ds_path

    assert split_ds_path("[ds 1] a b/c.vmdk") == ("ds 1", "a b/c.vmdk")
    assert split_ds_path("[ds]  lead\n/\nx.vmx") == ("ds", " lead\n/\nx.vmx")
    assert split_ds_path("[ds] trail \n") == ("ds", "trail \n")
    assert vmfs_path("[ds] a\nb/a\nb.vmx") == "/vmfs/volumes/ds/a\nb/a\nb.vmx"
    assert (
        vmfs_path('[datastore1] ファイル鯖 "q" $(x)/x.vmdk')
        == '/vmfs/volumes/datastore1/ファイル鯖 "q" $(x)/x.vmdk'
    )
    assert ds_join("[ds] vm dir", "vm-flat.vmdk") == "[ds] vm dir/vm-flat.vmdk"
    assert ds_join("[ds] vm", "/vmfs/volumes/other/x/y.vmdk") == "[other] x/y.vmdk"
    uuid_hint = ds_join("[ds] vm", "/vmfs/volumes/5c591ea4-0ba83629-522f-8a9f19e8d240/vm/vm.vmdk")
    assert same_file(uuid_hint, "[ds] vm/vm.vmdk")
    assert not same_file("[ds-a] vm/vm.vmdk", "[ds-b] vm/vm.vmdk")
    assert not same_file("[ds] vm/vm.vmdk", "[ds] vm/vm_1.vmdk")
    assert dd_block(0, 4 << 20) == 1 << 20 and dd_block(4096, 8192) == 4096 and dd_block(7, 9) == 1
    assert list(pieces([(0, 10), (100, 25)], 10)) == [(0, 10), (100, 10), (110, 10), (120, 5)]
    with pytest.raises(ValueError):
        split_ds_path("/vmfs/volumes/ds/x")


# -- found by the reliability suite's fuzzing (tests/reliability/test_fuzz_parsers.py) ------------------


def test_vmx_value_with_a_non_utf8_byte_and_an_escape() -> None:
    """A .vmx is read with surrogate escapes; a value holding both an undecodable byte and a ``|XX``
    escape used to raise UnicodeEncodeError. The byte comes back as it was."""
    raw = b'annotation = "caf\xe9 |22q|22"\n'.decode("utf-8", "surrogateescape")
    value = VmxFile.parse(raw).get("annotation")
    assert value is not None and value.encode("utf-8", "surrogateescape") == b'caf\xe9 "q"'


def test_descriptor_extent_with_more_digits_than_int_converts() -> None:
    with pytest.raises(ProtocolError, match="impossible size"):
        Descriptor.parse('RW ' + "9" * 5000 + ' VMFS "x-flat.vmdk"\n')


def test_a_fault_message_that_never_ends_is_read_in_linear_time() -> None:
    """``msg = "…`` without its closing quote over 200 000 lines: the message is all of it, read at once
    (each line used to re-scan everything before it)."""
    from tests.reliability.fuzz import bounded

    text = "(vim.fault.NotFound) {\n" + '   msg = "open\n' + "x\n" * 200_000
    with bounded("find_fault", 10.0):  # 40 s before
        fault = vimcmd.find_fault(text)
    assert fault is not None and fault.msg.startswith("open\nx\n") and fault.msg.count("\nx") == 200_000
