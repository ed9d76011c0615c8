"""Fault injection in the lab: dropped SSH sessions, slow/down API, failing snapshots, a host going down."""

from __future__ import annotations

import shlex
import socket
import time

import paramiko
import pytest
from pyVmomi import vim

from esxisim.handle import LabHandle, find_vm, vmfs_path, wait_task

pytestmark = pytest.mark.lab


def test_ssh_drop_kills_a_running_dd_transfer(lab_faults: LabHandle) -> None:
    lab = lab_faults
    host = lab.free
    disk = lab.vm(host, "web01")["disks"][0]
    flat = vmfs_path(disk["file"]).removesuffix(".vmdk") + "-flat.vmdk"
    client = lab.connect_ssh(host)
    try:
        _, out, _ = client.exec_command(f"dd if={shlex.quote(flat)} bs=64k 2>/dev/null")
        got = out.channel.recv(65536)
        assert got
        # the client reads no more, so dd blocks with most of the disk unsent when the drop comes
        answer = lab.fault(host, "ssh-drop")
        assert answer["killed"] >= 1
        received = len(got)
        out.channel.settimeout(10)
        try:
            while chunk := out.channel.recv(1 << 20):
                received += len(chunk)
        except (EOFError, OSError, paramiko.SSHException):
            pass  # the connection died under the read: that is the drop too
        assert received < disk["size"]
        assert not out.channel.exit_status_ready() or out.channel.recv_exit_status() != 0
    finally:
        client.close()
    # the listener survives: new sessions work
    assert lab.run(host, "echo again").text == "again\n"


def test_api_slow_delays_calls(lab_faults: LabHandle) -> None:
    # The delay is far above what a call takes on a loaded machine (milliseconds; rarely a few hundred):
    # only "at least the delay" is exact, so "without the delay" is told apart by a wide margin.
    delay = 4.0
    lab = lab_faults
    si = lab.api(lab.licensed)

    def call() -> float:
        t0 = time.monotonic()
        si.CurrentTime()
        return time.monotonic() - t0

    assert call() < delay
    lab.fault(lab.licensed, "api-slow", delay_ms=int(delay * 1000))
    assert call() >= delay
    lab.fault(lab.licensed, "clear")
    assert call() < delay


def test_api_down_refuses_connections_until_api_up(lab_faults: LabHandle) -> None:
    lab = lab_faults
    api = lab.host(lab.free)["api"]
    lab.fault(lab.free, "api-down")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((api["host"], api["port"]), timeout=5).close()
    with pytest.raises(OSError):
        lab.connect_api(lab.free)
    # SSH and vim-cmd are not affected
    assert lab.vimcmd(lab.free, "vmsvc/getallvms").exit == 0
    lab.fault(lab.free, "api-up")
    si = lab.connect_api(lab.free)
    try:
        assert find_vm(si, "web01").runtime.powerState == "poweredOn"
    finally:
        lab.disconnect(si)


def test_snapshot_fail_makes_snapshot_create_fail(lab_faults: LabHandle) -> None:
    lab = lab_faults
    vmid = lab.vm(lab.free, "db 01")["vmid"]
    lab.fault(lab.free, "snapshot-fail", enabled=True)
    res = lab.vimcmd(lab.free, "vmsvc/snapshot.create", vmid, "doomed", "", "0", "0")
    assert res.exit != 0
    assert "(vim.fault." in res.text + res.stderr.decode()
    vm = find_vm(lab.api(lab.licensed), "app201")
    lab.fault(lab.licensed, "snapshot-fail", enabled=True)
    with pytest.raises(vim.fault.VimFault):
        wait_task(vm.CreateSnapshot_Task("doomed", "", False, False))
    assert vm.snapshot is None
    lab.fault(lab.free, "snapshot-fail", enabled=False)
    res = lab.vimcmd(lab.free, "vmsvc/snapshot.get", vmid)
    assert "doomed" not in res.text


def test_host_down_and_up(lab_faults: LabHandle) -> None:
    lab = lab_faults
    host = lab.licensed
    info = lab.host(host)
    vmid = lab.vm(host, "app201")["vmid"]
    lab.fault(host, "host-down")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((info["api"]["host"], info["api"]["port"]), timeout=5).close()
    with pytest.raises((paramiko.SSHException, OSError)):
        lab.connect_ssh(host, timeout=5).close()
    lab.fault(host, "host-up")
    # same port, same pinned host key, same VM state
    client = lab.connect_ssh(host, password=True)
    try:
        _, out, _ = client.exec_command(f"vim-cmd vmsvc/power.getstate {vmid}")
        assert "Powered on" in out.read().decode()
    finally:
        client.close()
    si = lab.connect_api(host)
    try:
        assert find_vm(si, "app201").runtime.powerState == "poweredOn"
    finally:
        lab.disconnect(si)
