"""The lab prints what real hosts print: its vim-cmd and vmkfstools outputs have the structure of the
samples captured on real ESXi (``tests/fixtures/real``), and the product's parsers read both alike."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler.esxi import vimcmd
from reconciler.esxi.errors import CommandError
from reconciler.esxi.licence import license_kind_from_editions
from tests import vimcmd_listing

pytestmark = pytest.mark.lab

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "real"


def shape(line: str) -> str:
    """A line's structure: indentation, the text before the first value, and the value kinds."""
    indent = len(line) - len(line.lstrip(" "))
    head = re.split(r"[:=]", line.strip(), maxsplit=1)[0] if re.search(r"[:=]", line) else line.strip()
    return f"{indent}|{re.sub(r'[0-9]+', '9', head)}"


def test_license_output_has_the_real_layout(lab: LabHandle) -> None:
    real = (REAL / "vimcmd/license-esxi6-evaluation.txt").read_text()
    for host, kind in ((lab.free, "free"), (lab.licensed, "licensed")):
        res = lab.vimcmd(host, "vimsvc/license", "--show")
        assert res.exit == 0, res
        lines = res.text.splitlines()
        assert lines[0] == real.splitlines()[0]  # the [200] status line
        assert lines[-1] == "[200] End of report."
        fields = [shape(line) for line in lines if re.match(r"^ {3}\w", line)]
        assert fields == [shape(line) for line in real.splitlines() if re.match(r"^ {3}\w", line)]
        assert all(line.startswith("     [") for line in lines[1:-1] if line.strip().startswith("["))
        assert license_kind_from_editions(vimcmd.parse_license_editions(res.text)) == kind


def test_power_failure_has_the_real_prefix_and_is_caught(lab: LabHandle) -> None:
    """A failing power.on prints the progress line, then '<Op> failed: (vim.fault.X) {' as ESXi 7–9."""
    real = (REAL / "vimcmd/fault-power-reset-invalidpowerstate-esxi9.txt").read_text().splitlines()
    vm = lab.vm(lab.free, "web01")
    state = vimcmd_listing.parse_power_state(lab.vimcmd(lab.free, "vmsvc/power.getstate", vm["vmid"]).text)
    op = "on" if state == "poweredOn" else "off"  # the state it is already in: refused, nothing changes
    res = lab.vimcmd(lab.free, f"vmsvc/power.{op}", vm["vmid"])
    lines = res.text.splitlines()
    assert lines[0] == {"on": "Powering on VM:", "off": "Powering off VM:"}[op]
    assert re.match(r"^Power (on|off) failed: \(vim\.fault\.InvalidPowerState\) \{$", lines[1])
    assert re.match(r"^Reset failed: \(vim\.fault\.InvalidPowerState\) \{$", real[1])
    assert lines[2] == real[2]  # '   faultCause = (vmodl.MethodFault) null, '
    fault = vimcmd.find_fault(res.text)
    assert (
        fault is not None and fault.type == "vim.fault.InvalidPowerState" and fault.context.endswith("failed")
    )
    with pytest.raises(CommandError, match="InvalidPowerState"):
        vimcmd.check_power_output(op, res.text)
    getstate = lab.vimcmd(lab.free, "vmsvc/power.getstate", vm["vmid"]).text
    assert vimcmd_listing.parse_power_state(getstate) == state


def test_getallvms_snapshot_get_and_getstate_parse_like_real_output(lab: LabHandle) -> None:
    res = lab.vimcmd(lab.free, "vmsvc/getallvms")
    rows = vimcmd_listing.parse_getallvms(res.text)
    assert rows and all(re.fullmatch(r"vmx-\d+", r.version) for r in rows)
    # columns are padded with (at least) three blanks, as on ESXi 6.5-9.0
    real = (REAL / "vimcmd/getallvms-esxi65-invalid-vm-first.txt").read_text().splitlines()[2]
    assert re.match(r"^\d+ {3,}\S", real) and all(
        re.match(r"^\d+ {3,}\S", line) for line in res.text.splitlines()[1:2]
    )
    vm = lab.vm(lab.free, "web01")
    snaps = lab.vimcmd(lab.free, "vmsvc/snapshot.get", vm["vmid"]).text
    assert snaps.splitlines()[0] == "Get Snapshot:"
    vimcmd.parse_snapshot_get(snaps)
    getstate = lab.vimcmd(lab.free, "vmsvc/power.getstate", vm["vmid"]).text.splitlines()
    assert getstate[0] == (REAL / "vimcmd/power-getstate-off-esxi65.txt").read_text().splitlines()[0]


def test_vmkfstools_accepts_only_documented_size_suffixes(lab: LabHandle) -> None:
    scratch = "/vmfs/volumes/datastore1/real-shapes"
    lab.run(lab.free, f"mkdir -p {scratch}")
    try:
        for size in ("8388608b", "16384s", "1t", "8388608"):  # named by the guide or by no one
            bad = lab.run(lab.free, f"vmkfstools -c {size} -d thin {scratch}/b.vmdk")
            assert bad.exit != 0 and "Invalid size" in bad.text + bad.stderr.decode(), size
        good = lab.run(lab.free, f"vmkfstools -c 8192k -d thin {scratch}/k.vmdk")
        assert good.exit == 0, good
        assert "Create: 100% done." in good.text
    finally:
        lab.run(lab.free, f"rm -rf {scratch}")
