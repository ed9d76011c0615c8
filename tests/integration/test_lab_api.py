"""The lab's vSphere side: TLS pinning, inventory names, /folder range reads, datastore free space."""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import ssl
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

import pytest
from pyVmomi import vim
from pyVmomi.Security import ThumbprintMismatchException

from esxisim.handle import LabHandle, find_vm, pinned_context, wait_task
from tests import vimcmd_listing

pytestmark = pytest.mark.lab
ConfigSpec: Any = vim.vm.ConfigSpec

FREE_VMS = ["web01", "db 01", 'ファイル鯖 "q" $(x)']


def colon_hex(digest: bytes) -> str:
    return ":".join(f"{b:02X}" for b in digest)


def test_thumbprint_pin_accepts_the_right_certificate_only(lab: LabHandle) -> None:
    for host in (lab.free, lab.licensed):
        api = lab.host(host)["api"]
        der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((api["host"], api["port"])))
        assert colon_hex(hashlib.sha256(der).digest()) == api["thumbprint_sha256"]
        assert colon_hex(hashlib.sha1(der).digest()) == api["thumbprint_sha1"]
        with open(api["cert"]) as fh:
            assert ssl.PEM_cert_to_DER_cert(fh.read()) == der
        for pin in (api["thumbprint_sha256"], api["thumbprint_sha1"]):
            si = lab.connect_api(host, thumbprint=pin)
            try:
                assert si.content.about.apiType == "HostAgent"
            finally:
                lab.disconnect(si)
    free, licensed = lab.host(lab.free)["api"], lab.host(lab.licensed)["api"]
    with pytest.raises(ThumbprintMismatchException):
        lab.connect_api(lab.free, thumbprint=licensed["thumbprint_sha256"])
    with pytest.raises(ThumbprintMismatchException):
        lab.connect_api(lab.free, thumbprint=licensed["thumbprint_sha1"])
    # the pinned context holds on every later connection too: free's pin does not open licensed
    ctx = pinned_context(free["host"], free["port"], free["thumbprint_sha256"])
    with pytest.raises(ssl.SSLCertVerificationError):
        socket.create_connection((licensed["host"], licensed["port"]), timeout=5).close()
        with ctx.wrap_socket(socket.create_connection((licensed["host"], licensed["port"]), timeout=5)):
            pass


def test_vm_names_with_spaces_quotes_and_japanese(lab: LabHandle) -> None:
    res = lab.vimcmd(lab.free, "vmsvc/getallvms")
    assert res.exit == 0, res
    lines = res.text.splitlines()
    assert lines[0].split() == ["Vmid", "Name", "File", "Guest", "OS", "Version", "Annotation"]
    rows = {r.name: (r.vmid, r.vmx) for r in vimcmd_listing.parse_getallvms(res.text)}
    assert sorted(rows) == sorted(FREE_VMS)
    si = lab.api(lab.free)
    for name in FREE_VMS:
        entry = lab.vm(lab.free, name)
        vmid, vmx = rows[name]
        assert vmid == entry["vmid"]
        assert vmx == entry["vmx"] == f"[datastore1] {name}/{name}.vmx"
        vm = find_vm(si, name)
        assert vm._moId == entry["vmid"]
        assert vm.config.files.vmPathName == vmx
        assert vm.summary.config.name == name
    listing = lab.run(lab.free, "ls -1 /vmfs/volumes/datastore1/")
    assert set(FREE_VMS) <= set(listing.text.splitlines())


def _folder_get(lab: LabHandle, host: str, rel: str, range_header: str | None) -> Any:
    api = lab.host(host)["api"]
    url = f"https://{api['host']}:{api['port']}/folder/{quote(rel)}?dcPath=ha-datacenter&dsName=datastore1"
    ctx = ssl.create_default_context(cafile=api["cert"])
    ctx.check_hostname = False
    auth = base64.b64encode(f"root:{lab.password(host)}".encode()).decode()
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"})
    if range_header:
        req.add_header("Range", range_header)
    return urllib.request.urlopen(req, context=ctx, timeout=30)


def test_folder_range_get_returns_206_and_the_right_bytes(lab: LabHandle) -> None:
    for vm_name in ("web01", 'ファイル鯖 "q" $(x)'):
        rel = f"{vm_name}/{vm_name}-flat.vmdk"
        local = lab.local_path(lab.free, f"[datastore1] {rel}")
        size = local.stat().st_size
        data = local.read_bytes()
        start, end = 1 << 20, (1 << 20) + 65535
        with _folder_get(lab, lab.free, rel, f"bytes={start}-{end}") as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{size}"
            assert resp.read() == data[start : end + 1]
        with _folder_get(lab, lab.free, rel, f"bytes={size - 4096}-") as resp:
            assert resp.status == 206
            assert resp.read() == data[size - 4096 :]
    vmx = "web01/web01.vmx"
    with _folder_get(lab, lab.free, vmx, None) as resp:
        assert resp.status == 200
        assert resp.read() == lab.local_path(lab.free, f"[datastore1] {vmx}").read_bytes()
    with pytest.raises(urllib.error.HTTPError) as err:
        _folder_get(lab, lab.free, "web01/web01-flat.vmdk", f"bytes={size + 10}-")
    assert err.value.code == 416


def _vimcmd_free_space(lab: LabHandle, host: str) -> int:
    res = lab.vimcmd(host, "hostsvc/datastore/info", "datastore1")
    assert res.exit == 0, res
    m = re.search(r"freeSpace = (\d+)", res.text)
    assert m, res.text
    return int(m.group(1))


def test_datastore_free_space_shrinks_while_a_delta_grows(lab: LabHandle) -> None:
    host = lab.licensed
    si = lab.api(host)
    vm = find_vm(si, "app203")
    ds = vm.datastore[0]
    api_before = ds.summary.freeSpace
    cli_before = _vimcmd_free_space(lab, host)
    assert ds.summary.capacity == lab.host(host)["datastores"][0]["capacity"]
    snap = wait_task(vm.CreateSnapshot_Task("space", "", False, False))
    try:
        written = lab.client(host).guest_write("app203", 20, seed=5)["bytes"]
        assert written >= 0.19 * (32 + 16) * (1 << 20)
        api_after = ds.summary.freeSpace
        cli_after = _vimcmd_free_space(lab, host)
        assert api_before - api_after >= written
        assert cli_before - cli_after >= written
        assert abs(api_after - cli_after) < (1 << 20)
        res = lab.vimcmd(host, "hostsvc/datastore/listsummary")
        assert res.exit == 0 and "datastore1" in res.text
    finally:
        wait_task(snap.RemoveSnapshot_Task(removeChildren=False))
    assert vm.snapshot is None


def test_free_host_refuses_state_changes_but_allows_reads(lab: LabHandle) -> None:
    si = lab.api(lab.free)
    vm = find_vm(si, "web01")
    assert vm.runtime.powerState == "poweredOn"
    assert [d.key for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)] == [
        2000,
        2001,
    ]
    with pytest.raises(vim.fault.RestrictedVersion):
        wait_task(vm.PowerOffVM_Task())
    with pytest.raises(vim.fault.RestrictedVersion):
        wait_task(vm.ReconfigVM_Task(ConfigSpec(changeTrackingEnabled=True)))
    assert vm.runtime.powerState == "poweredOn"
    res = lab.vimcmd(lab.free, "vmsvc/power.getstate", lab.vm(lab.free, "web01")["vmid"])
    assert res.exit == 0 and "Powered on" in res.text
