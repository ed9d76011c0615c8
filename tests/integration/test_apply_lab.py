"""The apply executor against the lab: CBT switched by each method (ReconfigVM + stun cycle on the licensed
host, .vmx edit with the VM off and a guest power-cycle on the free host), backups of several VMs, prune
and GC freeing chunks, GC never sweeping under a running backup, and ``apply FILE`` refusing a stale
plan. Every VM is left as found: CBT back to its original state, powered on, no snapshot, no file."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from esxisim.handle import LabHandle, find_vm
from reconciler import cli
from reconciler.config import load_config
from reconciler.config.model import DesiredState
from reconciler.esxi.host import EsxiHost
from reconciler.esxi.signals import sigterm_raises
from reconciler.facts.inventory import BackupSnapshot, FrozenDisk
from reconciler.operations.apply import apply
from reconciler.operations.backup import BackupOptions, backup_policy
from reconciler.operations.hosts import connect
from reconciler.operations.ports import BackupHost
from reconciler.operations.repositories import open_repository
from reconciler.operations.restore import disk_content
from reconciler.operations.retry import RetryPolicy
from reconciler.planning.actions import (
    Action,
    CbtMethod,
    CollectGarbage,
    Outcome,
    Plan,
    PrunePoint,
    RunBackup,
    SetCbt,
)
from reconciler.repository import KdfParams, Repository
from tests.integration.labconfig import PASSPHRASE, policy_yaml, write_lab_config

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

LIC_VMS = ["app201", "app203"]


@dataclass
class Env:
    lab: LabHandle
    root: Path
    config: Path
    desired: DesiredState
    repo: Repository


def open_window() -> str:
    """A policy line allowing power cycles in a window open now (and for the next hours)."""
    hour = datetime.now(timezone.utc).hour
    start, end = f"{(hour + 23) % 24:02d}:00", f"{(hour + 3) % 24:02d}:00"
    return f'  cbt_power_cycle: {{allowed: true, window: {{start: "{start}", end: "{end}"}}}}\n'


@pytest.fixture(scope="module")
def env(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("apply")
    policies = policy_yaml("lic", lab.licensed, LIC_VMS) + policy_yaml(
        "free", lab.free, ["web01", "db 01"], extra=open_window()
    )
    cfg = write_lab_config(
        lab, root, policies, repository_extra="  prune: {enabled: true, max_deletions_per_run: 10}\n"
    )
    Repository.init(root / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
    desired = load_config(cfg)
    return Env(lab, root, cfg, desired, open_repository(desired.repository("r")))


def run(env: Env, *actions: Action, options: BackupOptions | None = None, **kw: object) -> list[Outcome]:
    plan = Plan(datetime.now(timezone.utc), env.desired.revision.id, "hand-built", tuple(actions))
    return apply(
        plan,
        env.desired,
        cancel=threading.Event(),
        retry=RetryPolicy(attempts=2, base_delay=0.1),
        backup_options=options or BackupOptions(workers=2),
        **kw,  # type: ignore[arg-type]
    )


def cbt_action(host: EsxiHost, vm: str, enabled: bool, method: CbtMethod, timeout: float = 120.0) -> SetCbt:
    info = host.find_vm(vm)
    policy = "free" if host.license == "free" else "lic"
    return SetCbt("test", host.name, vm, info.vmid, enabled, method, policy, timeout)


def bak_path(vm: str) -> str:
    return f"/vmfs/volumes/datastore1/{vm}/{vm}.vmx.esxi-reconciler.bak"


def leave_as_found(lab: LabHandle, host: EsxiHost, vm: str, cbt: bool) -> None:
    """Back to the original: CBT as it was, powered on, no snapshot, our backup copy of the .vmx gone."""
    info = host.find_vm(vm)
    if info.cbt_enabled != cbt:
        if host.license == "free" and info.power_state != "poweredOff":
            host.power_off(info, timeout=60)
        host.set_cbt(host.find_vm(vm), cbt)
    host.power_on(host.find_vm(vm), timeout=60)
    if host.license == "free":
        lab.run(host.name, f"rm -f '{bak_path(vm)}'")
    info = host.find_vm(vm)
    assert info.cbt_enabled == cbt and info.power_state == "poweredOn" and info.snapshots == ()


# -- CBT -----------------------------------------------------------------------------------------------


def test_licensed_running_vm_gets_cbt_by_reconfigure_and_stun(env: Env) -> None:
    lab = env.lab
    with connect(env.desired.host(lab.licensed)) as host:
        vm = "app201"
        original = host.find_vm(vm).cbt_enabled
        try:
            (out,) = run(env, cbt_action(host, vm, not original, "reconfigure+stun"))
            assert out.status == "ok", out.error
            api_vm = find_vm(lab.api(lab.licensed), vm)
            assert api_vm.config.changeTrackingEnabled is (not original)
            assert api_vm.snapshot is None  # the stun cycle's snapshot is gone
            assert api_vm.runtime.powerState == "poweredOn"
            (back,) = run(env, cbt_action(host, vm, original, "reconfigure+stun"))  # switch back
            assert back.status == "ok", back.error
            assert find_vm(lab.api(lab.licensed), vm).config.changeTrackingEnabled is original
        finally:
            leave_as_found(lab, host, vm, original)


def test_free_host_vm_off_gets_cbt_by_vmx_edit(env: Env) -> None:
    lab = env.lab
    with connect(env.desired.host(lab.free)) as host:
        vm = "db 01"
        info = host.find_vm(vm)
        original = info.cbt_enabled
        try:
            (planned_for_off,) = run(env, cbt_action(host, vm, not original, "vmx-edit"))
            assert planned_for_off.status == "skipped"  # the VM runs: the plan is not done blindly
            assert "the plan expected poweredOff" in str(planned_for_off.error)
            assert host.read_vmx(info).ctk_enabled is original
            host.power_off(info, timeout=60)
            (out,) = run(env, cbt_action(host, vm, not original, "vmx-edit"))
            assert out.status == "ok", out.error
            assert host.read_vmx(info).ctk_enabled is (not original)
            assert host.find_vm(vm).cbt_enabled is (not original)  # reloaded: the API sees it too
            assert lab.run(lab.free, f"test -f '{bak_path(vm)}'").exit == 0  # backup copy kept
            (back,) = run(env, cbt_action(host, vm, original, "vmx-edit"))
            assert back.status == "ok", back.error
            assert host.read_vmx(info).ctk_enabled is original
        finally:
            leave_as_found(lab, host, vm, original)


def test_free_host_running_vm_is_power_cycled_for_cbt(env: Env) -> None:
    lab = env.lab
    with connect(env.desired.host(lab.free)) as host:
        vm = "web01"
        info = host.find_vm(vm)
        original = info.cbt_enabled
        try:
            (out,) = run(env, cbt_action(host, vm, not original, "power-cycle", timeout=60))
            assert out.status == "ok", out.error
            now = host.find_vm(vm)
            assert now.power_state == "poweredOn" and now.cbt_enabled is (not original)
            assert host.read_vmx(info).ctk_enabled is (not original)
            (back,) = run(env, cbt_action(host, vm, original, "power-cycle", timeout=60))
            assert back.status == "ok", back.error
            assert host.find_vm(vm).power_state == "poweredOn"
        finally:
            leave_as_found(lab, host, vm, original)


# -- backups, prune, GC --------------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Frozen:
    """The snapshot-time content of every disk backed up (read from the frozen file in the lab)."""

    def __init__(self, lab: LabHandle, host: str) -> None:
        self.lab, self.host = lab, host
        self.sha: dict[tuple[str, int], str] = {}
        self.taken = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def on_snapshot(self, host: BackupHost, bs: BackupSnapshot) -> None:
        for disk in bs.disks:
            self.sha[(bs.vm.name, disk.key)] = sha(
                self.lab.local_path(self.host, disk.data_file).read_bytes()
            )
        self.taken.set()
        assert self.release.wait(120), "the test never released the backup"


def backups(env: Env) -> tuple[RunBackup, ...]:
    return tuple(RunBackup("due", "lic", env.lab.licensed, vm, "", "r") for vm in LIC_VMS)


def assert_restores(env: Env, point_id: str, frozen: Frozen) -> None:
    point = env.repo.read_point(point_id)
    for disk in point.disks:
        assert sha(disk_content(env.repo, point, disk.key)) == frozen.sha[(point.vm.name, disk.key)]


def test_backups_then_prune_and_gc_free_chunks(env: Env) -> None:
    lab = env.lab
    frozen = Frozen(lab, lab.licensed)
    options = BackupOptions(workers=2, on_snapshot=frozen.on_snapshot)
    for vm in LIC_VMS:  # data no earlier test stored: the first backups store chunks of their own
        lab.client(lab.licensed).guest_write(vm, 5, seed=76)
    first = run(env, *backups(env), options=options)
    assert [o.status for o in first] == ["ok", "ok"], [o.error for o in first]
    old_ids = [str(o.detail["point_id"]) for o in first]
    for o in first:
        assert o.detail["bytes_stored"] > 0 and o.attempts == 1
        assert_restores(env, str(o.detail["point_id"]), frozen)
    for vm in LIC_VMS:  # the guests change data: the old points hold chunks the new ones do not
        lab.client(lab.licensed).guest_write(vm, 5, seed=77)
    second = run(env, *backups(env), options=options)
    assert [o.status for o in second] == ["ok", "ok"], [o.error for o in second]
    new_ids = [str(o.detail["point_id"]) for o in second]

    old_points = [env.repo.read_point(p) for p in old_ids]
    chunks_before = sum(1 for _ in env.repo.iter_chunk_ids())
    out = run(
        env,
        *(PrunePoint("beyond keep-last", "r", p.id, p.policy, p.vm.name, p.time) for p in old_points),
        PrunePoint("the newest: refused", "r", new_ids[0], "lic", LIC_VMS[0], datetime.now(timezone.utc)),
        CollectGarbage("points pruned", "r"),
    )
    assert [o.status for o in out] == ["ok", "ok", "skipped", "ok"], [o.error for o in out]
    assert "newest successful" in str(out[2].error)
    freed = int(out[3].detail["chunks_freed"])
    assert freed > 0 and out[3].detail["bytes_freed"] > 0
    assert sum(1 for _ in env.repo.iter_chunk_ids()) == chunks_before - freed
    assert set(new_ids) <= set(env.repo.point_ids()) and not set(old_ids) & set(env.repo.point_ids())
    for point_id in new_ids:  # what is kept still restores bit for bit
        assert_restores(env, point_id, frozen)
    with connect(env.desired.host(lab.licensed)) as host:
        assert all(host.find_vm(vm).snapshots == () for vm in LIC_VMS)


def test_gc_never_sweeps_under_a_running_backup(env: Env) -> None:
    lab = env.lab
    frozen = Frozen(lab, lab.licensed)
    frozen.release.clear()  # the backup holds its snapshot (and the shared repository lock) until told
    lab.client(lab.licensed).guest_write("app203", 5, seed=91)  # new chunks: unreferenced until the end
    results: list[object] = []
    backup = threading.Thread(
        target=lambda: results.extend(
            backup_policy(
                env.desired,
                "lic",
                vm="app203",
                options=BackupOptions(workers=2, on_snapshot=frozen.on_snapshot),
            )
        )
    )
    backup.start()
    try:
        assert frozen.taken.wait(120)
        (gc,) = run(env, CollectGarbage("test", "r"), gc_wait_seconds=1.0)
        assert gc.status == "skipped" and str(gc.error).startswith("backup running; GC deferred"), gc.error
    finally:
        frozen.release.set()
        backup.join()
    (res,) = results
    assert getattr(res, "ok", False), getattr(res, "error", None)
    point_id = str(getattr(res, "point_id", ""))
    (gc,) = run(env, CollectGarbage("test", "r"))  # now GC runs: the new point keeps all it needs
    assert gc.status == "ok"
    assert_restores(env, point_id, frozen)


# -- apply FILE -----------------------------------------------------------------------------------------


def test_apply_file_runs_a_current_plan_and_refuses_a_stale_one(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = env.lab
    root = tmp_path / "one"
    root.mkdir()
    # cbt unmanaged: the plan holds only the backup, and app202 keeps its CBT state for other tests
    cfg = write_lab_config(
        lab, root, policy_yaml("one", lab.licensed, ["app202"], extra="  cbt: unmanaged\n")
    )
    Repository.init(root / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
    base = ["--config", str(cfg), "--state-dir", str(root / "state"), "--log-level", "warning"]
    repo = open_repository(load_config(cfg).repository("r"))
    with connect(load_config(cfg).host(lab.licensed)) as host:
        cbt_before = host.find_vm("app202").cbt_enabled

    assert cli.main([*base, "plan", "--out", str(root / "stale.plan")]) == 0
    assert cli.main([*base, "plan", "--out", str(root / "current.plan")]) == 0
    capsys.readouterr()
    assert cli.main([*base, "apply"]) == 64  # no terminal to ask on and no --yes: refused
    assert "--yes" in capsys.readouterr().err and repo.point_ids() == []

    assert cli.main([*base, "apply", str(root / "current.plan")]) == 0
    out = capsys.readouterr().out
    assert "ok      backup esxi" in out.replace(lab.licensed, "esxi") and "app202" in out
    (point_id,) = repo.point_ids()

    assert cli.main([*base, "apply", str(root / "stale.plan")]) == 1  # a point was added since
    err = capsys.readouterr().err
    assert "saved plan is stale" in err and "app202" in err
    assert repo.point_ids() == [point_id]  # nothing was done
    with connect(load_config(cfg).host(lab.licensed)) as host:
        vm = host.find_vm("app202")
        assert vm.snapshots == () and vm.power_state == "poweredOn" and vm.cbt_enabled is cbt_before


def test_sigterm_unwinds_backups_on_both_hosts_and_skips_the_rest(env: Env) -> None:
    lab = env.lab
    before = set(env.repo.point_ids())
    sent: list[int] = []
    seen: list[Outcome] = []
    cancel = threading.Event()

    def term(disk: FrozenDisk, offset: int, length: int) -> None:
        if not sent:
            sent.append(offset)
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread, which waits for the hosts
            # this backup goes on only once the main thread has cancelled the run: it is then cancelled
            # too, however quickly it could finish
            assert cancel.wait(60), "SIGTERM never cancelled the run"

    actions = (
        RunBackup("due", "free", lab.free, "web01", "", "r"),
        *backups(env),
        CollectGarbage("after the backups", "r"),
    )
    plan = Plan(datetime.now(timezone.utc), env.desired.revision.id, "hand-built", actions)
    with pytest.raises(SystemExit) as exc, sigterm_raises():
        apply(
            plan,
            env.desired,
            cancel=cancel,
            on_outcome=seen.append,
            backup_options=BackupOptions(on_data=term),
        )
    assert exc.value.code == 143 and sent and cancel.is_set()
    assert sorted(o.action.subject for o in seen) == sorted(a.subject for a in actions)  # each one outcome
    gc = next(o for o in seen if o.action.kind == "gc")
    assert gc.status == "skipped" and gc.attempts == 0
    cancelled = [o for o in seen if o.action.kind == "backup" and o.status == "skipped"]
    assert cancelled and all("cancelled; the snapshot was removed" in str(o.error) for o in cancelled)
    assert all(o.ok or o in cancelled for o in seen if o.action.kind == "backup"), [o.error for o in seen]
    assert set(env.repo.point_ids()) - before <= {str(o.detail.get("point_id")) for o in seen if o.ok}
    for name in (lab.free, lab.licensed):
        with connect(env.desired.host(name)) as host:
            assert all(v.snapshots == () and v.power_state == "poweredOn" for v in host.list_vms())
