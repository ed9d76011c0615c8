"""The daemon end to end against both lab hosts, with the example config in a git work tree.

One story, in order (each step needs the previous one's state): the first cycle backs up every VM; a
committed change enabling CBT becomes reality (API reconfigure + stun cycle on the licensed host; on the
free host pending while the VM runs, then a ``.vmx`` edit over SSH once the VM is seen powered off);
an invalid config file is reported and ignored while backups go on; simulated time passes until
retention expires points, which are pruned and their chunks freed; every point records the git commit
it was made under. Then the real ``esxi-reconciler run`` process gets SIGTERM in the middle of a backup
and exits 0 with no snapshot left.

The daemon's clock is real time plus an offset the test moves forward ("simulated time"): schedules
and retention see the offset, the hosts and the repository see real time.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from esxisim import demo
from esxisim.demo import git
from esxisim.handle import LabHandle
from reconciler.config import load_config
from reconciler.daemon import Daemon
from reconciler.daemon.notify import Notifier
from reconciler.esxi.host import EsxiHost
from reconciler.esxi.vmx import VmxFile
from reconciler.facts.points import RestorePoint
from reconciler.operations.hosts import connect
from reconciler.operations.repositories import open_repository
from reconciler.repository import Repository
from reconciler.repository.chunks import chunk_name
from reconciler.repository.errors import LockedError
from reconciler.repository.verify import verify_repository
from reconciler.status.conditions import CONFIG_NAME
from reconciler.status.store import StatusStore, status_path
from tests.waiting import OffsetClock as Clock
from tests.waiting import wait_until as _wait_until

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

ROOT = Path(__file__).resolve().parents[2]
FREE_VMS = ("web01", "db 01")
LICENSED_VMS = ("app201", "app202")


wait_until = partial(_wait_until, timeout=90.0, poll=0.3)


def edit_policy(config: Path, file: str, change: Callable[[dict[str, Any]], None]) -> None:
    path = config / "policies" / file
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in docs:
        change(doc["spec"])
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True))


def points(repo: Repository, policy: str | None = None, vm: str | None = None) -> list[RestorePoint]:
    """The listed points; waits while the daemon's GC holds the repository exclusively."""
    for _ in range(100):
        try:
            with repo.lock(purpose="test"):
                return repo.list_points(policy=policy, vm=vm)
        except LockedError:
            time.sleep(0.2)
    raise AssertionError("the repository stayed locked")


def more_points_than(repo: Repository, vm: str, count: int) -> bool:
    return len(points(repo, policy="web-daily", vm=vm)) > count


def chunk_ids(repo: Repository, point: RestorePoint) -> set[bytes]:
    out: set[bytes] = set()
    for disk in point.disks:
        out |= set(repo.read_index(disk.index).referenced())
    return out


def vmx_of(lab: LabHandle, host: str, vm: str) -> VmxFile:
    return VmxFile.parse(lab.local_path(host, f"[datastore1] {vm}/{vm}.vmx").read_text())


def conditions(state: Path) -> dict[tuple[str, str], Any]:
    with StatusStore.open(status_path(state), readonly=True) as store:
        return {c.key: c for c in store.conditions()}


@pytest.fixture
def lab_hosts(lab: LabHandle, tmp_path: Path) -> Iterator[dict[str, EsxiHost]]:
    """Pinned host objects for checks, and afterwards the lab put back as it was: CBT off, VMs on, no
    snapshot, no .vmx backup copy, no fault."""
    config = demo.write_config(lab.info, lab.lab, tmp_path / "hostcfg")
    desired = load_config(config)
    hosts = {name: connect(desired.host(name)) for name in (lab.free, lab.licensed)}
    try:
        yield hosts
    finally:
        lab.clear_faults()
        for name, host in hosts.items():
            for vm in host.list_vms():
                for snap in reversed(vm.snapshots):
                    if host.is_ours(snap):
                        host.remove_snapshot(vm, snap.id)
            for vm in host.list_vms():
                if vm.cbt_enabled or (name == lab.free and vmx_of(lab, name, vm.name).ctk_enabled):
                    if name == lab.free and vm.power_state == "poweredOn":
                        host.power_off(vm)
                    host.set_cbt(vm, False)
                host.power_on(vm)
            lab.run(name, "rm -f /vmfs/volumes/datastore1/*/*.esxi-reconciler.bak")
            host.close()


def test_the_daemon_keeps_reality_matching_git(
    lab: LabHandle, lab_hosts: dict[str, EsxiHost], tmp_path: Path
) -> None:
    free, licensed = lab_hosts[lab.free], lab_hosts[lab.licensed]
    config = demo.write_config(lab.info, lab.lab, tmp_path / "demo")
    state = tmp_path / "state"

    # The example config, made runnable by the clock: hourly backups, CBT not managed yet.
    def first_version(spec: dict[str, Any]) -> None:
        spec["schedule"] = {"every": "1h"}
        spec["cbt"] = "unmanaged"
        spec.pop("cbt_power_cycle", None)

    edit_policy(config, "web.yaml", first_version)
    edit_policy(config, "apps.yaml", first_version)
    (config / "policies" / "verify.yaml").write_text(
        "apiVersion: esxi-reconciler/v1\nkind: VerifyPolicy\nmetadata: {name: hourly-check}\n"
        "spec:\n  repository: nas\n  schedule: {every: 1h}\n  read_data_percent: 100\n"
        f"  test_restore: {{host: {lab.licensed}, vms: [web01]}}\n"
    )
    git(config, "init", "-q")
    git(config, "add", "-A")
    git(config, "commit", "-q", "-m", "back up the web and app servers")
    first_commit = git(config, "rev-parse", "HEAD")

    repo_cfg = load_config(config).repository("nas")
    Repository.init(
        Path(repo_cfg.backend.location), repo_cfg.encryption.key.reveal() if repo_cfg.encryption.key else None
    )
    repo = open_repository(repo_cfg)

    def applied(kind: str) -> list[Any]:
        """The daemon's recorded action outcomes of ``kind``."""
        with StatusStore.open(status_path(state), readonly=True) as store:
            return [e for e in store.actions(limit=500) if e.kind == kind]

    clock = Clock()
    daemon = Daemon(
        config, state, resync=1.0, debounce=0.3, min_interval=0.5, clock=clock, notifier=Notifier({})
    )
    exit_codes: list[int] = []
    thread = threading.Thread(target=lambda: exit_codes.append(daemon.run()), name="daemon")
    thread.start()
    try:
        # 1. The first cycle backs up every VM of both policies, under the first commit.
        every_vm = {*FREE_VMS, *LICENSED_VMS}
        wait_until("first backups", lambda: {p.vm.name for p in points(repo)} >= every_vm)
        assert {p.config_revision for p in points(repo)} == {f"git:{first_commit}"}
        assert all(free.find_vm(v).snapshots == () for v in FREE_VMS)

        # 2. A commit enables CBT: the licensed VMs get it through the API (stun cycle, they run);
        #    on the free host the running VMs are pending until they are seen powered off.
        def enable_cbt(spec: dict[str, Any]) -> None:
            spec["cbt"] = "enabled"

        edit_policy(config, "web.yaml", enable_cbt)
        edit_policy(config, "apps.yaml", enable_cbt)
        git(config, "commit", "-q", "-am", "enable CBT")
        second_commit = git(config, "rev-parse", "HEAD")
        # done when the daemon recorded the switch: the VM shows CBT on before its stun snapshot is gone
        wait_until(
            "CBT switched on the licensed VMs",
            lambda: (
                {e.subject for e in applied("cbt") if e.status == "ok"}
                >= {f"{lab.licensed}/{v}" for v in LICENSED_VMS}
            ),
        )
        assert all(licensed.find_vm(v).cbt_enabled for v in LICENSED_VMS)
        assert all(licensed.find_vm(v).snapshots == () for v in LICENSED_VMS)
        with StatusStore.open(status_path(state), readonly=True) as store:
            wait_until(
                "a plan of the second commit",
                lambda: (p := store.last_plan()) and p.revision == f"git:{second_commit}",
            )
        assert not vmx_of(lab, lab.free, "db 01").ctk_enabled  # running: pending, not forced

        free.power_off(free.find_vm("db 01"))  # e.g. a maintenance reboot: the daemon uses the moment
        wait_until(
            "ctkEnabled in db 01's .vmx", lambda: vmx_of(lab, lab.free, "db 01").ctk_enabled, timeout=60
        )
        assert "db 01.vmx.esxi-reconciler.bak" in {
            p.name for p in lab.local_path(lab.free, "[datastore1] db 01").iterdir()
        }
        assert not vmx_of(lab, lab.free, "web01").ctk_enabled  # still running, still pending
        free.power_on(free.find_vm("db 01"))

        # 3. An invalid file is reported with file and line; backups go on under the last good config.
        broken = config / "policies" / "broken.yaml"
        broken.write_text(
            "apiVersion: esxi-reconciler/v1\nkind: BackupPolicy\nmetadata: {name: broken}\n"
            "spec:\n  host: esxi1\n  repository: nas\n  vms: {names: [web01]}\n  schedule: {every: 1h}\n"
            "  retention: {keep_last: 3}\n  colour: blue\n"
        )
        wait_until(
            "the config reported invalid",
            lambda: (
                (c := conditions(state).get(("config", CONFIG_NAME)))
                and c.status == "Stalled"
                and "broken.yaml:10" in c.message
            ),
        )
        before = len(points(repo, policy="web-daily", vm="web01"))
        # the guest writes first, then the backup becomes due: the other way round the daemon may back
        # up before the write (a point with nothing new, and below no chunk of its own to free). The
        # seeds are used by no other test: a seed writes the same bytes at the same places every time,
        # so a write another test made before (in another order) would change nothing.
        lab.client(lab.free).guest_write("web01", 5, seed=1101)
        clock.advance(timedelta(hours=1, minutes=5))
        wait_until(
            "a backup while the config is invalid",
            lambda: len(points(repo, policy="web-daily", vm="web01")) > before,
        )
        assert points(repo, policy="web-daily", vm="web01")[-1].config_revision == f"git:{second_commit}"
        broken.unlink()

        #    The scheduled verification ran, and so did its test restore: web01 (a free-host VM)
        #    restored on the licensed host, booted, checked and removed again.
        wait_until("a test restore", lambda: applied("test-restore"))
        assert [e.status for e in applied("verify")][:1] == ["ok"]
        assert [(e.subject, e.status) for e in applied("test-restore")][:1] == [
            (f"{lab.licensed}/web01", "ok")
        ]
        assert not [v.name for v in licensed.list_vms() if "web01" in v.name]

        # 4. Simulated time passes: more backups, then retention (keep_last 3 and one per day, week,
        #    month: all these points are of one day) expires the oldest, which are pruned and freed.
        for seed in (1102, 1103):
            count = len(points(repo, policy="web-daily", vm="web01"))
            lab.client(lab.free).guest_write("web01", 5, seed=seed)
            clock.advance(timedelta(hours=1, minutes=5))
            wait_until("another backup", functools.partial(more_points_than, repo, "web01", count))
        web01 = points(repo, policy="web-daily", vm="web01")
        assert len(web01) >= 4
        expired = web01[:-3]
        kept_chunks = set().union(*(chunk_ids(repo, p) for p in points(repo) if p not in expired))
        freed = set().union(*(chunk_ids(repo, p) for p in expired)) - kept_chunks
        assert freed, "the guest writes should have given the expired points chunks of their own"
        wait_until(
            "expired points pruned",
            lambda: (
                [p.id for p in points(repo, policy="web-daily", vm="web01")] == [p.id for p in web01[-3:]]
            ),
        )
        wait_until(
            "their chunks freed",
            lambda: not any((repo.path / chunk_name(c)).exists() for c in freed),
        )
        assert verify_repository(repo).ok
    finally:
        daemon.request_stop()
        thread.join(timeout=120)
    assert exit_codes == [0]
    for host, vms in ((free, FREE_VMS), (licensed, LICENSED_VMS)):
        assert all(host.find_vm(v).snapshots == () for v in vms)


def test_sigterm_during_a_backup_exits_cleanly_without_a_snapshot(
    lab_faults: LabHandle, lab_hosts: dict[str, EsxiHost], tmp_path: Path
) -> None:
    lab = lab_faults
    free = lab_hosts[lab.free]
    config = demo.write_config(lab.info, lab.lab, tmp_path / "demo")
    (config / "policies" / "apps.yaml").unlink()

    def due_now(spec: dict[str, Any]) -> None:
        spec["schedule"] = {"every": "1h"}
        spec["vms"] = {"names": ["web01"]}
        spec["cbt"] = "unmanaged"
        spec.pop("cbt_power_cycle", None)

    edit_policy(config, "web.yaml", due_now)
    repo_cfg = load_config(config).repository("nas")
    Repository.init(
        Path(repo_cfg.backend.location), repo_cfg.encryption.key.reveal() if repo_cfg.encryption.key else None
    )
    lab.fault(lab.free, "api-slow", delay_ms=400)  # the backup takes seconds: time to signal it

    daemon = subprocess.Popen(
        [sys.executable, "-m", "reconciler.cli", "--config", str(config),
         "--state-dir", str(tmp_path / "state"), "--log-format", "json", "run", "--stop-timeout", "60s"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        snapshot = wait_until(
            "our snapshot of web01",
            lambda: [s for s in free.find_vm("web01").snapshots if free.is_ours(s)],
            timeout=120,
        )
        assert snapshot
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=90)
        assert daemon.returncode == 0, stderr.decode()[-2000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    lab.clear_faults()
    assert free.find_vm("web01").snapshots == ()
    assert points(open_repository(repo_cfg)) == []  # no partial restore point
    assert b"daemon.stopping" in stderr and b"daemon.stopped" in stderr
