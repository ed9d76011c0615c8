"""The backup engine against the lab: full and incremental backups on the free (digest) and licensed
(CBT) hosts, with the guest writing between and during runs; restored disks compared by SHA-256 with
the frozen (snapshot-time) content; hostile names; failures leave no snapshot and no point."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from esxisim.handle import LabHandle
from reconciler import cli
from reconciler.config import load_config
from reconciler.config.model import DesiredState
from reconciler.esxi.hostdigest import ALGORITHMS, request
from reconciler.esxi.signals import sigterm_raises
from reconciler.facts.inventory import BackupSnapshot, FrozenDisk
from reconciler.facts.points import RestorePoint
from reconciler.operations.backup import BackupOptions, VmResult, backup_policy
from reconciler.operations.hosts import connect
from reconciler.operations.ports import BackupHost
from reconciler.operations.repositories import open_repository
from reconciler.operations.restore import disk_content
from reconciler.operations.vmlock import vm_lock
from reconciler.planning.backup_mode import CBT_SINCE_PREVIOUS, DIGEST_SINCE_PREVIOUS, FIRST_BACKUP
from reconciler.repository import KdfParams, Repository
from tests.integration.labconfig import PASSPHRASE, policy_yaml, write_lab_config

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

HOSTILE = 'ファイル鯖 "q" $(x)'


def lab_policies(lab: LabHandle) -> str:
    return (
        policy_yaml("free-web", lab.free, ["web01"])
        + policy_yaml("free-digest", lab.free, ["web01"])  # only the first test's: its first run is full
        + policy_yaml("free-blake", lab.free, ["web01"])  # only the BLAKE2b chain test's
        + policy_yaml("free-odd", lab.free, ["db 01", HOSTILE])
        + policy_yaml("lic", lab.licensed, ["app203"])
    )


@dataclass
class Env:
    lab: LabHandle
    config: Path
    desired: DesiredState
    repo: Repository


@pytest.fixture(scope="module")
def env(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("backup")
    cfg = write_lab_config(lab, root, lab_policies(lab))
    Repository.init(root / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
    desired = load_config(cfg)
    return Env(lab, cfg, desired, open_repository(desired.repository("r")))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Capture:
    """Test hooks: the frozen content per (VM, disk key) read from the real file under our snapshot,
    optional guest writes while the disks are read."""

    lab: LabHandle
    host: str
    frozen: dict[tuple[str, int], str] = field(default_factory=dict)
    write_during: dict[str, int] = field(default_factory=dict)
    """VM name -> seed: a thread writes into the guest while its disks are read."""
    written_during: list[dict[str, Any]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)

    def on_snapshot(self, host: BackupHost, bs: BackupSnapshot) -> None:
        self.snapshots.append(bs.snapshot.name)
        for disk in bs.disks:
            self.frozen[(bs.vm.name, disk.key)] = sha(
                self.lab.local_path(self.host, disk.data_file).read_bytes()
            )
        seed = self.write_during.get(bs.vm.name)
        if seed is not None:

            def write() -> None:
                for i in range(3):
                    self.written_during.append(
                        self.lab.client(self.host).guest_write(bs.vm.name, 1, seed + i)
                    )

            thread = threading.Thread(target=write)
            thread.start()
            self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join()


def run(
    env: Env,
    policy: str,
    capture: Capture,
    *,
    vm: str | None = None,
    full: bool = False,
    on_data: Callable[[FrozenDisk, int, int], None] | None = None,
    digest_algorithm: str | None = None,
) -> list[VmResult]:
    options = BackupOptions(
        full=full,
        workers=2,
        on_snapshot=capture.on_snapshot,
        on_data=on_data,
        digest_algorithm=digest_algorithm,
    )
    try:
        return backup_policy(env.desired, policy, vm=vm, options=options)
    finally:
        capture.join()


def check_restores(env: Env, results: list[VmResult], capture: Capture) -> list[RestorePoint]:
    points = []
    for res in results:
        assert res.ok, res.error
        assert res.point_id is not None
        point = env.repo.read_point(res.point_id)
        assert point.status == "success" and point.vm.name == res.vm
        for disk in point.disks:
            assert sha(disk_content(env.repo, point, disk.key)) == capture.frozen[(res.vm, disk.key)], (
                res.vm,
                disk.key,
            )
        names = {f.name for f in point.files}
        assert any(n.endswith(".vmx") for n in names) and any(n.endswith(".vmdk") for n in names)
        points.append(point)
    return points


def no_snapshots(lab: LabHandle, host: str) -> None:
    for vm in lab.client(host).state()["vms"]:
        assert not vm.get("snapshots"), (vm["name"], vm.get("snapshots"))


def written_bytes(answers: list[dict[str, Any]]) -> int:
    """Bytes of disk covered by the guest writes (overlaps counted once)."""
    total = 0
    for key in {d["key"] for a in answers for d in a["disks"]}:
        extents = sorted(
            (o, n) for a in answers for d in a["disks"] if d["key"] == key for o, n in d["written"]
        )
        end = 0
        for off, length in extents:
            total += max(0, off + length - max(off, end))
            end = max(end, off + length)
    return total


# -- free host: digest compare ------------------------------------------------------------------------


def test_free_host_full_then_digest_incrementals_with_guest_writes(env: Env) -> None:
    lab = env.lab
    cap = Capture(lab, lab.free)
    (first,) = run(env, "free-digest", cap)
    (p1,) = check_restores(env, [first], cap)
    assert first.mode == "full" and FIRST_BACKUP in (p1.fallback_reason or "")
    assert all(d.mode == "full" and d.reasons == (FIRST_BACKUP,) for d in p1.disks)
    assert all(d.digest_map for d in p1.disks)  # so the next run can be incremental
    assert first.bytes_sent < sum(d.capacity for d in p1.disks)  # holes and zero blocks are not sent
    no_snapshots(lab, lab.free)

    between = [lab.client(lab.free).guest_write("web01", 2, seed=101)]
    cap = Capture(lab, lab.free, write_during={"web01": 200})
    (second,) = run(env, "free-digest", cap)
    (p2,) = check_restores(env, [second], cap)
    assert cap.written_during and all(a["bytes"] > 0 for a in cap.written_during)
    assert second.mode == "digest" and p2.fallback_reason is None
    assert all(d.mode == "digest" and d.reasons == (DIGEST_SINCE_PREVIOUS,) for d in p2.disks)
    changed = written_bytes(between)
    prev_maps = [env.repo.read_digest_map(d.digest_map) for d in p1.disks if d.digest_map]
    overhead = sum(len(request(m.digests, m.algorithm)) + 4096 for m in prev_maps)
    assert second.bytes_sent <= 2 * changed + overhead, (second.bytes_sent, changed, overhead)
    no_snapshots(lab, lab.free)

    # the writes made during the second run are in the third
    during = cap.written_during
    cap = Capture(lab, lab.free)
    (third,) = run(env, "free-digest", cap)
    (p3,) = check_restores(env, [third], cap)
    assert third.mode == "digest"
    assert third.bytes_sent <= 2 * written_bytes(during) + overhead, (third.bytes_sent, written_bytes(during))
    dm = env.repo.read_digest_map(p3.disks[0].digest_map or "")
    assert dm.algorithm in ALGORITHMS and dm.block_size == 65536  # the one the host computes faster
    assert dm.algorithm == prev_maps[0].algorithm  # a chain keeps the algorithm of its first map
    no_snapshots(lab, lab.free)


def test_a_chain_started_under_blake2b_continues_after_hosts_choose(env: Env) -> None:
    """Maps written before hosts chose their algorithm are BLAKE2b-128 (made here by asking for it): the
    next incrementals continue that chain whatever the host would choose, find the changed blocks and
    restore identical disks."""
    lab = env.lab
    cap = Capture(lab, lab.free)
    (first,) = run(env, "free-blake", cap, digest_algorithm="blake2b-128")
    (p1,) = check_restores(env, [first], cap)
    maps = [env.repo.read_digest_map(d.digest_map or "") for d in p1.disks]
    assert first.mode == "full" and maps and all(m.algorithm == "blake2b-128" for m in maps)

    between = [lab.client(lab.free).guest_write("web01", 2, seed=701)]
    cap = Capture(lab, lab.free)
    (second,) = run(env, "free-blake", cap)  # the host's choice is not asked: the chain has one
    (p2,) = check_restores(env, [second], cap)
    assert second.mode == "digest" and all(d.mode == "digest" for d in p2.disks)
    assert (
        0
        < second.bytes_sent
        <= 2 * written_bytes(between) + sum(len(request(m.digests, m.algorithm)) + 4096 for m in maps)
    )
    assert all(env.repo.read_digest_map(d.digest_map or "").algorithm == "blake2b-128" for d in p2.disks)

    cap = Capture(lab, lab.free)  # and nothing changed: nothing but the program and the map crosses
    (third,) = run(env, "free-blake", cap)
    (p3,) = check_restores(env, [third], cap)
    assert third.mode == "digest" and [d.bytes_stored for d in p3.disks] == [0] * len(p3.disks)
    no_snapshots(lab, lab.free)


# -- licensed host: CBT ------------------------------------------------------------------------------


def test_licensed_host_full_then_cbt_incremental_and_reset_fallback(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = env.lab
    with connect(env.desired.host(lab.licensed)) as host:
        host.set_cbt(host.find_vm("app203"), True)
        try:
            cap = Capture(lab, lab.licensed)
            (first,) = run(env, "lic", cap)
            (p1,) = check_restores(env, [first], cap)
            assert first.mode == "full" and all(d.change_id for d in p1.disks)
            assert [(d.mode, d.reasons) for d in p1.disks] == [("full", (FIRST_BACKUP,))] * len(p1.disks)
            assert first.bytes_sent < sum(d.capacity for d in p1.disks)  # only the allocated areas ("*")

            between = [lab.client(lab.licensed).guest_write("app203", 3, seed=301)]
            cap = Capture(lab, lab.licensed, write_during={"app203": 310})
            (second,) = run(env, "lic", cap)
            (p2,) = check_restores(env, [second], cap)
            assert cap.written_during
            assert second.mode == "cbt" and p2.fallback_reason is None
            assert [(d.mode, d.reasons) for d in p2.disks] == [("cbt", (CBT_SINCE_PREVIOUS,))] * len(p2.disks)
            changed = written_bytes(between)
            assert changed <= second.bytes_sent <= 2 * changed, (second.bytes_sent, changed)

            cap2 = Capture(lab, lab.licensed)
            (third,) = run(env, "lic", cap2)
            check_restores(env, [third], cap2)
            assert third.mode == "cbt" and third.bytes_sent == written_bytes(cap.written_during)

            lab.fault(lab.licensed, "cbt-reset", vm="app203")
            cap = Capture(lab, lab.licensed)
            (fourth,) = run(env, "lic", cap)
            (p4,) = check_restores(env, [fourth], cap)
            assert fourth.mode == "full" and "change-id-rejected" in (p4.fallback_reason or "")
            # the reason is recorded per disk, and `points` shows it (under the point, and in JSON)
            reset = "CBT was reset since the previous point (change-id-rejected)"
            assert all(d.mode == "full" and d.reasons[0] == reset for d in p4.disks), p4.disks
            capsys.readouterr()  # what the backups logged
            points = ["--config", str(env.config), "--log-level", "error", "points", "--vm", "app203"]
            assert cli.main([*points, "--json"]) == 0
            rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
            assert [d["reasons"][0] for d in rows[p4.id]["disks"]] == [reset] * len(p4.disks)
            assert [d["mode"] for d in rows[p2.id]["disks"]] == ["cbt"] * len(p2.disks)
            assert cli.main(points) == 0
            table = capsys.readouterr().out.splitlines()
            under = table[next(i for i, line in enumerate(table) if line.startswith(p4.id)) + 1]
            assert under.startswith(f"    {', '.join(d.label for d in p4.disks)}: full: {reset}"), table
            under = table[next(i for i, line in enumerate(table) if line.startswith(p1.id)) + 1]
            assert under == f"    {', '.join(d.label for d in p1.disks)}: full: {FIRST_BACKUP}", table
            no_snapshots(lab, lab.licensed)
        finally:
            host.set_cbt(host.find_vm("app203"), False)


# -- hostile names, concurrency, CLI -------------------------------------------------------------------


def test_hostile_names_concurrently_and_the_cli(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    lab = env.lab
    before = len(_points_of(env, HOSTILE))
    cap = Capture(lab, lab.free)
    results = run(env, "free-odd", cap)
    assert [r.vm for r in results] == ["db 01", HOSTILE]
    check_restores(env, results, cap)
    no_snapshots(lab, lab.free)

    lab.client(lab.free).guest_write(HOSTILE, 1, seed=401)
    code = cli.main(
        ["--config", str(env.config), "--log-level", "warning", "backup", "free-odd", "--vm", HOSTILE]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{HOSTILE}: ok digest read" in out and "1 of 1 VMs backed up" in out

    code = cli.main(["--config", str(env.config), "--log-level", "warning", "backup", "free-odd", "--full"])
    out = capsys.readouterr().out
    assert code == 0 and out.count(": ok full read") == 2, out

    assert cli.main(["--config", str(env.config), "points", "--vm", HOSTILE, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    first = results[1].mode  # full unless an earlier test of the module backed the VM up already
    assert [r["mode"] for r in rows][-3:] == [first, "digest", "full"] and len(rows) == before + 3
    assert all(r["vm"] == HOSTILE and r["status"] == "success" and r["policy"] == "free-odd" for r in rows)
    assert cli.main(["--config", str(env.config), "points"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("ID") and HOSTILE in table and "db 01" in table

    code = cli.main(
        ["--config", str(env.config), "--log-level", "error", "backup", "free-odd", "--vm", "nope"]
    )
    assert code == 64
    no_snapshots(lab, lab.free)


# -- failures ---------------------------------------------------------------------------------------


def _points_of(env: Env, vm: str) -> list[str]:
    return [p.id for p in env.repo.list_points(vm=vm)]


def test_exception_mid_transfer_leaves_no_snapshot_and_no_point(env: Env) -> None:
    lab = env.lab
    cap = Capture(lab, lab.free)
    run(env, "free-odd", cap, vm="db 01")  # a previous point, so the next runs are incremental
    lab.client(lab.free).guest_write("db 01", 5, seed=501)
    before = _points_of(env, "db 01")
    calls: list[int] = []

    def boom(disk: FrozenDisk, offset: int, length: int) -> None:
        calls.append(offset)
        if len(calls) == 3:
            raise RuntimeError("boom mid-transfer")

    (res,) = run(env, "free-odd", Capture(lab, lab.free), vm="db 01", on_data=boom)
    assert not res.ok and "boom mid-transfer" in (res.error or "")
    assert _points_of(env, "db 01") == before
    no_snapshots(lab, lab.free)

    cap = Capture(lab, lab.free)
    (res,) = run(env, "free-odd", cap, vm="db 01")
    check_restores(env, [res], cap)
    assert res.mode == "digest"


def test_dropped_ssh_connection_leaves_no_snapshot_and_no_point(env: Env) -> None:
    lab = env.lab
    # a previous point, so the next run is incremental: its digests and data come over SSH (a full read
    # of a free host's disk takes HTTPS, and a dropped SSH connection does not stop it)
    run(env, "free-web", Capture(lab, lab.free))
    lab.client(lab.free).guest_write("web01", 20, seed=601)  # enough changed data to be mid-stream
    before = _points_of(env, "web01")
    dropped: list[int] = []

    def drop(disk: FrozenDisk, offset: int, length: int) -> None:
        if not dropped:
            dropped.append(offset)
            lab.fault(lab.free, "ssh-drop")

    try:
        (res,) = run(env, "free-web", Capture(lab, lab.free), on_data=drop)
    finally:
        lab.clear_faults()
    assert dropped and not res.ok, res
    assert _points_of(env, "web01") == before
    no_snapshots(lab, lab.free)

    cap = Capture(lab, lab.free)
    (res,) = run(env, "free-web", cap)
    check_restores(env, [res], cap)
    no_snapshots(lab, lab.free)


def test_foreign_snapshot_is_refused_with_the_reason(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    lab = env.lab
    vmid = lab.vm(lab.free, "db 01")["vmid"]
    assert lab.vimcmd(lab.free, "vmsvc/snapshot.create", vmid, "admin-snap", "by hand", "0", "0").exit == 0
    try:
        before = _points_of(env, "db 01")
        (res,) = run(env, "free-odd", Capture(lab, lab.free), vm="db 01")
        assert not res.ok and "not ours" in (res.error or "") and "admin-snap" in (res.error or "")
        code = cli.main(["--config", str(env.config), "--log-level", "error", "backup", "free-odd"])
        out = capsys.readouterr().out
        assert code == 1 and "db 01: FAILED" in out and f"{HOSTILE}: ok" in out and "1 of 2 VMs" in out, out
        assert _points_of(env, "db 01") == before
    finally:
        assert lab.vimcmd(lab.free, "vmsvc/snapshot.removeall", vmid).exit == 0
    no_snapshots(lab, lab.free)


def test_sigterm_mid_transfer_removes_the_snapshot(env: Env) -> None:
    lab = env.lab
    lab.client(lab.free).guest_write("web01", 5, seed=701)
    before = _points_of(env, "web01")
    sent: list[int] = []
    cancel = threading.Event()

    def term(disk: FrozenDisk, offset: int, length: int) -> None:
        if not sent:
            sent.append(offset)
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread, which waits for the VMs
            # go on only once the main thread has cancelled the run, however quickly the read could end
            assert cancel.wait(60), "SIGTERM never cancelled the run"

    options = BackupOptions(on_data=term)
    with pytest.raises(SystemExit) as exc, sigterm_raises():
        backup_policy(env.desired, "free-web", options=options, cancel=cancel)
    assert exc.value.code == 143 and sent
    assert _points_of(env, "web01") == before
    no_snapshots(lab, lab.free)


def test_datastore_free_space_floor_refuses_the_vm(env: Env) -> None:
    host = env.desired.host(env.lab.free)
    strict = replace(host, limits=replace(host.limits, min_datastore_free_percent=100.0))
    desired = DesiredState.build(
        [strict, *(h for h in env.desired.hosts.values() if h.name != host.name)],
        env.desired.repositories.values(),
        env.desired.policies.values(),
        env.desired.verify_policies.values(),
        env.desired.revision,
    )
    before = _points_of(env, "web01")
    (res,) = backup_policy(desired, "free-web")
    assert (
        not res.ok
        and "datastore datastore1" in (res.error or "")
        and "no snapshot taken" in (res.error or "")
    )
    assert _points_of(env, "web01") == before
    no_snapshots(env.lab, env.lab.free)


_KILLED_RUN = """
import pathlib, sys, time
from reconciler.config import load_config
from reconciler.operations.backup import BackupOptions, backup_policy

marker = pathlib.Path(sys.argv[2])

def hang(disk, offset, length):
    marker.write_text("reading")
    time.sleep(600)

backup_policy(load_config(sys.argv[1]), "free-web", options=BackupOptions(on_data=hang))
"""


def test_sigkill_mid_transfer_then_the_next_run_removes_the_orphan(env: Env, tmp_path: Path) -> None:
    lab = env.lab
    lab.client(lab.free).guest_write("web01", 3, seed=801)
    before = _points_of(env, "web01")
    marker = tmp_path / "reading"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, str(env.config), str(marker)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run never started reading"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    (vm,) = [v for v in lab.client(lab.free).state()["vms"] if v["name"] == "web01"]
    assert [s["name"][:16] for s in vm["snapshots"]] == ["esxi-reconciler-"]  # the orphan

    # another run of the same VM (in this process) is refused while one holds the VM
    api = lab.host(lab.free)["api"]
    with vm_lock(f"{api['host']}:{api['port']}", lab.vm(lab.free, "web01")["vmid"]):
        (busy,) = run(env, "free-web", Capture(lab, lab.free))
    assert not busy.ok and "being backed up by another run" in (busy.error or "")

    cap = Capture(lab, lab.free)
    (res,) = run(env, "free-web", cap)
    (point,) = check_restores(env, [res], cap)
    assert _points_of(env, "web01") == [*before, point.id]  # nothing of the killed run is listed
    no_snapshots(lab, lab.free)
