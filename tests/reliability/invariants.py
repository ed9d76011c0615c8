"""What every reliability case asserts after its fault: nothing is lost.

    before = baseline(lab, {"r": repo})        # before the fault: points, VMs, datastore folders
    ... inject the fault, run again ...
    assert_nothing_lost(ledger, before)

* **Repositories**: every restore point that existed before is still listed (unless the case deleted
  it on purpose: ``gone``), and ``verify`` reads every listed point back in full — ledger figures
  ``points_lost`` and ``points_verified``.
* **Hosts** (the lab's own view through its control API, not the product's): no VM has a snapshot
  (``snapshots_left``), no VM is registered that was not there before and no datastore holds a folder
  or a ``-restored-``/journal/snapshot-delta file that was not there before (``temporary_vms_left``).

Counts go to the ledger *after* each check ran, zeros included (the report shows a check that ran), and
before the assertion, so a failing case still shows what it found. The helpers are general: any
:class:`~esxisim.handle.LabHandle` (the shared ``lab`` or the suite's own), any number of repositories.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from esxisim.handle import LabHandle
from reconciler.repository import Repository
from reconciler.repository.verify import verify_repository
from tests.reliability.ledger import Ledger

LEFTOVER_FILE = re.compile(
    r"-restored-|testrestore|\.esxi-reconciler-overwrite\.json$|-\d{6}(-sesparse|-delta)?\.vmdk$"
)
"""Files a killed or failed run may leave inside a VM's folder: restored disks not switched to, the
overwrite journal, snapshot deltas."""


@dataclass(frozen=True)
class HostState:
    """One host as the lab sees it: VM names, snapshots per VM, files per datastore."""

    vms: dict[str, str]
    """vmid -> name"""
    snapshots: dict[str, list[str]]
    """VM name -> names of its snapshots"""
    files: frozenset[str]
    """``<datastore>/<relative path>`` of every file and folder on the host's datastores"""
    in_use: frozenset[str] = frozenset()
    """Of those, the files registered VMs use (disk chains, files their .vmx names)"""

    @property
    def folders(self) -> frozenset[str]:
        return frozenset(f for f in self.files if f.count("/") == 1)


def _ds_rel(ds_path: str) -> str:
    """``[ds] dir/file`` -> ``ds/dir/file``."""
    ds, _, rel = ds_path[1:].partition("]")
    return f"{ds}/{rel.strip()}"


def host_state(lab: LabHandle, host: str) -> HostState:
    state = lab.client(host).state()
    vms = {vm["vmid"]: vm["name"] for vm in state["vms"]}
    snapshots = {vm["name"]: [s["name"] for s in vm.get("snapshots") or []] for vm in state["vms"]}
    in_use: set[str] = set()
    for vm in state["vms"]:  # files a registered VM uses: its disk chains, what its .vmx names
        for disk in vm["disks"]:
            for f in disk["chain"]:
                in_use.update(_ds_rel(f[k]) for k in ("descriptor", "extent", "ctk") if f.get(k))
        folder = _ds_rel(vm["vmx"]).rsplit("/", 1)[0]
        vmx = Path(vm["vmx_path"])
        if vmx.exists():
            text = vmx.read_text(errors="replace")
            in_use.update(f"{folder}/{p.name}" for p in vmx.parent.iterdir() if f'"{p.name}"' in text)
    files: set[str] = set()
    for ds in lab.host(host)["datastores"]:
        root = Path(ds["path"])
        for path in root.rglob("*"):
            files.add(f"{ds['name']}/{path.relative_to(root)}")
    return HostState(vms, snapshots, frozenset(files), frozenset(in_use))


@dataclass
class Baseline:
    """What existed before a fault: the points of each repository, the state of each host."""

    lab: LabHandle
    repositories: dict[str, Repository]
    points: dict[str, set[str]]
    hosts: dict[str, HostState] = field(default_factory=dict)

    def refresh_hosts(self) -> None:
        """Take the hosts' state again (after a case changed the inventory on purpose)."""
        self.hosts = {name: host_state(self.lab, name) for name in self.hosts}


def baseline(
    lab: LabHandle, repositories: Mapping[str, Repository], hosts: Collection[str] | None = None
) -> Baseline:
    """The state before a fault (``hosts``: default every host of the lab)."""
    names = list(hosts) if hosts is not None else list(lab.lab.hosts)
    return Baseline(
        lab,
        dict(repositories),
        {name: set(repo.point_ids()) for name, repo in repositories.items()},
        {name: host_state(lab, name) for name in names},
    )


@dataclass(frozen=True)
class RepositoryFindings:
    verified: int
    lost: dict[str, set[str]]
    problems: dict[str, list[str]]


def check_repositories(
    ledger: Ledger, before: Baseline, *, gone: Collection[str] = (), read_data: bool = True
) -> RepositoryFindings:
    """Every earlier point still listed (but ``gone``: ids deleted on purpose) and every listed point of
    every repository verifies; counted into the ledger."""
    lost: dict[str, set[str]] = {}
    problems: dict[str, list[str]] = {}
    verified = 0
    for name, repo in before.repositories.items():
        missing = before.points[name] - set(repo.point_ids()) - set(gone)
        if missing:
            lost[name] = missing
        report = verify_repository(repo, read_data_percent=100.0 if read_data else 0.0)
        if report.ok:
            verified += report.points
        else:
            problems[name] = [p.message for p in report.problems]
            verified += report.points - len(report.damaged_points)
            lost.setdefault(name, set()).update(report.damaged_points)
    ledger.count("points_lost", sum(len(v) for v in lost.values()))
    ledger.count("points_verified", verified)
    return RepositoryFindings(verified, lost, problems)


@dataclass(frozen=True)
class HostFindings:
    snapshots: dict[str, dict[str, list[str]]]
    """host -> VM -> snapshot names left"""
    extra_vms: dict[str, list[str]]
    extra_files: dict[str, list[str]]


def check_hosts(ledger: Ledger, before: Baseline) -> HostFindings:
    """No snapshot on any VM, no VM or folder (or leftover file) that was not there before; counted."""
    snapshots: dict[str, dict[str, list[str]]] = {}
    extra_vms: dict[str, list[str]] = {}
    extra_files: dict[str, list[str]] = {}
    for name, earlier in before.hosts.items():
        now = host_state(before.lab, name)
        snaps = {vm: s for vm, s in now.snapshots.items() if s}
        if snaps:
            snapshots[name] = snaps
        new_vms = sorted(set(now.vms.values()) - set(earlier.vms.values()))
        if new_vms:
            extra_vms[name] = new_vms
        new_files = sorted(
            f
            for f in now.files - earlier.files - now.in_use
            if f in now.folders or LEFTOVER_FILE.search(f.rsplit("/", 1)[-1])
        )
        if new_files:
            extra_files[name] = new_files
    ledger.count("snapshots_left", sum(len(s) for per_vm in snapshots.values() for s in per_vm.values()))
    ledger.count(
        "temporary_vms_left", sum(map(len, extra_vms.values())) + sum(map(len, extra_files.values()))
    )
    return HostFindings(snapshots, extra_vms, extra_files)


def assert_nothing_lost(
    ledger: Ledger, before: Baseline, *, gone: Collection[str] = (), read_data: bool = True
) -> None:
    """The suite's invariant (module doc): earlier points listed and verifying, hosts clean."""
    repos = check_repositories(ledger, before, gone=gone, read_data=read_data)
    hosts = check_hosts(ledger, before)
    assert not repos.lost, f"restore points lost or damaged: {repos.lost} ({repos.problems})"
    assert not repos.problems, f"verify found problems: {repos.problems}"
    assert not hosts.snapshots, f"snapshots left on hosts: {hosts.snapshots}"
    assert not hosts.extra_vms, f"VMs left on hosts: {hosts.extra_vms}"
    assert not hosts.extra_files, f"folders or files left on datastores: {hosts.extra_files}"
