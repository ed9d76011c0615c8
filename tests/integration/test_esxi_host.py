"""reconciler.esxi against the lab: inventory, pinning, snapshots, frozen-disk reads, CBT, digests."""

from __future__ import annotations

import base64
import hashlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from esxisim import procs
from esxisim.handle import LabHandle
from reconciler.config.model import ApiEndpoint, Credentials, Host, Source, SshEndpoint
from reconciler.config.secrets import Secret
from reconciler.esxi.api import ApiSession
from reconciler.esxi.errors import (
    EsxiError,
    ForeignSnapshotError,
    FullBackupNeededError,
    InsufficientSpaceError,
    NotPinnedError,
    PinMismatchError,
    SnapshotError,
    SnapshotTimeoutError,
)
from reconciler.esxi.host import EsxiHost
from reconciler.esxi.hostdigest import BLOCK_SIZE
from reconciler.esxi.shell import ShellConnection, SshTarget
from reconciler.esxi.tls import pinned_context
from reconciler.esxi.transport import HttpsRangeReader, SshDdReader
from reconciler.facts.inventory import BackupSnapshot, FrozenDisk, HostLimits, License
from reconciler.operations.hosts import connect

pytestmark = pytest.mark.lab
MiB = 1 << 20

FREE_VMS = ["web01", "db 01", 'ファイル鯖 "q" $(x)']
LIMITS = HostLimits(2, 1, 0, 0.0)


def host_config(lab: LabHandle, name: str, **changes: Any) -> Host:
    info = lab.host(name)
    api = ApiEndpoint(info["api"]["port"], info["api"]["thumbprint_sha256"], False)
    ssh = SshEndpoint(
        True,
        info["ssh"]["port"],
        info["ssh"]["user"],
        info["ssh"]["host_key_fingerprint"],
        Secret("file", info["ssh"]["private_key"]),
        False,
    )
    fields: dict[str, Any] = {
        "name": name,
        "address": info["api"]["host"],
        "license": License.AUTO,
        "credentials": Credentials("root", Secret("file", info["ssh"]["password_file"])),
        "api": api,
        "ssh": ssh,
        "limits": LIMITS,
        "source": Source("lab", 1),
    }
    fields.update(changes)
    return Host(**fields)


@pytest.fixture
def free(lab: LabHandle) -> Iterator[EsxiHost]:
    with connect(host_config(lab, lab.free)) as host:
        yield host


@pytest.fixture
def licensed(lab: LabHandle) -> Iterator[EsxiHost]:
    with connect(host_config(lab, lab.licensed)) as host:
        yield host


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_all(host: EsxiHost, disk: FrozenDisk, transport: str) -> bytes:
    reader = host.disk_reader(transport, streams=3)
    try:
        out = bytearray()
        for off, data in reader.read(disk.data_file, [(0, disk.capacity)]):
            assert off == len(out)
            out += data
        return bytes(out)
    finally:
        reader.close()


def vm_dir_files(lab: LabHandle, host: str, vm: str) -> set[str]:
    return {p.name for p in lab.local_path(host, f"[datastore1] {vm}").iterdir()}


# -- inventory and pinning ----------------------------------------------------------------------


def test_inventory_of_both_hosts(lab: LabHandle, free: EsxiHost, licensed: EsxiHost) -> None:
    assert free.license == "free" and licensed.license == "licensed"
    for host, name in ((free, lab.free), (licensed, lab.licensed)):
        vms = {vm.name: vm for vm in host.list_vms()}
        expected = lab.host(name)["vms"]
        assert sorted(vms) == sorted(v["name"] for v in expected)
        for entry in expected:
            vm = vms[entry["name"]]
            assert vm.vmid == entry["vmid"] and vm.vmx_path == entry["vmx"] and vm.datastore == "datastore1"
            assert vm.power_state == "poweredOn" and vm.snapshots == () and vm.uuid
            assert [(d.key, d.file, d.capacity) for d in vm.disks] == [
                (d["key"], d["file"], d["size"]) for d in entry["disks"]
            ]
            assert [d.node for d in vm.disks] == ["scsi0:0", "scsi0:1"]
            assert all(d.chain == (d.file,) for d in vm.disks)
            assert host.vm(vm.vmid) == vm == host.find_vm(vm.name)
        (ds,) = host.datastores()
        assert ds.name == "datastore1" and ds.capacity == lab.host(name)["datastores"][0]["capacity"]
        assert 0 < ds.free <= ds.capacity
    assert sorted(vm.name for vm in free.list_vms()) == sorted(FREE_VMS)
    vmx = free.read_vmx(free.find_vm('ファイル鯖 "q" $(x)'))
    assert vmx.get("displayName") == 'ファイル鯖 "q" $(x)'
    assert [d.file_name for d in vmx.disks()] == ['ファイル鯖 "q" $(x).vmdk', 'ファイル鯖 "q" $(x)_1.vmdk']
    # the configured licence wins over detection
    with connect(host_config(lab, lab.free, license=License.LICENSED)) as forced:
        assert forced.license == "licensed"


def test_api_pin_mismatch_and_unpinned_are_refused(lab: LabHandle, caplog: pytest.LogCaptureFixture) -> None:
    free, other = lab.host(lab.free)["api"], lab.host(lab.licensed)["api"]
    pw = lab.password(lab.free)
    for pin in (other["thumbprint_sha256"], other["thumbprint_sha1"]):
        session = ApiSession(free["host"], free["port"], "root", lambda: pw, pin)
        with pytest.raises(PinMismatchError):
            _ = session.si
    with pytest.raises(NotPinnedError):
        _ = ApiSession(free["host"], free["port"], "root", lambda: pw, None).si
    for pin in (free["thumbprint_sha1"], free["thumbprint_sha256"].replace(":", "").lower()):
        ok = ApiSession(free["host"], free["port"], "root", lambda: pw, pin)
        assert ok.content.about.apiType == "HostAgent"
        ok.close()
    with caplog.at_level(logging.WARNING, logger="reconciler.esxi"):
        insecure = ApiSession(free["host"], free["port"], "root", lambda: pw, None, insecure=True)
        assert insecure.alive() is False and insecure.content.about.apiType == "HostAgent"
        insecure.close()
    assert "INSECURE" in caplog.text


def test_api_session_is_reused_and_reestablished(lab: LabHandle, free: EsxiHost) -> None:
    si = free.api.si
    assert free.list_vms() and free.api.si is si
    free.api.content.sessionManager.Logout()  # the host forgets the session
    assert not free.api.alive()
    assert len(free.list_vms()) == 3  # logs in again by itself
    assert free.api.alive() and free.api.si is not si


def _host_key_fingerprint(pub: Path) -> str:
    blob = base64.b64decode(pub.read_text().split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def test_ssh_pinning_and_logins(lab: LabHandle, caplog: pytest.LogCaptureFixture) -> None:
    info, other = lab.host(lab.free)["ssh"], lab.host(lab.licensed)["ssh"]
    pw = lab.password(lab.free)
    key = Path(info["private_key"]).read_text()

    def target(pin: str | None, **kw: Any) -> SshTarget:
        return SshTarget(info["host"], info["port"], "root", pin, **{"private_key": lambda: key, **kw})

    with pytest.raises(PinMismatchError):
        ShellConnection(target(other["host_key_fingerprint"]))
    with pytest.raises(NotPinnedError):
        ShellConnection(target(None))
    # the pinned RSA key is found although paramiko prefers the ECDSA one
    rsa_pin = _host_key_fingerprint(Path(info["known_hosts"]).parent / "ssh_host_rsa_key.pub")
    conn = ShellConnection(target(rsa_pin))
    assert conn.transport.get_remote_server_key().get_name() == "ssh-rsa"
    conn.close()
    # password login (keyboard-interactive fallback), no key
    conn = ShellConnection(target(info["host_key_fingerprint"], private_key=None, password=lambda: pw))
    assert conn.run(["echo", "ok"]).text == "ok\n"
    conn.close()
    with caplog.at_level(logging.WARNING, logger="reconciler.esxi"):
        conn = ShellConnection(target(None, insecure_skip_host_key_check=True))
        conn.close()
    assert "INSECURE" in caplog.text


def test_shell_quotes_hostile_arguments(free: EsxiHost) -> None:
    shell = free.shell
    assert shell is not None
    for arg in [*FREE_VMS, "it's `id` $HOME ; echo pwned", "*", "-n", "日本語 \\ | & > <", "", "a\nb\n; id"]:
        res = shell.run(["printf", "%s", arg])
        assert res.stdout.decode() == arg
    with pytest.raises(ValueError):
        shell.run(["echo", "a\x00b"])
    res = shell.run(["sh", "-c", "exit 3"], check=False)
    assert res.exit_status == 3


def test_ssh_reconnects_after_a_drop(lab_faults: LabHandle, free: EsxiHost) -> None:
    shell = free.shell
    assert shell is not None
    assert shell.run(["echo", "1"]).text == "1\n"
    lab_faults.fault(lab_faults.free, "ssh-drop")
    assert shell.run(["echo", "2"]).text == "2\n"


def test_ssh_reconnects_when_the_caller_sees_the_drop_first(lab: LabHandle, free: EsxiHost) -> None:
    """A dropped connection can fail the caller (a write to the dead socket) before paramiko's transport
    thread has marked it inactive: the command still runs again on a new connection, not fails."""
    shell = free.shell
    assert shell is not None
    assert shell.run(["echo", "1"]).text == "1\n"
    conn = shell.connection()
    # The host's session processes are frozen for a second: our transport thread hears of the end of
    # the connection only then, while our next write fails at once (its sending half is shut).
    sshd = lab.lab.host(lab.free).sshd
    listener = int(sshd.pid_file.read_text())
    ns = sshd.ns_file.read_text().strip()
    sessions = [p for p in procs.pids_in_ns(ns, sshd.is_member) if p != listener]
    procs.signal_pids(sessions, signal.SIGSTOP)
    thaw = threading.Timer(1.0, procs.signal_pids, (sessions, signal.SIGCONT))
    try:
        thaw.start()
        conn.transport.sock.shutdown(socket.SHUT_WR)
        assert shell.run(["echo", "2"]).text == "2\n"
        assert shell.connection() is not conn
    finally:
        thaw.join()
        procs.signal_pids(sessions, signal.SIGCONT)


# -- backup snapshots ---------------------------------------------------------------------------


@pytest.mark.parametrize(("which", "vm_name"), [("free", 'ファイル鯖 "q" $(x)'), ("licensed", "app203")])
def test_backup_snapshot_reads_the_frozen_disk_while_the_guest_writes(
    lab: LabHandle, free: EsxiHost, licensed: EsxiHost, which: str, vm_name: str
) -> None:
    host, host_name = (free, lab.free) if which == "free" else (licensed, lab.licensed)
    vm = host.find_vm(vm_name)
    before_files = vm_dir_files(lab, host_name, vm_name)
    base = {d.key: lab.local_path(host_name, d.file.removesuffix(".vmdk") + "-flat.vmdk") for d in vm.disks}
    base_sha = {key: sha256(path.read_bytes()) for key, path in base.items()}
    with host.backup_snapshot(vm) as bs:
        assert isinstance(bs, BackupSnapshot)
        assert bs.snapshot.name.startswith("esxi-reconciler-")
        assert [s.id for s in host.vm(vm).snapshots] == [bs.snapshot.id]
        written = lab.client(host_name).guest_write(vm_name, 10, seed=31)
        assert written["bytes"] > 0
        assert [d.key for d in bs.disks] == [2000, 2001]
        for disk in bs.disks:
            assert disk.data_file == disk.descriptor.removesuffix(".vmdk") + "-flat.vmdk"
            assert disk.descriptor == next(d.file for d in vm.disks if d.key == disk.key)
            for transport in ("https", "ssh"):
                assert sha256(read_all(host, disk, transport)) == base_sha[disk.key], transport
    after = host.vm(vm)
    assert after.snapshots == ()
    assert [d.chain for d in after.disks] == [d.chain for d in vm.disks]
    assert vm_dir_files(lab, host_name, vm_name) == before_files  # no delta, no .vmsn left
    # the writes made under the snapshot were merged into the base
    assert any(sha256(path.read_bytes()) != base_sha[key] for key, path in base.items())


def test_exceptions_inside_still_remove_the_snapshot(free: EsxiHost, licensed: EsxiHost) -> None:
    for host, name in ((free, "db 01"), (licensed, "app201")):
        vm = host.find_vm(name)
        with pytest.raises(RuntimeError, match="boom"), host.backup_snapshot(vm):
            raise RuntimeError("boom")
        assert host.vm(vm).snapshots == ()
        with pytest.raises(KeyboardInterrupt), host.backup_snapshot(vm):
            raise KeyboardInterrupt
        assert host.vm(vm).snapshots == ()


def test_free_space_floor_refuses_the_snapshot(lab: LabHandle) -> None:
    cfg = host_config(lab, lab.free, limits=HostLimits(2, 1, 0, 100.0))
    with connect(cfg) as host:
        with pytest.raises(InsufficientSpaceError), host.backup_snapshot(host.find_vm("web01")):
            pass
        assert host.find_vm("web01").snapshots == ()


def test_orphans_and_foreign_snapshots(lab: LabHandle, free: EsxiHost, licensed: EsxiHost) -> None:
    for host, host_name, vm_name in ((free, lab.free, "web01"), (licensed, lab.licensed, "app202")):
        vm = host.find_vm(vm_name)
        # a run killed after its snapshot: ours, left behind
        orphan = host.create_snapshot(vm, "esxi-reconciler-20200101T000000Z-dead", description="killed run")
        assert host.is_ours(orphan)
        with pytest.raises(ForeignSnapshotError, match="earlier run"), host.backup_snapshot(vm):
            pass
        host.remove_snapshot(vm, orphan.id)  # what the next backup of the VM does, under its lock
        assert host.vm(vm).snapshots == ()
        # a user's snapshot: never touched
        res = lab.vimcmd(host_name, "vmsvc/snapshot.create", vm.vmid, "user's 'nightly'", "", "0", "0")
        assert res.exit == 0, res
        try:
            (user,) = host.vm(vm).snapshots
            assert user.name == "user's 'nightly'" and not host.is_ours(user)
            with pytest.raises(ForeignSnapshotError, match="nightly"), host.backup_snapshot(vm):
                pass
            with pytest.raises(SnapshotError, match="not ours"):
                host.remove_snapshot(vm, user.id)
            assert [s.id for s in host.vm(vm).snapshots] == [user.id]
        finally:
            lab.vimcmd(host_name, "vmsvc/snapshot.remove", vm.vmid, user.id)
        assert host.vm(vm).snapshots == ()


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, length in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][0] + out[-1][1], off + length) - start)
        else:
            out.append((off, length))
    return out


def test_cbt_changed_areas_are_exactly_the_guest_writes(lab: LabHandle, licensed: EsxiHost) -> None:
    vm_name = "app202"
    vm = licensed.find_vm(vm_name)
    assert not vm.cbt_enabled
    licensed.set_cbt(vm, True)  # ReconfigVM + stun cycle (the VM runs)
    try:
        vm = licensed.find_vm(vm_name)
        assert vm.cbt_enabled and vm.snapshots == ()
        with licensed.backup_snapshot(vm) as first:
            ids = {d.key: d.change_id for d in first.disks}
            assert all(ids.values())
            for disk in first.disks:
                allocated = _coalesce(licensed.changed_areas(vm, first.snapshot, disk, "*"))
                assert allocated and sum(n for _, n in allocated) <= disk.capacity
        written = lab.client(lab.licensed).guest_write(vm_name, 3, seed=41)
        with licensed.backup_snapshot(vm) as second:
            for disk in second.disks:
                got = licensed.changed_areas(vm, second.snapshot, disk, ids[disk.key])
                (w,) = [d for d in written["disks"] if d["key"] == disk.key]
                assert _coalesce(got) == _coalesce([(o, n) for o, n in w["written"]])
                assert disk.change_id != ids[disk.key]
            with pytest.raises(FullBackupNeededError) as err:
                licensed.changed_areas(vm, second.snapshot, second.disks[0], None)
            assert err.value.reason == "no-change-id"
            lab.fault(lab.licensed, "cbt-reset", vm=vm_name)
            with pytest.raises(FullBackupNeededError) as err:
                licensed.changed_areas(vm, second.snapshot, second.disks[0], ids[2000])
            assert err.value.reason == "change-id-rejected"
    finally:
        licensed.set_cbt(licensed.find_vm(vm_name), False)
    assert not licensed.find_vm(vm_name).cbt_enabled


def test_changed_areas_refused_on_free_host(free: EsxiHost) -> None:
    with free.backup_snapshot(free.find_vm("web01")) as bs:
        with pytest.raises(FullBackupNeededError) as err:
            free.changed_areas(bs.vm, bs.snapshot, bs.disks[0], "52 00/1")
        assert err.value.reason == "restricted"


def test_cbt_inactive_means_full(licensed: EsxiHost) -> None:
    with licensed.backup_snapshot(licensed.find_vm("app201")) as bs:
        assert bs.disks[0].change_id is None
        with pytest.raises(FullBackupNeededError) as err:
            licensed.changed_areas(bs.vm, bs.snapshot, bs.disks[0], "*")
        assert err.value.reason == "cbt-inactive"


def test_free_host_cbt_switch_edits_the_vmx_with_the_vm_off(lab: LabHandle, free: EsxiHost) -> None:
    vm = free.find_vm("db 01")
    with pytest.raises(EsxiError, match="must be powered off to switch CBT"):
        free.set_cbt(vm, True)
    assert lab.vimcmd(lab.free, "vmsvc/power.off", vm.vmid).exit == 0
    try:
        free.set_cbt(vm, True)
        vmx = free.read_vmx(vm)
        assert vmx.ctk_enabled and all(vmx.cbt_usable(d.node) for d in vmx.disks())
        assert "db 01.vmx.esxi-reconciler.bak" in vm_dir_files(lab, lab.free, "db 01")
        free.set_cbt(vm, False)
        assert not free.read_vmx(vm).ctk_enabled
    finally:
        assert lab.vimcmd(lab.free, "vmsvc/power.on", vm.vmid).exit == 0
        lab.run(lab.free, "rm -f '/vmfs/volumes/datastore1/db 01/db 01.vmx.esxi-reconciler.bak'")
    assert free.vm(vm).power_state == "poweredOn"


# -- digests on the free host -------------------------------------------------------------------


def test_digest_map_finds_exactly_the_written_blocks(lab: LabHandle, free: EsxiHost) -> None:
    vm_name = "web01"
    maps: dict[int, bytes] = {}
    algorithms: dict[int, str] = {}
    with free.backup_snapshot(free.find_vm(vm_name)) as bs:
        for disk in bs.disks:
            local = lab.local_path(lab.free, disk.data_file).read_bytes()
            got: dict[int, bytes] = {}
            res = free.digest_compare(disk, None, got.__setitem__)
            nonzero = [o for o in range(0, disk.capacity, BLOCK_SIZE) if any(local[o : o + BLOCK_SIZE])]
            assert sorted(got) == nonzero
            assert all(got[o] == local[o : o + BLOCK_SIZE] for o in got)
            assert res.changed_blocks == len(nonzero) and res.used_seek_data
            maps[disk.key] = res.digests
            algorithms[disk.key] = res.algorithm  # the host's choice; the next compare must ask for it
    written = lab.client(lab.free).guest_write(vm_name, 2, seed=51)
    with free.backup_snapshot(free.find_vm(vm_name)) as bs:
        lab.client(lab.free).guest_write(vm_name, 2, seed=52)  # during the backup: not in this point
        for disk in bs.disks:
            (w,) = [d for d in written["disks"] if d["key"] == disk.key]
            touched = sorted(
                {
                    b * BLOCK_SIZE
                    for o, n in w["written"]
                    for b in range(o // BLOCK_SIZE, (o + n - 1) // BLOCK_SIZE + 1)
                }
            )
            local = lab.local_path(lab.free, disk.data_file).read_bytes()
            got = {}
            res = free.digest_compare(disk, maps[disk.key], got.__setitem__, algorithm=algorithms[disk.key])
            assert sorted(got) == touched
            assert all(got[o] == local[o : o + BLOCK_SIZE] for o in got)
            changed_bytes = sum(n for _, n in w["written"])
            wire = res.wire_bytes_in + res.wire_bytes_out
            print(f"disk {disk.key}: guest wrote {changed_bytes}, wire {wire} ({wire / changed_bytes:.2f}x)")
            assert res.wire_bytes_in < len(touched) * (BLOCK_SIZE + 13) + 1024


# -- readers -----------------------------------------------------------------------------------


def test_https_reader_uses_the_api_session_cookie_and_is_pinned(lab: LabHandle) -> None:
    with connect(host_config(lab, lab.free)) as host:
        cookie = host.api.cookie
        assert cookie is not None and cookie.startswith("vmware_soap_session=") and ";" not in cookie
        reader = host.disk_reader("https")
        assert isinstance(reader, HttpsRangeReader)
        try:
            assert reader._headers() == {"Cookie": cookie}
            assert reader.size("[datastore1] web01/web01-flat.vmdk") == 32 * MiB
            assert reader.get_file("[datastore1] web01/web01.vmx").startswith(b'.encoding = "UTF-8"')
            reader._cookie = 'vmware_soap_session="expired"'  # refused: Basic auth takes over
            assert next(reader.read("[datastore1] web01/web01.vmx", [(0, 9)])) == (0, b".encoding")
            assert "Authorization" in reader._headers()
            reader._cookie = 'vmware_soap_session="expired"'
            assert reader.size("[datastore1] web01/web01_1-flat.vmdk") == 16 * MiB
        finally:
            reader.close()
    other = lab.host(lab.licensed)["api"]
    api = lab.host(lab.free)["api"]
    with pytest.raises(PinMismatchError):
        pinned_context(api["host"], api["port"], other["thumbprint_sha256"])


def test_reader_choice(lab: LabHandle) -> None:
    with connect(host_config(lab, lab.free)) as host:
        auto = host.disk_reader()
        ssh = host.disk_reader("ssh")
        try:
            assert isinstance(auto, HttpsRangeReader) and isinstance(ssh, SshDdReader)
        finally:
            auto.close()
            ssh.close()
        with pytest.raises(ValueError):
            host.disk_reader("nfc")


# -- failure paths ------------------------------------------------------------------------------


def test_failed_create_leaves_nothing(lab_faults: LabHandle, free: EsxiHost, licensed: EsxiHost) -> None:
    for host, host_name, name in (
        (free, lab_faults.free, "web01"),
        (licensed, lab_faults.licensed, "app201"),
    ):
        vm = host.find_vm(name)
        lab_faults.fault(host_name, "snapshot-fail", enabled=True)
        with pytest.raises(SnapshotError), host.backup_snapshot(vm):
            pytest.fail("must not get here")
        lab_faults.fault(host_name, "snapshot-fail", enabled=False)
        assert host.vm(vm).snapshots == ()


def test_licensed_config_on_a_free_host_falls_back_to_ssh(lab: LabHandle) -> None:
    with connect(host_config(lab, lab.free, license=License.LICENSED)) as host:
        with host.backup_snapshot(host.find_vm("db 01")) as bs:
            assert host._conn.licence.api_restricted  # the API refused: vim-cmd did it
            assert [s.id for s in host.find_vm("db 01").snapshots] == [bs.snapshot.id]
        assert host.find_vm("db 01").snapshots == ()


CHILD = r"""
import json, sys, time
from pathlib import Path
from reconciler.esxi.api import ApiSession
from reconciler.esxi.host import EsxiHost
from reconciler.esxi.signals import sigterm_raises
from reconciler.esxi.shell import ShellSession, SshTarget

info = json.loads(sys.argv[1])
pw = Path(info["ssh"]["password_file"]).read_text().strip()
key = Path(info["ssh"]["private_key"]).read_text()
a = info["api"]
api = ApiSession(a["host"], a["port"], "root", lambda: pw, a["thumbprint_sha256"])
shell = ShellSession(SshTarget(info["ssh"]["host"], info["ssh"]["port"], "root",
                               info["ssh"]["host_key_fingerprint"], private_key=lambda: key))
host = EsxiHost(api, shell)
with sigterm_raises(), host.backup_snapshot(host.find_vm(sys.argv[2])) as bs:
    print(bs.snapshot.id, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("which", ["free", "licensed"])
def test_sigterm_during_the_backup_removes_the_snapshot(lab: LabHandle, which: str) -> None:
    import json
    import signal
    import subprocess
    import sys

    host_name, vm = (lab.free, "web01") if which == "free" else (lab.licensed, "app203")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(lab.host(host_name)), vm],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert child.stdout is not None
        snap_id = child.stdout.readline().strip()
        assert snap_id.isdigit(), child.stderr.read() if child.stderr else ""
        with connect(host_config(lab, host_name)) as host:
            assert [s.id for s in host.find_vm(vm).snapshots] == [snap_id]
            child.send_signal(signal.SIGTERM)
            assert child.wait(timeout=60) == 128 + signal.SIGTERM
            assert host.find_vm(vm).snapshots == ()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        with connect(host_config(lab, host_name)) as host:
            for left in host.list_vms():  # keep the shared lab clean if the test failed
                for snap in reversed(left.snapshots):
                    if host.is_ours(snap):
                        host.remove_snapshot(left, snap.id)


def test_create_timeout_still_removes_the_late_snapshot(free: EsxiHost) -> None:
    """vim-cmd outlives our timeout on the host: the snapshot appears late and is removed anyway."""
    vm = free.find_vm("web01")
    with pytest.raises(SnapshotTimeoutError), free.backup_snapshot(vm, timeout=0.001):
        pytest.fail("must not get here")
    assert free.vm(vm).snapshots == ()


def test_api_call_survives_a_connection_the_host_closed_while_idle(lab: LabHandle, free: EsxiHost) -> None:
    """Hosts close idle API connections; the next call must go through on a new connection."""

    before = [vm.name for vm in free.list_vms()]
    stub = free.api.si._stub
    assert stub.pool, "expected a pooled API connection after a call"
    for conn, _ in stub.pool:
        conn.sock.shutdown(socket.SHUT_RDWR)  # what the peer closing the idle connection looks like
    assert [vm.name for vm in free.list_vms()] == before


# -- power and registration ---------------------------------------------------------------------


@pytest.mark.parametrize("which", ["free", "licensed"])
def test_power_cycle(lab: LabHandle, which: str) -> None:
    name = lab.free if which == "free" else lab.licensed
    vm_name = "db 01" if which == "free" else "app202"
    with connect(host_config(lab, name)) as host:
        vm = host.find_vm(vm_name)
        assert vm.power_state == "poweredOn"
        assert host.guest_heartbeat(vm) == "green"
        assert host.shutdown_guest(vm, timeout=30).power_state == "poweredOff"
        assert host.guest_heartbeat(vm) == "gray"
        assert host.power_on(vm, timeout=30).power_state == "poweredOn"
        assert host.power_off(vm, timeout=30).power_state == "poweredOff"
        host.power_on(vm, timeout=30)
    # register_vm / unregister_vm (a new vmid) are exercised on restored VMs: test_restore_lab.py
