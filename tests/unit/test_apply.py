"""The apply executor with fake hosts (no lab): one outcome per action in plan order, guards re-checked
right before acting, power-cycle safety, retries, hosts that are down, cancellation."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from reconciler.config import load_config
from reconciler.config.model import DesiredState, Host
from reconciler.esxi.errors import CommandError, EsxiError, PowerStateTimeoutError
from reconciler.esxi.hostdigest import Allocation, DigestResult
from reconciler.esxi.vmx import VmxFile
from reconciler.facts.inventory import SNAPSHOT_PREFIX, BackupSnapshot, FrozenDisk, SnapshotInfo, VmInfo
from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.operations.apply import apply
from reconciler.operations.backup import BackupOptions
from reconciler.operations.ports import ApplyHost, DiskReader, RangeReader
from reconciler.operations.retry import RetryPolicy
from reconciler.operations.vmlock import vm_lock
from reconciler.planning.actions import (
    Action,
    CollectGarbage,
    Outcome,
    Plan,
    PrunePoint,
    RemoveSnapshot,
    RunVerify,
    SetCbt,
)
from reconciler.repository import CHUNK_SIZE, Repository

NOW = datetime(2026, 11, 26, 3, 0, tzinfo=timezone.utc)
CONFIG = """\
apiVersion: esxi-reconciler/v1
kind: Host
metadata: {{name: {host}}}
spec:
  address: {host}.lan
  credentials: {{user: root, password: {{env: PW}}}}
  api: {{thumbprint: "{thumb}"}}
  ssh: {{host_key: "SHA256:glTDKakoUPbVOd03b0gW7idkUX2l4CNVFK9DMWRIDXo"}}
---
"""
POLICIES = """\
apiVersion: esxi-reconciler/v1
kind: BackupPolicy
metadata: {{name: p}}
spec:
  host: esxi1
  repository: nas
  vms: {{names: [web01, "db 01"]}}
  schedule: {{daily: {{at: "02:00"}}}}
  retention: {{keep_last: 1}}
  cbt_power_cycle: {{allowed: true, window: {{start: "{open_start}", end: "{open_end}"}}}}
---
apiVersion: esxi-reconciler/v1
kind: BackupPolicy
metadata: {{name: night}}
spec:
  host: esxi1
  repository: nas
  vms: {{names: [web01]}}
  schedule: {{daily: {{at: "02:00"}}}}
  retention: {{keep_last: 1}}
  cbt_power_cycle: {{allowed: true, window: {{start: "{start}", end: "{end}"}}}}
---
"""
REPOS = """\
apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: nas}}
spec:
  backend: {{type: local, path: {root}/nas}}
  encryption: {{enabled: false}}
  prune: {{enabled: true, max_deletions_per_run: 10}}
---
apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: keep}}
spec:
  backend: {{type: local, path: {root}/keep}}
  encryption: {{enabled: false}}
"""


# -- a fake world of hosts ---------------------------------------------------------------------------


def vm_info(vmid: str, name: str, power: str = "poweredOn", cbt: bool = False) -> VmInfo:
    return VmInfo(
        vmid, name, f"uuid-{name}", None, power, f"[ds1] {name}/{name}.vmx", "ds1", (), (), cbt, "vmx-19"
    )


@dataclass
class World:
    """The state of every fake host and what was done to it."""

    vms: dict[str, dict[str, VmInfo]] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    fail: dict[tuple[str, str], BaseException] = field(default_factory=dict)
    """(host, method) -> raised by that method."""
    guest_stops: bool = True

    def set(self, host: str, vm: VmInfo) -> None:
        self.vms.setdefault(host, {})[vm.vmid] = vm


class FakeHost:
    """An :class:`ApplyHost` over the :class:`World`. Backups are not run on it: the tests that apply
    backups replace ``backup_policy``."""

    license = "licensed"
    ssh_enabled = True

    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.name = name
        self.identity = f"{name}.lan:443"

    def __enter__(self) -> FakeHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, *args: str) -> None:
        self.world.calls.append((self.name, method, *args))
        exc = self.world.fail.get((self.name, method))
        if exc is not None:
            raise exc

    def vm(self, ref: VmInfo | str) -> VmInfo:
        vmid = ref.vmid if isinstance(ref, VmInfo) else ref
        self._call("vm", vmid)
        try:
            return self.world.vms[self.name][vmid]
        except KeyError:
            raise EsxiError(f"no VM {vmid}") from None

    def find_vm(self, name: str) -> VmInfo:
        found = [v for v in self.list_vms() if v.name == name]
        if len(found) != 1:
            raise EsxiError(f"{len(found)} VMs named {name!r}")
        return found[0]

    def list_vms(self) -> list[VmInfo]:
        return list(self.world.vms.get(self.name, {}).values())

    def is_ours(self, snapshot: SnapshotInfo) -> bool:
        return snapshot.name.startswith(SNAPSHOT_PREFIX)

    def remove_snapshot(self, vm: VmInfo, snapshot_id: str) -> None:
        self._call("remove_snapshot", vm.name, snapshot_id)
        now = self.world.vms[self.name][vm.vmid]
        self.world.set(
            self.name, replace(now, snapshots=tuple(s for s in now.snapshots if s.id != snapshot_id))
        )

    def set_cbt(self, vm: VmInfo, enabled: bool) -> None:
        self._call("set_cbt", vm.name, str(enabled))
        self.world.set(self.name, replace(self.world.vms[self.name][vm.vmid], cbt_enabled=enabled))

    def shutdown_guest(self, vm: VmInfo, *, timeout: float) -> VmInfo:
        self._call("shutdown_guest", vm.name, f"{timeout:.0f}")
        if not self.world.guest_stops:
            raise PowerStateTimeoutError(
                f"VM {vm.name!r} still poweredOn after {timeout:.0f}s, not poweredOff"
            )
        self.world.set(self.name, replace(self.world.vms[self.name][vm.vmid], power_state="poweredOff"))
        return self.world.vms[self.name][vm.vmid]

    def power_on(self, vm: VmInfo | str, *, timeout: float = 600.0) -> VmInfo:
        now = self.world.vms[self.name][vm.vmid if isinstance(vm, VmInfo) else vm]
        self._call("power_on", now.name)
        self.world.set(self.name, replace(now, power_state="poweredOn"))
        return self.world.vms[self.name][now.vmid]

    def close(self) -> None:
        pass

    # what a backup reads: never here (no power_off either: ApplyHost has none, so apply cannot call it)

    def backup_snapshot(
        self, vm: VmInfo, *, quiesce: bool, timeout: float
    ) -> AbstractContextManager[BackupSnapshot]:
        raise AssertionError("backups are not run on this fake")

    def read_file(self, ds_path: str, max_size: int = 16 << 20) -> bytes:
        raise AssertionError("backups are not run on this fake")

    def file_exists(self, ds_path: str) -> bool:
        raise AssertionError("backups are not run on this fake")

    def read_vmx(self, vm: VmInfo) -> VmxFile:
        raise AssertionError("backups are not run on this fake")

    def changed_areas(
        self, vm: VmInfo, snapshot: SnapshotInfo, disk: FrozenDisk, change_id: str
    ) -> list[tuple[int, int]]:
        raise AssertionError("backups are not run on this fake")

    def disk_reader(self, transport: str, *, streams: int) -> DiskReader:
        raise AssertionError("backups are not run on this fake")

    def https_reader(self, streams: int) -> RangeReader:
        raise AssertionError("backups are not run on this fake")

    def allocation(self, disk: FrozenDisk) -> Allocation:
        raise AssertionError("backups are not run on this fake")

    def digest_compare(
        self,
        disk: FrozenDisk,
        previous: bytes | None,
        on_block: Callable[[int, bytes], None],
        *,
        algorithm: str | None = None,
        first_block: int = 0,
        block_count: int | None = None,
    ) -> DigestResult:
        raise AssertionError("backups are not run on this fake")


@dataclass
class Env:
    desired: DesiredState
    world: World
    options: BackupOptions
    nas: Repository

    def factory(self, host: Host) -> ApplyHost:
        return FakeHost(self.world, host.name)

    def run(self, *actions: Action, cancel: threading.Event | None = None, **kw: Any) -> list[Outcome]:
        plan = Plan(NOW, self.desired.revision.id, "fp", tuple(actions))
        seen: list[Outcome] = []
        outcomes = apply(
            plan,
            self.desired,
            cancel=cancel or threading.Event(),
            on_outcome=seen.append,
            host_factory=self.factory,
            retry=kw.pop("retry", RetryPolicy(attempts=3, sleep=lambda s: None)),
            backup_options=self.options,
            gc_wait_seconds=0,
            **kw,
        )
        assert [o.action for o in outcomes] == list(actions)  # one outcome per action, in plan order
        assert sorted(id(o) for o in seen) == sorted(id(o) for o in outcomes)  # each one reported
        return outcomes


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    cfg = tmp_path / "config"
    cfg.mkdir()
    hosts = "".join(CONFIG.format(host=h, thumb=":".join(["ab"] * 32)) for h in ("esxi1", "esxi2"))
    hour = datetime.now(timezone.utc).hour  # p: a window open now, night: one closed now
    window = {
        "open_start": f"{(hour + 23) % 24:02d}:00",
        "open_end": f"{(hour + 2) % 24:02d}:00",
        "start": f"{(hour + 3) % 24:02d}:00",
        "end": f"{(hour + 4) % 24:02d}:00",
    }
    (cfg / "all.yaml").write_text(hosts + POLICIES.format(**window) + REPOS.format(root=tmp_path))
    nas = Repository.init(tmp_path / "nas")
    Repository.init(tmp_path / "keep")
    world = World()
    world.set("esxi1", vm_info("1", "web01"))
    world.set("esxi1", vm_info("2", "db 01", power="poweredOff"))
    world.set("esxi2", vm_info("7", "app201"))
    yield Env(load_config(cfg), world, BackupOptions(lock_dir=tmp_path / "locks"), nas)


def cbt(
    host: str, vm: str, vmid: str, method: str, enabled: bool = True, timeout: float = 5.0, policy: str = "p"
) -> SetCbt:
    return SetCbt("policy wants CBT", host, vm, vmid, enabled, method, policy, timeout)  # type: ignore[arg-type]


def orphan(env: Env, host: str, vmid: str) -> RemoveSnapshot:
    vm = env.world.vms[host][vmid]
    snap = SnapshotInfo("42", SNAPSHOT_PREFIX + "20261126T010000Z-ab", "", None, None, False)
    env.world.set(host, replace(vm, snapshots=(snap,)))
    return RemoveSnapshot("left by a killed run", host, vm.name, vmid, snap.id, snap.name)


def stored_point(repo: Repository, days: int) -> RestorePoint:
    when = NOW - timedelta(days=days)
    writer = repo.chunk_writer(CHUNK_SIZE)
    writer.write(0, f"day {days}".encode().ljust(CHUNK_SIZE, b"x"))
    point = RestorePoint(
        new_point_id(when), "p", VmRef("web01", "uuid-web01", "esxi1", "1"), when, when, when,
        "success", "full", "r", disks=(DiskRecord(2000, "Hard disk 1", "x", CHUNK_SIZE, writer.finish()),),
    )  # fmt: skip
    repo.write_point(point)
    return point


def prune_of(point: RestorePoint, repository: str = "nas") -> PrunePoint:
    return PrunePoint("beyond keep-daily 1", repository, point.id, point.policy, point.vm.name, point.time)


# -- tests -------------------------------------------------------------------------------------------


def test_a_plan_runs_in_order_with_one_outcome_per_action(env: Env) -> None:
    old, newest = stored_point(env.nas, 3), stored_point(env.nas, 1)
    actions = (
        orphan(env, "esxi1", "1"),
        cbt("esxi1", "db 01", "2", "vmx-edit"),
        cbt("esxi2", "app201", "7", "reconfigure+stun"),
        prune_of(old),
        prune_of(newest),
        CollectGarbage("points pruned", "nas"),
        RunVerify("weekly", "weekly", "nas", 100.0),
    )
    out = env.run(*actions)
    assert [o.status for o in out] == ["ok", "ok", "ok", "ok", "skipped", "ok", "ok"]
    assert "newest successful" in str(out[4].error)
    assert out[5].detail["chunks_freed"] == 1
    assert out[6].detail["points"] == 1
    assert [c for c in env.world.calls if c[1] in ("remove_snapshot", "set_cbt")] == [
        ("esxi1", "remove_snapshot", "web01", "42"),
        ("esxi1", "set_cbt", "db 01", "True"),
        ("esxi2", "set_cbt", "app201", "True"),
    ]
    assert env.nas.point_ids() == [newest.id]


def test_snapshot_removal_waits_for_a_running_backup_of_the_vm(env: Env) -> None:
    action = orphan(env, "esxi1", "1")
    with vm_lock("esxi1.lan:443", "1", env.options.lock_dir):  # a backup of web01 is running
        (out,) = env.run(action)
    assert out.status == "skipped" and "backup of this VM is running" in str(out.error)
    assert not any(c[1] == "remove_snapshot" for c in env.world.calls)


def test_snapshot_already_gone_is_skipped(env: Env) -> None:
    action = orphan(env, "esxi1", "1")
    env.world.set("esxi1", vm_info("1", "web01"))  # removed by hand since the plan
    (out,) = env.run(action)
    assert out.status == "skipped" and out.error == "snapshot no longer exists"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"power_state": "poweredOn"}, "the VM is poweredOn now, the plan expected poweredOff"),
        ({"cbt_enabled": True}, "CBT is already enabled"),
        (
            {"snapshots": (SnapshotInfo("9", "before upgrade", "", None, None, False),)},
            "the VM has snapshots now",
        ),
    ],
)
def test_cbt_switch_rechecks_the_vm_right_before_acting(
    env: Env, change: dict[str, Any], reason: str
) -> None:
    env.world.set("esxi1", replace(env.world.vms["esxi1"]["2"], **change))
    (out,) = env.run(cbt("esxi1", "db 01", "2", "vmx-edit"))
    assert out.status == "skipped" and reason in str(out.error)
    assert not any(c[1] == "set_cbt" for c in env.world.calls)


def test_power_cycle_shuts_down_switches_and_powers_on(env: Env) -> None:
    (out,) = env.run(cbt("esxi1", "web01", "1", "power-cycle", timeout=30))
    assert out.status == "ok"
    assert [c[1:] for c in env.world.calls if c[1] != "vm"] == [
        ("shutdown_guest", "web01", "30"),
        ("set_cbt", "web01", "True"),
        ("power_on", "web01"),
    ]
    vm = env.world.vms["esxi1"]["1"]
    assert vm.power_state == "poweredOn" and vm.cbt_enabled


def test_power_cycle_only_inside_the_policys_window(env: Env) -> None:
    (out,) = env.run(cbt("esxi1", "web01", "1", "power-cycle", policy="night"))
    assert out.status == "skipped" and out.error == "outside the power-cycle window of policy night"
    (gone,) = env.run(cbt("esxi1", "web01", "1", "power-cycle", policy="removed"))
    assert gone.status == "skipped" and "does not allow power-cycling" in str(gone.error)
    assert [c[1] for c in env.world.calls if c[1] != "vm"] == []


def test_power_cycle_never_forces_a_guest_that_does_not_stop(env: Env) -> None:
    env.world.guest_stops = False
    (out,) = env.run(cbt("esxi1", "web01", "1", "power-cycle", timeout=5))
    assert out.status == "failed" and out.error == "guest did not shut down in 5s; CBT unchanged"
    assert out.attempts == 1
    assert [c[1] for c in env.world.calls if c[1] != "vm"] == ["shutdown_guest"]  # no power_off, no edit
    assert not env.world.vms["esxi1"]["1"].cbt_enabled


def test_power_cycle_powers_the_vm_on_even_when_the_switch_fails(env: Env) -> None:
    env.world.fail[("esxi1", "set_cbt")] = CommandError("mv -f x y", 1, "", "Read-only file system")
    (out,) = env.run(cbt("esxi1", "web01", "1", "power-cycle"))
    assert out.status == "failed" and "Read-only file system" in str(out.error)
    assert env.world.calls[-1][1:] == ("power_on", "web01")
    assert env.world.vms["esxi1"]["1"].power_state == "poweredOn"


def test_a_host_that_is_down_is_not_hammered(env: Env) -> None:
    env.world.fail[("esxi1", "vm")] = ConnectionRefusedError(111, "Connection refused")
    sleeps: list[float] = []
    out = env.run(
        orphan(env, "esxi1", "1"),
        cbt("esxi1", "db 01", "2", "vmx-edit"),
        cbt("esxi2", "app201", "7", "reconfigure+stun"),
        retry=RetryPolicy(attempts=3, sleep=sleeps.append, random=lambda: 0.0),
    )
    assert out[0].status == "failed" and out[0].transient and out[0].attempts == 3 and len(sleeps) == 2
    assert out[1].status == "skipped" and "host esxi1 failed earlier in this run" in str(out[1].error)
    assert out[2].status == "ok"  # the other host is unaffected
    assert sum(1 for c in env.world.calls if c[0] == "esxi1") == 3  # three tries of the first action only


def test_terminal_failures_are_not_retried_and_do_not_stop_the_host(env: Env) -> None:
    env.world.fail[("esxi1", "set_cbt")] = CommandError("vim-cmd vmsvc/reload 2", 1, "", "fault")
    out = env.run(cbt("esxi1", "db 01", "2", "vmx-edit"), orphan(env, "esxi1", "1"))
    assert out[0].status == "failed" and out[0].attempts == 1 and not out[0].transient
    assert out[1].status == "ok"


def test_cancelled_apply_skips_everything(env: Env) -> None:
    cancel = threading.Event()
    cancel.set()
    out = env.run(orphan(env, "esxi1", "1"), CollectGarbage("x", "nas"), cancel=cancel)
    assert [o.status for o in out] == ["skipped", "skipped"]
    assert all(o.attempts == 0 and o.error == "cancelled before it started" for o in out)
    assert env.world.calls == []


def test_cancel_during_the_run_skips_the_rest(env: Env) -> None:
    cancel = threading.Event()
    env.world.fail[("esxi1", "remove_snapshot")] = KeyboardInterrupt()  # Ctrl-C mid-action
    with pytest.raises(KeyboardInterrupt):
        env.run(orphan(env, "esxi1", "1"), cbt("esxi1", "db 01", "2", "vmx-edit"), cancel=cancel)
    assert cancel.is_set()
    assert not any(c[1] == "set_cbt" for c in env.world.calls)


def test_pruning_is_opt_in_per_repository(env: Env) -> None:
    keep = Repository.open(env.desired.repository("keep").backend.location)
    old = stored_point(keep, 5)
    stored_point(keep, 1)
    (out,) = env.run(prune_of(old, "keep"))
    assert out.status == "skipped" and out.error == "pruning is not enabled for repository keep"
    assert old.id in keep.point_ids()


def test_a_saved_plan_of_another_config_revision_is_stale(env: Env) -> None:
    from reconciler.commands.apply import staleness
    from reconciler.planning.fingerprint import fingerprint
    from reconciler.planning.observed import ObservedState

    observed = ObservedState(time=NOW)
    current = Plan(NOW, env.desired.revision.id, fingerprint(env.desired, observed))
    assert staleness(current, env.desired, observed) is None
    old = replace(current, revision="git:0123abc")
    assert staleness(old, env.desired, observed) == (
        f"the config changed since it was made (revision git:0123abc -> {env.desired.revision.id})"
    )


def test_backups_failing_transiently_are_retried_alone(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from reconciler.esxi.errors import ForeignSnapshotError
    from reconciler.operations.backup import VmResult
    from reconciler.planning.actions import RunBackup

    calls: list[list[str]] = []

    def fake_backup_policy(desired: DesiredState, policy: str, **kw: Any) -> list[VmResult]:
        names = sorted(kw["vms"])
        calls.append(names)
        results = []
        for name in names:
            if name == "gone":
                continue  # no longer on the host: not in the results
            if name == "db 01" and len(calls) == 1:
                res = VmResult(
                    name, "esxi1", policy, False, error="reset", exception=ConnectionResetError("reset")
                )
            elif name == "odd":
                res = VmResult(
                    name, "esxi1", policy, False, error="foreign", exception=ForeignSnapshotError("x")
                )
            else:
                res = VmResult(name, "esxi1", policy, True, point_id=f"p-{name}", mode="full")
            kw["on_result"](res)
            results.append(res)
        return results

    monkeypatch.setattr("reconciler.operations.apply.backup_policy", fake_backup_policy)
    out = env.run(
        *(RunBackup("due", "p", "esxi1", vm, "", "nas") for vm in ("web01", "db 01", "odd", "gone"))
    )
    assert [(o.status, o.attempts) for o in out] == [("ok", 1), ("ok", 2), ("failed", 1), ("failed", 1)]
    assert out[0].detail["point_id"] == "p-web01" and out[1].detail["point_id"] == "p-db 01"
    assert not out[2].transient and "not on host esxi1" in str(out[3].error)
    assert calls == [["db 01", "gone", "odd", "web01"], ["db 01"]]  # only the transient failure again
