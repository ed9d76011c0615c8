"""Every parser against outputs captured on real ESXi hosts (``tests/fixtures/real``, provenance in its
``index.yaml``): each sample is parsed and what it means is asserted, so the parsers cannot drift into
an idealised ESXi shared with the lab."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.esxi import esxcli, vimcmd
from reconciler.esxi.errors import CommandError, ProtocolError
from reconciler.esxi.licence import license_kind_from_editions
from reconciler.esxi.vmdk import Descriptor
from reconciler.esxi.vmx import VmxFile
from tests import vimcmd_listing

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "real"
SAMPLES: list[dict[str, Any]] = yaml.safe_load((REAL / "index.yaml").read_text())["samples"]


def text_of(sample: dict[str, Any]) -> str:
    return (REAL / str(sample["file"])).read_text(encoding="utf-8")


NAMED_SOURCE = re.compile(r"^(?:[\w.-]+/[\w.-]+ \S.* @ [0-9a-f]{40}\b|https://\S+)")
"""``owner/repo path @ <commit>`` (a public GitHub file anyone can open) or an https address (an issue)."""


def test_corpus_is_complete_and_documented() -> None:
    """40+ samples whose origin anyone can follow (repository, path and commit, or an address), each with
    a version and an edit note; every file is indexed; a sample of unresolved origin says why it is kept."""
    named = [s for s in SAMPLES if s["provenance"] == "named"]
    assert len(named) >= 40
    for s in SAMPLES:
        assert s["provenance"] in ("named", "unresolved"), s["file"]
        if s["provenance"] == "named":
            assert NAMED_SOURCE.match(s["source"]), s["file"]
            assert "index file id" not in s["source"], s["file"]
        else:
            assert "kept because it is the only" in s["unresolved"], s["file"]
    indexed = {s["file"] for s in SAMPLES}
    on_disk = {
        str(p.relative_to(REAL)) for p in REAL.rglob("*") if p.is_file() and p.suffix not in (".yaml", ".md")
    }
    assert indexed == on_disk
    for s in SAMPLES:
        assert s["source"] and s["version"] and s["edits"] and s["expect"] is not None, s["file"]
    kinds = {s["kind"] for s in SAMPLES}
    assert kinds >= {"vmx", "descriptor", "getallvms", "snapshot_get", "power_getstate", "license", "fault"}
    assert kinds >= {"vmkfstools", "esxcli_fs"}


def by_kind(kind: str) -> list[Any]:
    return [pytest.param(s, id=s["file"]) for s in SAMPLES if s["kind"] == kind]


@pytest.mark.parametrize("sample", by_kind("vmx"))
def test_vmx(sample: dict[str, Any]) -> None:
    want = sample["expect"]
    vmx = VmxFile.parse(text_of(sample))
    assert vmx.get(".encoding") == "UTF-8"
    assert vmx.get("displayName") == want["display_name"]
    assert [[d.node, d.file_name] for d in vmx.disks()] == want["disks"]
    assert [d.node for d in vmx.disks() if vmx.cbt_usable(d.node)] == want["cbt_usable"]
    for nic, mac in want["macs"].items():
        assert (vmx.get(f"{nic}.generatedAddress") or vmx.get(f"{nic}.address")) == mac
    for key, value in want.get("values", {}).items():
        assert vmx.get(key) == value
    if "annotation_lines" in want:
        annotation = vmx.get("annotation") or ""
        assert annotation.count("\n") == want["annotation_lines"]
        assert annotation.splitlines()[0] == want["annotation_first"]
    if "json_value" in want:  # |22 and |0A escapes decode to the JSON the guest wrote
        assert len(json.loads(vmx.get(want["json_value"]) or "")["applications"]) == want["json_applications"]
    assert VmxFile.parse(vmx.dumps()).items() == vmx.items()  # rewriting keeps every value


@pytest.mark.parametrize("sample", by_kind("descriptor"))
def test_descriptor(sample: dict[str, Any]) -> None:
    want = sample["expect"]
    d = Descriptor.parse(text_of(sample))
    assert d.create_type == want["create_type"]
    assert d.cid == want["cid"]
    assert d.has_parent is want["parent"]
    if want["parent"]:
        assert d.parent_cid == want["parent_cid"] and d.parent_file_name_hint == want["parent_hint"]
    assert [[e.type, e.file_name, e.sectors] for e in d.extents] == want["extents"]
    assert d.change_track_path == want["change_track_path"]
    flat = d.flat_extent
    assert (flat.file_name if flat else None) == want["flat_extent"]
    if "thin" in want:
        assert d.thin is want["thin"]
    for key, value in want.get("ddb", {}).items():
        assert d.ddb[key] == value
    for key, value in want.get("header", {}).items():
        assert d.header[key] == value


@pytest.mark.parametrize("sample", by_kind("getallvms"))
def test_getallvms(sample: dict[str, Any]) -> None:
    rows = vimcmd_listing.parse_getallvms(text_of(sample))
    got = [[r.vmid, r.name, r.vmx, r.guest, r.version, r.annotation] for r in rows]
    assert got == sample["expect"]["rows"]


@pytest.mark.parametrize("sample", by_kind("snapshot_get"))
def test_snapshot_get(sample: dict[str, Any]) -> None:
    want = sample["expect"]
    if "error" in want:
        with pytest.raises(ProtocolError, match=want["error"]) as info:
            vimcmd.parse_snapshot_get(text_of(sample))
        assert "vim-cmd vmsvc/snapshot.get" in str(info.value)
        return
    snaps = vimcmd.parse_snapshot_get(text_of(sample))
    got = [
        [s.id, s.name, s.parent_id, s.depth, s.created.isoformat() if s.created else None, s.state]
        for s in snaps
    ]
    assert got == want["snapshots"]


@pytest.mark.parametrize("sample", by_kind("power_getstate"))
def test_power_getstate(sample: dict[str, Any]) -> None:
    assert vimcmd_listing.parse_power_state(text_of(sample)) == sample["expect"]["state"]


@pytest.mark.parametrize("sample", by_kind("license"))
def test_license(sample: dict[str, Any]) -> None:
    editions = vimcmd.parse_license_editions(text_of(sample))
    assert editions == sample["expect"]["editions"]
    assert license_kind_from_editions(editions) == sample["expect"]["kind"]


@pytest.mark.parametrize("sample", by_kind("fault"))
def test_fault(sample: dict[str, Any]) -> None:
    want = sample["expect"]
    text = text_of(sample)
    fault = vimcmd.find_fault(text)
    assert ([fault.type, fault.msg, fault.context] if fault else None) == want["fault"]
    if "power_op" in want:  # what the product does with it: an error, even with exit status 0
        with pytest.raises(CommandError) as info:
            vimcmd.check_power_output(want["power_op"], text)
        expected = want.get("power_error") or f"{want['fault'][0]}: {want['fault'][1]}"
        assert expected in str(info.value)


@pytest.mark.parametrize("sample", by_kind("vmkfstools"))
def test_vmkfstools(sample: dict[str, Any]) -> None:
    text = text_of(sample)
    assert vimcmd.vmkfstools_failure(text) == sample["expect"]["failure"]
    assert ("Option --adaptertype is deprecated" in text) is sample["expect"]["deprecated_adaptertype"]


@pytest.mark.parametrize("sample", by_kind("esxcli_fs"))
def test_esxcli_filesystem_list(sample: dict[str, Any]) -> None:
    rows = esxcli.parse_filesystem_list(text_of(sample))
    assert [[r.mount_point, r.volume_name, r.type, r.size, r.free] for r in rows] == sample["expect"]["rows"]
    assert all(r.mounted and r.uuid in r.mount_point for r in rows)


# -- regressions of the four defects, built from the real samples ------------------------------------


def real(name: str) -> str:
    return (REAL / name).read_text(encoding="utf-8")


def test_fault_after_a_prefix_is_an_error_even_with_exit_status_zero() -> None:
    """ESXi 7–9 print ``Power on failed: (vim.fault.…) {``: the shell layer must raise (it checks every
    command's output), with the fault type and the fault's own message (not a nested one)."""
    text = real("vimcmd/fault-power-on-failed-generic-esxi9.txt")
    fault = vimcmd.find_fault(text)
    assert fault == vimcmd.VimFault(
        "vim.fault.GenericVmConfigFault", "This host does not support AMD-V.", "Power on failed"
    )
    assert fault.describe() == (
        "Power on failed: vim.fault.GenericVmConfigFault: This host does not support AMD-V."
    )
    reset = vimcmd.find_fault(real("vimcmd/fault-power-reset-invalidpowerstate-esxi9.txt"))
    assert (
        reset is not None and reset.type == "vim.fault.InvalidPowerState" and reset.context == "Reset failed"
    )
    # success output is not a fault
    assert vimcmd.find_fault("Powering on VM:\n") is None
    vimcmd.check_power_output("on", "Powering on VM:\n")
    vimcmd.check_power_output("shutdown", "")


def test_licence_over_ssh_reads_real_output_and_refuses_unknown_shapes() -> None:
    """The indented ``   vmodl key:`` after a ``[200]`` line is read; a free host is free."""
    free = vimcmd.parse_license_editions(real("vimcmd/license-esxi7-free-hypervisor.txt"))
    assert license_kind_from_editions(free) == "free"
    with pytest.raises(ProtocolError, match=r"vimsvc/license --show.*no 'vmodl key'"):
        vimcmd.parse_license_editions(
            "[200] Sending request for installed licenses...\n[200] End of report.\n"
        )
    with pytest.raises(ProtocolError, match=r"vimsvc/license --show: unexpected line 'Permission denied'"):
        vimcmd.parse_license_editions("Permission denied\n")


def test_getallvms_brackets_in_names_and_empty_datastore() -> None:
    rows = vimcmd_listing.parse_getallvms(real("vimcmd/getallvms-esxi7-brackets-in-name.txt"))
    assert rows[1].name == "Test Test [Test] [Test]" and rows[1].vmx == "[datastore_050_vmfs6] Test/Test.vmx"
    vcls = vimcmd_listing.parse_getallvms(real("vimcmd/getallvms-esxi9-vcls-empty-datastore.txt"))
    assert [(r.vmid, r.vmx.split(" ", 1)[0], r.annotation) for r in vcls] == [("1698", "[]", "")]
    # the vCLS row after a VM with a multi-line annotation is a row of its own, not annotation
    header = "Vmid  Name  File  Guest OS  Version  Annotation\n"
    text = (
        header
        + "3   web   [ds1] web/web.vmx   centos8_64Guest   vmx-14   first\nsecond line\n"
        + real("vimcmd/getallvms-esxi9-vcls-empty-datastore.txt").splitlines()[1]
        + "\n"
    )
    rows = vimcmd_listing.parse_getallvms(text)
    assert [(r.vmid, r.annotation) for r in rows] == [("3", "first\nsecond line"), ("1698", "")]


def test_getallvms_name_with_a_line_break() -> None:
    """A name holding a newline is printed over two lines; the row is rebuilt with the newline."""
    text = (
        "Vmid   Name   File   Guest OS   Version   Annotation\n"
        "7      two\n"
        "lines   [ds1] two?lines/two?lines.vmx   otherGuest64   vmx-19   \n"
        "8      plain   [ds1] plain/plain.vmx   otherGuest64   vmx-19   2 disks\n"
        "9      next   [ds1] next/next.vmx   otherGuest64   vmx-19\n"
    )
    rows = vimcmd_listing.parse_getallvms(text)
    assert [(r.vmid, r.name, r.annotation) for r in rows] == [
        ("7", "two\nlines", ""),
        ("8", "plain", "2 disks"),
        ("9", "next", ""),
    ]


def test_unknown_shapes_raise_naming_command_and_line() -> None:
    with pytest.raises(ProtocolError, match=r"vim-cmd vmsvc/getallvms: expected the header"):
        vimcmd_listing.parse_getallvms("Failed to login: Connection reset by peer\n")
    with pytest.raises(
        ProtocolError, match=r"vim-cmd vmsvc/power.getstate: unexpected line 'Powered sideways'"
    ):
        vimcmd_listing.parse_power_state("Retrieved runtime info\nPowered sideways\n")
    with pytest.raises(ProtocolError, match=r"vim-cmd vmsvc/power.on: unexpected line 'Waiting'"):
        vimcmd.check_power_output("on", "Powering on VM:\nWaiting\n")
    with pytest.raises(ProtocolError, match=r"vim-cmd vmsvc/snapshot.get: unexpected line '\+\+Snapshot"):
        vimcmd.parse_snapshot_get("Get Snapshot:\n|-ROOT\n++Snapshot Name : x\n")
    with pytest.raises(ProtocolError, match=r"esxcli storage filesystem list: expected the dashes"):
        esxcli.parse_filesystem_list("Mount Point  Name\n-----------  ----\n/vmfs/volumes/x  y\n")


def test_snapshot_description_over_several_lines() -> None:
    text = real("vimcmd/snapshot-get-esxi65-single.txt").replace(
        "Desciption  :\n", "Desciption  : ticket 42\ncontinues here\n"
    )
    (snap,) = vimcmd.parse_snapshot_get(text)
    assert snap.description == "ticket 42\ncontinues here"
    assert snap.created == datetime(2017, 6, 22, 16, 18, 14)


def test_vmkfstools_create_uses_a_documented_suffix_and_exact_sizes() -> None:
    """``-c`` sizes are given in KiB (``k``: named by the storage guide and by vmkfstools' usage), exactly."""
    argv = vimcmd.vmkfstools_create("/vmfs/volumes/ds/vm/vm.vmdk", 8 << 20, thin=True)
    assert argv == ["vmkfstools", "-c", "8192k", "-d", "thin", "/vmfs/volumes/ds/vm/vm.vmdk"]
    assert vimcmd.vmkfstools_create("/x.vmdk", 3072, thin=False)[2:5] == ["3k", "-d", "zeroedthick"]
    with pytest.raises(ValueError, match="whole KiB"):
        vimcmd.vmkfstools_create("/x.vmdk", 2560, thin=True)
