"""Observe with fake hosts and real (local) repositories: failures and hangs become observations,
repositories are read under a shared lock, the run history comes from the status store."""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reconciler.config.model import Host
from reconciler.esxi.errors import EsxiError
from reconciler.facts.inventory import DatastoreInfo, VmInfo
from reconciler.operations.observe import load_history, observe
from reconciler.operations.ports import HostReader
from reconciler.operations.restore import OverwriteJournal, journal_path
from reconciler.planning.observed import RunRecord
from reconciler.repository import Repository
from tests.unit.planfixtures import NOW_TEXT, at, load_desired, point, repo_doc, vm

NOW = at(NOW_TEXT)


class FakeHost:
    """Answers like EsxiHost; ``fail`` raises on the inventory, ``hang`` blocks until released."""

    prefix = "esxi-reconciler-"

    def __init__(
        self,
        vms: list[VmInfo],
        *,
        fail: Exception | None = None,
        hang: threading.Event | None = None,
        files: dict[str, bytes] | None = None,
        search_fails: bool = False,
    ):
        self.vms, self.fail, self.hang = vms, fail, hang
        self.files, self.search_fails = files or {}, search_fails
        self.closed = False
        self.depths: list[int] = []

    @property
    def license(self) -> str:
        return "free"

    def list_vms(self) -> list[VmInfo]:
        if self.hang is not None:
            self.hang.wait()
        if self.fail is not None:
            raise self.fail
        return self.vms

    def datastores(self) -> list[DatastoreInfo]:
        return [DatastoreInfo("ds1", 100, 50, True, "VMFS")]

    def find_in_vm_folders(self, datastores: Sequence[str], pattern: str, depth: int = 1) -> list[str]:
        self.depths.append(depth)
        if self.search_fails:
            raise EsxiError("datastore browser: permission denied")
        return sorted(p for p in self.files if fnmatch.fnmatch(p.rsplit("/", 1)[-1], pattern))

    def read_file(self, ds_path: str, max_size: int = 1 << 20) -> bytes:
        return self.files[ds_path]

    def close(self) -> None:
        self.closed = True


def test_a_killed_overwrite_is_observed_from_its_journal(tmp_path: Path) -> None:
    """A VM whose folder holds an overwrite journal (a ``restore --overwrite`` was killed, the VM is
    powered off): observed with the two ways on. A host whose folders cannot be searched is still
    observed, without overwrites."""
    desired = load_desired(tmp_path)
    web, db = vm("web01", power="poweredOff"), vm("db01")
    journal = OverwriteJournal(
        point="20261125T020000Z-aaaa", source="web01 on esxi1", started=at("2026-11-26 09:00"),
        power_state="poweredOn", stamp="s", point_vm="web01",
    )  # fmt: skip
    files = {journal_path(web): journal.to_json(), "[ds1] other/notes.txt": b"x"}
    seen = observe(desired, now=NOW, history={}, host_factory=lambda config: FakeHost([web, db], files=files))
    ((name, notice),) = seen.hosts["esxi1"].unfinished_overwrites
    assert name == "web01"
    assert "VM 'web01' on esxi1 is powered off after an overwrite that did not finish" in notice
    assert "it was poweredOn before" in notice
    assert "`esxi-reconciler restore web01 --host esxi1 --overwrite --point 20261125T020000Z-aaaa`" in notice
    assert "`esxi-reconciler restore web01 --host esxi1 --abort`" in notice

    # a VM kept one folder deeper (VMs/app/app.vmx): the search goes that deep
    deep = replace(vm("app"), vmx_path="[ds1] VMs/app/app.vmx")
    fake = FakeHost([web, deep], files={journal_path(deep): journal.to_json()})
    seen = observe(desired, now=NOW, history={}, host_factory=lambda config: fake)
    assert [n for n, _ in seen.hosts["esxi1"].unfinished_overwrites] == ["app"] and set(fake.depths) == {2}

    broken = FakeHost([web, db], files=files, search_fails=True)
    seen = observe(desired, now=NOW, history={}, host_factory=lambda config: broken)
    host = seen.hosts["esxi1"]
    assert (
        host.reachable
        and host.unfinished_overwrites == ()
        and [v.name for v in host.vms] == ["web01", "db01"]
    )


def test_hosts_that_fail_or_hang_are_unreachable_and_the_rest_is_observed(tmp_path: Path) -> None:
    repo_path = tmp_path / "repo"
    repo = Repository.init(repo_path)
    repo.write_point(point("web", "web01", at("2026-11-26 02:00")))
    desired = load_desired(
        tmp_path, repositories=[repo_doc(path=str(repo_path)), repo_doc("gone", path=str(tmp_path / "x"))]
    )
    release = threading.Event()
    fakes = {
        "esxi1": FakeHost([vm("web01")]),
        "esxi2": FakeHost([], hang=release),
    }

    def factory(config: Host) -> HostReader:
        return fakes[config.name]

    try:
        seen = observe(desired, now=NOW, history={}, host_factory=factory, host_timeout=2.0)
    finally:
        release.set()
    assert seen.time == NOW
    free = seen.hosts["esxi1"]
    assert (free.reachable, free.license, [v.name for v in free.vms], free.ssh_enabled) == (
        True,
        "free",
        ["web01"],
        True,
    )
    assert fakes["esxi1"].closed
    assert (seen.hosts["esxi2"].reachable, seen.hosts["esxi2"].error) == (False, "no answer within 2 s")
    assert [p.vm.name for p in seen.repositories["nas"].points] == ["web01"]
    gone = seen.repositories["gone"]
    assert not gone.reachable and gone.error is not None and "not a repository" in gone.error


def test_a_host_error_is_an_observation_with_the_message(tmp_path: Path) -> None:
    desired = load_desired(tmp_path)
    fakes = {"esxi1": FakeHost([], fail=EsxiError("login failed for root")), "esxi2": FakeHost([])}
    seen = observe(desired, now=NOW, history={}, host_factory=lambda c: fakes[c.name], repo_opener=_no_repo)
    assert (seen.hosts["esxi1"].reachable, seen.hosts["esxi1"].error) == (
        False,
        "login failed for root",
    )
    assert fakes["esxi1"].closed
    assert seen.hosts["esxi2"].reachable
    assert seen.repositories["nas"].error == "RuntimeError: no repository here"


def _no_repo(config: object) -> Repository:
    raise RuntimeError("no repository here")


def test_repository_under_an_exclusive_lock_is_not_read(tmp_path: Path) -> None:
    repo_path = tmp_path / "repo"
    repo = Repository.init(repo_path)
    desired = load_desired(tmp_path, repositories=[repo_doc(path=str(repo_path))])
    with repo.lock(exclusive=True, purpose="gc"):
        seen = observe(desired, now=NOW, history={}, host_factory=lambda c: FakeHost([]))
    assert not seen.repositories["nas"].reachable
    assert "gc" in (seen.repositories["nas"].error or "")
    after = observe(desired, now=NOW, history={}, host_factory=lambda c: FakeHost([]))
    assert after.repositories["nas"].reachable


def test_history_is_empty_without_a_status_store(tmp_path: Path) -> None:
    assert load_history(tmp_path / "nowhere") == {}
    assert load_history(tmp_path) == {}


def test_history_from_the_status_store(tmp_path: Path) -> None:
    store_module = pytest.importorskip("reconciler.status.store")
    from reconciler.planning.actions import Outcome, RunBackup

    action = RunBackup(reason="r", policy="web", host_name="esxi1", vm="web01", vmid="1", repository="nas")
    started = datetime(2026, 11, 26, 2, 0, tzinfo=timezone.utc)
    with store_module.StatusStore.open(tmp_path / "status.db") as store:
        store.record_outcome(Outcome(action, "ok", started, at("2026-11-26 02:10")), "git:abc")
    history = load_history(tmp_path, "git:abc")
    assert history == {
        "backup/web/esxi1/web01": RunRecord(last_started=started, last_succeeded=at("2026-11-26 02:10"))
    }
