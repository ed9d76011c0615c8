"""The lab launcher: nothing of a lab survives its stop, not even after a start that failed half-way."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from esxisim import MiB, procs
from esxisim import lab as lab_module
from esxisim import sshd as sshd_module
from esxisim.handle import LabHandle
from esxisim.lab import DatastoreSpec, DiskSpec, HostSpec, Lab, LabError, VMSpec, lab_spec

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]


def lab_processes(state_dir: Path) -> list[str]:
    """Processes with the lab's state dir on their command line (esxisim-host, unshare, nsroot)."""
    return [f"{pid}: {' '.join(procs.cmdline(pid))}" for pid in procs.pids_mentioning(str(state_dir))]


def test_stop_leaves_no_process_mount_or_file(tmp_path: Path) -> None:
    state = tmp_path / "lab"
    spec = lab_spec(hosts=1, vms=1, disk_sizes=(8 * MiB,))
    with Lab(state, spec) as lab:
        assert lab.running()
        info = json.loads((state / "lab.json").read_text())
        assert [h["name"] for h in info["hosts"]] == ["esxi1"]
        ns = (state / "hosts/esxi1/sshd.ns").read_text().strip()
        assert procs.pids_in_ns(ns)
        member = lab.host("esxi1").sshd.is_member
        assert lab_processes(state)
        # the datastore is mounted inside the host's namespace only
        sshd_pid = int((state / "hosts/esxi1/sshd.pid").read_text())
        inside = procs.mounts_under(Path("/vmfs"), Path(f"/proc/{sshd_pid}/mountinfo"))
        uuid = json.loads((state / "hosts/esxi1/volumes.json").read_text())[0]["uuid"]
        assert inside == [f"/vmfs/volumes/{uuid}"]
        assert not procs.mounts_under(state)
        assert not Path("/vmfs").exists()
    assert lab_processes(state) == []
    # (the namespace id itself may already name another lab's new namespace: the kernel reuses ids)
    assert procs.pids_in_ns(ns, member) == []
    assert procs.mounts_under(tmp_path) == []
    assert not state.exists()


def test_two_labs_on_one_machine_never_interfere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lab whose SSH port is taken by another lab's sshd moves to a port of its own; stopping a lab
    whose files name another lab's sshd (a namespace id or pid the kernel reused) leaves that one alone."""
    spec = lab_spec(hosts=1, vms=1, disk_sizes=(8 * MiB,))
    with Lab(tmp_path / "other", spec) as other:
        other_port = other.host_info("esxi1")["ssh"]["port"]
        ports = iter([other_port])  # the first port the new lab is offered is the other lab's
        monkeypatch.setattr(lab_module, "free_port", lambda: next(ports, None) or sshd_module.free_port())
        lab = Lab(tmp_path / "lab", spec)
        try:
            lab.start()
            port = lab.host_info("esxi1")["ssh"]["port"]
            assert port != other_port
            assert procs.listens_on(int(lab.host("esxi1").sshd.pid_file.read_text()), port)
            for each in (lab, other):
                with contextlib.closing(LabHandle(each)) as handle:
                    assert handle.run("esxi1", "vim-cmd vmsvc/getallvms").exit == 0  # pinned host key

            # the lab's sshd dies, and its files now name the other lab's (as after id reuse)
            mine, theirs = lab.host("esxi1").sshd, other.host("esxi1").sshd
            mine.stop()
            mine.ns_file.write_text(theirs.ns_file.read_text())
            mine.pid_file.write_text(theirs.pid_file.read_text())
        finally:
            lab.stop()
        assert other.running() and theirs.listener_alive()
        with contextlib.closing(LabHandle(other)) as handle:
            assert handle.run("esxi1", "echo alive").text == "alive\n"
    assert lab_processes(tmp_path) == []


def test_failed_start_stops_what_was_started(tmp_path: Path) -> None:
    state = tmp_path / "lab"
    good = lab_spec(hosts=1, vms=1, disk_sizes=(8 * MiB,))[0]
    bad = HostSpec(
        name="esxi2",
        vms=(VMSpec(name="broken", datastore="nosuchds", disks=(DiskSpec(size=8 * MiB),)),),
        datastores=(DatastoreSpec(),),
    )
    lab = Lab(state, (good, bad), ready_timeout=30)
    with pytest.raises(LabError):
        lab.start()
    assert lab_processes(state) == []
    assert procs.mounts_under(tmp_path) == []


def test_cli_up_status_down(tmp_path: Path) -> None:
    state = tmp_path / "cli lab"
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "esxisim", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    wrong = cli("up", "--state-dir", str(state), "--esxi-version", "5.5")
    assert wrong.returncode == 2 and "--esxi-version: invalid choice: '5.5'" in wrong.stderr
    up = cli(
        "up",
        "--state-dir",
        str(state),
        "--hosts",
        "1",
        "--vms",
        "1",
        "--disk-sizes",
        "8M",
        "--esxi-version",
        "6.7",
    )
    try:
        assert up.returncode == 0, up.stderr
        assert str(state / "lab.json") in up.stdout
        assert "web01" in up.stdout and "ESXi 6.7" in up.stdout
        fault = cli("fault", "--state-dir", str(state), "--host", "esxi1", "vimcmd-exit-zero")
        assert fault.returncode == 0, fault.stderr
        refused = cli(
            "vim-cmd", "--state-dir", str(state), "--host", "esxi1", "--", "vmsvc/power.getstate", "99"
        )
        assert "   dynamicType = <unset>," in refused.stdout  # the 6.x fault layout
        fault = cli("fault", "--state-dir", str(state), "--host", "esxi1", "vimcmd-exit-zero", "--off")
        assert fault.returncode == 0, fault.stderr
        status = cli("status", "--state-dir", str(state))
        assert status.returncode == 0, status.stdout + status.stderr
        wrote = cli(
            "guest-write", "--state-dir", str(state), "--vm", "web01", "--percent", "1", "--seed", "2"
        )
        assert wrote.returncode == 0, wrote.stderr
        assert json.loads(wrote.stdout)["bytes"] > 0
        fault = cli("fault", "--state-dir", str(state), "--host", "esxi1", "ssh-drop")
        assert fault.returncode == 0, fault.stderr
    finally:
        down = cli("down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    assert lab_processes(state) == []
    assert not state.exists()
