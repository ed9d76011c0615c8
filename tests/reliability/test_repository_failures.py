"""Failures of the repository and the NAS under it, with the real product against the lab: the volume
fills up during an ``apply`` (no partial point, the space given back, a clear message), the NAS not
mounted (nothing written in its place), a corrupted chunk (found by verify and by restore, named per
point), a stale lock of a dead process and a live one of another machine, two runs at once, and the
daemon's clock stepping hours back and forth."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from functools import partial
from itertools import count
from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler.daemon import Daemon
from reconciler.daemon.notify import Notifier
from reconciler.operations.vmlock import VmBusyError, vm_lock
from reconciler.repository import CHUNK_SIZE, Repository
from reconciler.repository.chunks import chunk_name
from reconciler.repository.lock import LockInfo, list_locks
from reconciler.status.store import StatusStore, status_path
from tests.integration.labconfig import PASSPHRASE, policy_yaml
from tests.reliability.invariants import assert_nothing_lost, baseline
from tests.reliability.ledger import Ledger
from tests.reliability.site import FAST_KDF, ROOT, Site, assert_killed
from tests.smallvolume import fill, free_bytes, small_volume
from tests.waiting import OffsetClock as Clock
from tests.waiting import wait_until

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

_seeds = count(4100)


def staged(repo: Path) -> list[str]:
    return sorted(p.name for p in (repo / "tmp").iterdir())


def test_a_volume_that_fills_up_during_apply_keeps_every_point(
    rlab: LabHandle, tmp_path: Path, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """``apply`` (the daemon's path) on a 64 MiB NAS volume that runs out of space part-way: the backup
    fails naming the volume and the fix, nothing partial is listed or left staged, the space the run
    took is given back; the apply does not try the backup again against the full volume (no second
    snapshot of the VM), the daemon holds the job back (terminal: the admin must act), and once the
    admin frees space the next run succeeds and every point verifies.
    (``tests/integration/test_full_volume_lab.py`` covers the ``backup`` command's message.)"""
    policies = policy_yaml("free", rlab.free, ["web01"], schedule="{every: 1h}", extra="  cbt: unmanaged\n")
    with small_volume(tmp_path / "nas", "64m") as volume:
        site = Site.create(rlab, tmp_path / "site", policies)
        site.repo = Repository.init(volume / "repo", PASSPHRASE, kdf=FAST_KDF)
        repo_yaml = site.config / "repositories" / "r.yaml"
        text = repo_yaml.read_text()
        repo_yaml.write_text(text.replace(str(tmp_path / "site" / "repo"), str(volume / "repo")))
        first = site.cli(capsys, "apply", "--yes")
        assert first.code == 0, first.out + first.err[-3000:]
        before = baseline(rlab, {"r": site.repo})

        rlab.client(rlab.free).guest_write("web01", 20, seed=next(_seeds))  # new data to store
        # a policy of a new name: due at once (no history, no point of its own yet)
        (site.config / "policies" / "p.yaml").write_text(policies.replace('name: "free"', 'name: "free2"'))
        point_ids = set(site.repo.point_ids())
        filler = fill(volume, leave=CHUNK_SIZE)
        room = free_bytes(volume)
        ledger.count("faults_injected")
        failed = site.cli(capsys, "apply", "--yes")
        assert failed.code == 1, failed.out + failed.err[-3000:]
        assert f"repository r ({volume / 'repo'}): the volume is full" in failed.out, failed.out
        assert "esxi-reconciler repo gc r" in failed.out  # the fix is named
        assert "Traceback" not in failed.out + failed.err
        assert set(site.repo.point_ids()) == point_ids  # no partial point
        assert staged(volume / "repo") == []
        assert free_bytes(volume) >= room  # what the run took is given back

        with StatusStore.open(status_path(site.state), readonly=True) as store:
            record = store.history()[f"backup/free2/{rlab.free}/web01"]
        assert record.consecutive_failures == 1 and record.retry_after is not None
        assert record.retry_after - datetime.now(timezone.utc) > timedelta(hours=5)  # terminal: held back
        assert "apply.retry" not in failed.err  # not retried within the apply: it would fill up again

        filler.unlink()  # the admin frees space; nothing else
        again = site.cli(capsys, "backup", "free2")
        assert again.code == 0, again.out + again.err[-3000:]
        assert len(site.repo.point_ids()) == len(point_ids) + 1
        assert_nothing_lost(ledger, before)


@pytest.fixture(scope="module")
def site(rlab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Policies ``free`` (web01) and ``lic`` (app203), each with a first point."""
    policies = policy_yaml("free", rlab.free, ["web01"]) + policy_yaml("lic", rlab.licensed, ["app203"])
    site = Site.create(rlab, tmp_path_factory.mktemp("repo"), policies)
    for name in ("free", "lic"):
        first = site.run("backup", name)
        assert first.code == 0, first.err[-3000:]
    yield site


@contextlib.contextmanager
def bind_mounted(source: Path, target: Path) -> Iterator[Path]:
    """``source`` bind-mounted at ``target`` (a NAS share mounted at the repository's path)."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        yield target
    finally:
        # os.path.ismount cannot see a bind mount of the same file system: ask the mount table
        if subprocess.run(["mountpoint", "-q", str(target)], check=False).returncode == 0:
            subprocess.run(["umount", str(target)], check=True)


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=True)


def remount(source: Path, target: Path) -> None:
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)


@contextlib.contextmanager
def repository_at(site: Site, path: Path) -> Iterator[None]:
    """The site's repository ``r`` configured at ``path`` for the block."""
    repo_yaml = site.config / "repositories" / "r.yaml"
    text = repo_yaml.read_text()
    repo_yaml.write_text(text.replace(f"path: {site.repo.path}", f"path: {path}"))
    try:
        yield
    finally:
        repo_yaml.write_text(text)


def test_a_nas_that_is_not_mounted_gets_nothing_written_in_its_place(
    site: Site, tmp_path: Path, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """The repository lives on a NAS share mounted at its path; the share goes away (the mount point
    stays, empty): backup, apply and verify fail naming the repository and its path, and write nothing
    into the empty mount point; mounted again, the next run succeeds and nothing is lost."""
    before = baseline(site.lab, {"r": site.repo})
    with bind_mounted(site.repo.path, tmp_path / "mnt" / "nas") as mount, repository_at(site, mount):
        assert site.cli(capsys, "backup", "free").code == 0  # works while mounted
        umount(mount)
        ledger.count("faults_injected")
        commands: list[tuple[str, ...]] = [("backup", "free"), ("apply", "--yes"), ("verify", "r")]
        for args in commands:
            failed = site.cli(capsys, *args)
            text = failed.out + failed.err
            if args[0] == "apply":  # the plan's warning; apply does nothing (and exits 0: issue 11's call)
                assert "repository r is unreachable" in failed.out, failed.out
            else:
                assert failed.code != 0, (args, failed.out)
            assert str(mount) in text and "not a repository" in text, (args, text[-2000:])
            assert "Traceback" not in text
            assert list(mount.iterdir()) == [], args  # nothing written in the share's place
        remount(site.repo.path, mount)
        again = site.cli(capsys, "backup", "free")
        assert again.code == 0, again.out + again.err[-3000:]
    assert_nothing_lost(ledger, before)


def test_another_repository_at_the_path_of_an_unmounted_nas_is_refused(
    site: Site, tmp_path: Path, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """While the NAS is away someone initialises a repository on the empty mount point (the error said
    "not a repository"). With the Repository's ``id`` pinned, as ``repo init`` prints it, the backup
    refuses the stranger and writes nothing into it; with the NAS back, it goes on."""
    before = baseline(site.lab, {"r": site.repo})
    repo_yaml = site.config / "repositories" / "r.yaml"
    with bind_mounted(site.repo.path, tmp_path / "mnt" / "nas") as mount, repository_at(site, mount):
        pinned = repo_yaml.read_text()
        repo_yaml.write_text(pinned.replace("spec:\n", f"spec:\n  id: {site.repo.id}\n", 1))
        assert site.cli(capsys, "backup", "free").code == 0
        umount(mount)
        stranger = Repository.init(mount, PASSPHRASE, kdf=FAST_KDF)
        ledger.count("faults_injected")
        refused = site.cli(capsys, "backup", "free")
        text = refused.out + refused.err
        assert refused.code != 0
        assert f"holds repository {stranger.id}, but the configuration pins id {site.repo.id}" in text, text
        assert "mount the right volume" in text and "Traceback" not in text
        assert stranger.point_ids() == [] and list((mount / "tmp").iterdir()) == []
        shutil.rmtree(mount)
        mount.mkdir()
        remount(site.repo.path, mount)
        again = site.cli(capsys, "backup", "free")
        assert again.code == 0, again.out + again.err[-3000:]
    assert_nothing_lost(ledger, before)


def test_a_corrupted_chunk_is_found_by_verify_and_by_restore_naming_the_points(
    site: Site, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """One chunk shared by two points of web01 rots on the NAS: verify names both points (and only
    them), a restore of either fails naming the damage and leaves nothing on the host; verify --repair
    and the next backup heal it, and every point verifies again."""
    assert site.cli(capsys, "backup", "free").code == 0  # a second point sharing most chunks
    before = baseline(site.lab, {"r": site.repo})
    web = [p for p in site.repo.list_points() if p.vm.name == "web01"]
    shared = set.intersection(*(set(site.repo.read_index(p.disks[0].index).referenced()) for p in web[-2:]))
    bad = sorted(shared)[0]
    blob = site.repo.path / chunk_name(bad)
    data = bytearray(blob.read_bytes())
    data[-20] ^= 0x01
    blob.write_bytes(bytes(data))
    ledger.count("faults_injected")
    users = {p.id for p in web if bad in set(site.repo.read_index(p.disks[0].index).referenced())}

    try:
        found = site.cli(capsys, "verify", "r", "--json")
        assert found.code == 1
        report = json.loads(found.out)["repositories"][0]
        assert {d["id"] for d in report["damaged_points"]} == users
        assert any(p["kind"] == "chunk-damaged" for p in report["problems"]), report["problems"]

        restore = site.cli(capsys, "restore", "web01", "--point", web[-1].id, "--name", "web01-rot")
        assert restore.code == 1
        line = restore.err.strip().splitlines()[-1]
        assert line.startswith(f"esxi-reconciler restore: restore point {web[-1].id} of web01: chunks/"), line
        assert "damaged" in line and "esxi-reconciler verify r" in line
        assert "Traceback" not in restore.out + restore.err
        assert not [v for v in site.lab.client(site.lab.free).state()["vms"] if v["name"] == "web01-rot"]
    finally:  # heal, whatever failed above: the cases after this one share the repository
        site.cli(capsys, "verify", "r", "--repair")
        healed = site.cli(capsys, "backup", "free")  # stores the chunk again
    assert healed.code == 0, healed.out + healed.err[-2000:]
    assert_nothing_lost(ledger, before)


def test_a_stale_lock_of_a_dead_process_and_a_live_one_of_another_machine(
    site: Site, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """A backup SIGKILLed mid-run leaves its lock file: the next backup and GC go ahead (the lock's
    process is gone) and GC removes it. A fresh exclusive lock of another machine (its GC) makes the
    backup wait for nothing: it is refused naming the holder; once that lock is old it counts as stale."""
    before = baseline(site.lab, {"r": site.repo})
    site.lab.client(site.lab.free).guest_write("web01", 5, seed=next(_seeds))  # chunks to write
    killed = site.run("backup", "free", kill_at="backup.chunk-written")
    assert_killed(killed, "backup.chunk-written")
    ledger.count("kill_points")
    dead = list_locks(site.repo.backend)
    assert dead and all(lock.pid != os.getpid() for lock in dead)
    assert site.cli(capsys, "backup", "free").code == 0
    gc = site.cli(capsys, "repo", "gc", "r")
    assert gc.code == 0, gc.out + gc.err[-2000:]
    assert list_locks(site.repo.backend) == []

    other = LockInfo("f" * 32, True, "nas-admin-box", 4242, datetime.now(timezone.utc), "gc")
    site.repo.backend.put(other.name, [other.to_json()])
    ledger.count("faults_injected")
    try:
        refused = site.cli(capsys, "backup", "free")
        assert refused.code != 0
        assert "locked exclusively by pid 4242 on nas-admin-box" in refused.out + refused.err
        assert "Traceback" not in refused.out + refused.err
        old = LockInfo(other.id, True, other.host, other.pid, other.time - timedelta(hours=1), "gc")
        site.repo.backend.replace(old.name, [old.to_json()])  # that machine died an hour ago
        again = site.cli(capsys, "backup", "free")
        assert again.code == 0, again.out + again.err[-2000:]
    finally:
        site.repo.backend.delete(other.name)
    assert_nothing_lost(ledger, before)


def test_two_runs_at_once(site: Site, ledger: Ledger, capsys: pytest.CaptureFixture[str]) -> None:
    """Two ``backup`` processes of the same policy at once (a cron job and a person): one backs the VM
    up, the other is told the VM is being backed up by another run; GC started meanwhile waits for
    the backup or is deferred, naming it. Nothing is lost either way."""
    lab = site.lab
    before = baseline(lab, {"r": site.repo})
    lab.fault(lab.licensed, "snapshot-slow", delay_ms=3000)  # the first run holds the VM a while
    ledger.count("faults_injected")
    try:
        first = subprocess.Popen(
            [sys.executable, "-m", "reconciler.cli", "--log-format", "json", *site.argv(["backup", "lic"])],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        api = lab.host(lab.licensed)["api"]
        vmid = lab.vm(lab.licensed, "app203")["vmid"]

        def held() -> bool:
            try:
                with vm_lock(f"{api['host']}:{api['port']}", vmid):
                    return False
            except VmBusyError:
                return True

        wait_for("the first run to hold app203", held, timeout=60)  # its snapshot takes 3 s
        second = site.run("backup", "lic")
        out, err = first.communicate(timeout=120)
    finally:
        lab.fault(lab.licensed, "clear")
    assert first.returncode == 0, out + err[-3000:]
    assert second.code == 1
    assert "app203: FAILED" in second.out and "being backed up by another run" in second.out, second.out
    assert_nothing_lost(ledger, before)


def test_the_clock_stepping_hours_back_and_forth_while_the_daemon_runs(
    site: Site, tmp_path: Path, ledger: Ledger
) -> None:
    """The daemon's clock jumps 5 hours ahead, then 12 hours back (before every point), then 14 ahead:
    each jump ahead makes the hourly backup due once (no burst of catch-up runs); the jump back neither
    backs up again nor prunes (the points are "from the future"); back ahead, the next backup runs and
    retention (keep 2) prunes the oldest. No cycle fails and every other point verifies."""
    path = site.config / "policies" / "p.yaml"
    text = path.read_text()
    path.write_text(
        policy_yaml("hourly", site.lab.free, ["db 01"], schedule="{every: 1h}", retention="{keep_last: 2}",
                    extra="  cbt: unmanaged\n")
    )  # fmt: skip
    repo_yaml = site.config / "repositories" / "r.yaml"
    repo_text = repo_yaml.read_text()
    repo_yaml.write_text(repo_text + "  prune: {enabled: true}\n")
    before = baseline(site.lab, {"r": site.repo})
    clock = Clock()
    state = tmp_path / "state"
    daemon = Daemon(
        site.config, state, resync=0.5, debounce=0.2, min_interval=0.5, clock=clock, notifier=Notifier({})
    )
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(daemon.run()), name="daemon")
    thread.start()

    def hourly() -> list[str]:
        return [p.id for p in site.repo.list_points() if p.policy == "hourly"]

    def settle(cycles: int = 3) -> None:
        start = daemon.cycles
        wait_for(f"{cycles} more cycles", lambda: daemon.cycles >= start + cycles)

    try:
        (first,) = wait_for("the first hourly backup", hourly)
        settle()
        assert hourly() == [first]
        clock.offset += timedelta(hours=5)
        ledger.count("faults_injected")
        _, second = wait_for("a backup after the jump ahead", lambda: len(hourly()) == 2 and hourly())
        settle()
        assert hourly() == [first, second]  # one, not five
        clock.offset -= timedelta(hours=12)
        ledger.count("faults_injected")
        settle(4)
        assert hourly() == [first, second]  # nothing due, nothing pruned
        clock.offset += timedelta(hours=14)
        ledger.count("faults_injected")
        wait_for("a backup, and the oldest pruned", lambda: (h := hourly())[0] == second and len(h) == 2)
    finally:
        daemon.request_stop()
        thread.join(timeout=120)
        path.write_text(text)
        repo_yaml.write_text(repo_text)
    assert codes == [0]
    with StatusStore.open(status_path(state), readonly=True) as store:
        failed = [(e.kind, e.subject, e.error) for e in store.actions(limit=500) if e.status == "failed"]
    assert failed == []
    assert_nothing_lost(ledger, before)


wait_for = partial(wait_until, timeout=120.0, poll=0.2)
