"""The product against a lab host of each ESXi version the lab simulates (6.7, 7.0, 8.0).

The lab prints what differs between versions as the real samples show it (``tests/fixtures/real``,
docs/lab.md "ESXi versions"): the licence report's cost unit and product version, the fault layout,
and how a failed power operation is reported (6.x: a bare ``Power on failed`` on stderr; 7.0+: the
fault object after ``Power on failed: `` on stdout). The product's paths that read those outputs —
licence detection over SSH, power-failure detection (also when vim-cmd exits 0), the getallvms
inventory — must work on every version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler.esxi import vimcmd
from reconciler.esxi.api import ApiSession
from reconciler.esxi.errors import EsxiError, PowerStateTimeoutError
from reconciler.esxi.host import EsxiHost
from reconciler.esxi.shell import ShellSession, SshTarget
from tests import vimcmd_listing

pytestmark = pytest.mark.lab

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "real"
VERSIONS = ("6.7", "7.0", "8.0")
ABOUT_VERSION = {"6.7": "6.7.0", "7.0": "7.0.3", "8.0": "8.0.0"}
LICENCE_PRODUCT_VERSION = {"6.7": "6.0", "7.0": "7.0", "8.0": "8.0"}


@pytest.fixture(params=VERSIONS)
def versioned(
    request: pytest.FixtureRequest, lab_of_version: Callable[[str], LabHandle]
) -> Iterator[tuple[str, LabHandle]]:
    """(version, a two-host lab answering as that version); faults cleared after the test."""
    version = str(request.param)
    lab = lab_of_version(version)
    try:
        yield version, lab
    finally:
        lab.clear_faults()


def esxi_host(lab: LabHandle, name: str) -> EsxiHost:
    """The product's view of a lab host: pinned API session and SSH with the lab's client key."""
    info = lab.host(name)
    password = Path(info["ssh"]["password_file"]).read_text().strip()
    key = Path(info["ssh"]["private_key"]).read_text()
    api = ApiSession(
        info["api"]["host"], info["api"]["port"], "root", lambda: password, info["api"]["thumbprint_sha256"]
    )
    shell = ShellSession(
        SshTarget(
            info["ssh"]["host"],
            info["ssh"]["port"],
            "root",
            info["ssh"]["host_key_fingerprint"],
            private_key=lambda: key,
        )
    )
    return EsxiHost(api, shell, name=name)


def test_the_host_reports_its_version(versioned: tuple[str, LabHandle]) -> None:
    version, lab = versioned
    assert lab.host(lab.free)["esxi_version"] == version
    with esxi_host(lab, lab.free) as host:
        about = host.api.content.about
        assert about.version == ABOUT_VERSION[version]
        assert about.fullName.startswith(f"VMware ESXi {ABOUT_VERSION[version]} build-")


def test_licence_is_detected_over_ssh(versioned: tuple[str, LabHandle]) -> None:
    """With the API unreachable the licence is read from ``vim-cmd vimsvc/license --show``; its cost
    unit is per CPU package on 6.x (eclair's ESXi 6.0 report) and per 32 cores from 7.0."""
    version, lab = versioned
    real_6 = (REAL / "vimcmd/license-esxi6-evaluation.txt").read_text().splitlines()
    for name, kind in ((lab.free, "free"), (lab.licensed, "licensed")):
        text = lab.vimcmd(name, "vimsvc/license", "--show").text
        lines = text.splitlines()
        assert lines[0] == real_6[0] and lines[-1] == real_6[-1]  # the [200] status lines
        unit = "cpuPackage" if version == "6.7" else "cpuPackage:32core"
        assert f"   unit: {unit}" in lines
        assert f"     [ProductVersion] = {LICENCE_PRODUCT_VERSION[version]}" in lines
        lab.fault(name, "api-down")
        try:
            with esxi_host(lab, name) as host:
                assert host.license == kind
        finally:
            lab.fault(name, "api-up")


def test_fault_layout_of_the_version_is_read(versioned: tuple[str, LabHandle]) -> None:
    """6.x faults open with ``dynamicType = <unset>,`` and end every field with ``,`` (apache/vcl's
    samples); 7.0+ ones have ``faultMessage`` and no comma after the last field (ESXi 9.0 samples).
    The product reads the fault type and its own message from both."""
    version, lab = versioned
    res = lab.vimcmd(lab.free, "vmsvc/power.getstate", "9999")
    lines = res.text.splitlines()
    assert res.exit == 1 and lines[0] == "(vim.fault.NotFound) {"
    if version == "6.7":
        old = (REAL / "vimcmd/fault-managedobjectnotfound-old.txt").read_text().splitlines()
        assert lines[1] == old[1] == "   dynamicType = <unset>,"
        assert lines[-2].endswith('",') and old[-2].endswith('",')
    else:
        new = (REAL / "vimcmd/fault-power-reset-invalidpowerstate-esxi9.txt").read_text().splitlines()
        assert lines[1] == new[2] == "   faultCause = (vmodl.MethodFault) null, "
        assert lines[-2].endswith('"') and new[-2].endswith('"')
    fault = vimcmd.find_fault(res.text)
    assert fault is not None and fault.type == "vim.fault.NotFound"
    assert fault.msg == 'Unable to find a VM corresponding to "9999"'


@pytest.mark.parametrize("exit_zero", [False, True], ids=["exit-1", "exit-0"])
def test_a_failed_power_on_is_an_error(versioned: tuple[str, LabHandle], exit_zero: bool) -> None:
    """A power-on the host refuses is reported by the product as that failure — in the version's
    shape, and also when vim-cmd exits 0 (fault ``vimcmd-exit-zero``): the product judges the output
    (stdout and stderr), not the exit status, and does not wait for a power state that never comes."""
    version, lab = versioned
    vm = lab.vm(lab.free, "web01")
    with esxi_host(lab, lab.free) as host:
        host.power_off(host.find_vm("web01"))
        try:
            lab.fault(lab.free, "power-on-fail")
            lab.fault(lab.free, "vimcmd-exit-zero", enabled=exit_zero)
            raw = lab.vimcmd(lab.free, "vmsvc/power.on", vm["vmid"])
            assert raw.exit == (0 if exit_zero else 1)
            if version == "6.7":  # hashicorp/packer#3781: stdout 'Powering on VM:', stderr 'Power on failed'
                assert raw.text == "Powering on VM:\n"
                assert raw.stderr.decode() == "Power on failed\n"
            else:
                lines = raw.text.splitlines()
                assert lines[0] == "Powering on VM:"
                assert lines[1] == "Power on failed: (vim.fault.GenericVmConfigFault) {"
            with pytest.raises(EsxiError, match="Power on failed") as info:
                host.power_on(host.find_vm("web01"), timeout=120)
            assert not isinstance(info.value, PowerStateTimeoutError)
            if version != "6.7":
                assert "vim.fault.GenericVmConfigFault: Module 'MonitorLoop' power on failed." in str(
                    info.value
                )
            assert host.find_vm("web01").power_state == "poweredOff"
        finally:
            lab.clear_faults()
            host.power_on(host.find_vm("web01"))
        assert host.find_vm("web01").power_state == "poweredOn"


def test_getallvms_inventory_matches_the_api(versioned: tuple[str, LabHandle]) -> None:
    """``vmsvc/getallvms`` read over the product's SSH session gives the VMs the API lists."""
    _, lab = versioned
    for name in (lab.free, lab.licensed):
        with esxi_host(lab, name) as host:
            assert host.shell is not None
            rows = vimcmd_listing.parse_getallvms(host.shell.run(vimcmd_listing.getallvms()).text)
            api = {vm.vmid: (vm.name, vm.vmx_path) for vm in host.list_vms()}
            assert {row.vmid: (row.name, row.vmx) for row in rows} == api
            assert all(row.version == "vmx-14" for row in rows)
