"""Crash consistency of a backup: the real ``esxi-reconciler backup`` is SIGKILLed at each named step
(:mod:`reconciler.killpoint`) on the free host (digest incrementals over SSH) and on the licensed host
(CBT), after the guest wrote new data. Right after the kill the repository verifies, no partial point
is listed and the only snapshot a host may hold is our own; the next run removes that orphan, succeeds
and leaves the hosts clean, and every earlier point still verifies."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count

import pytest

from esxisim.handle import LabHandle
from reconciler.facts.inventory import SNAPSHOT_PREFIX
from tests.integration.labconfig import policy_yaml
from tests.reliability.invariants import assert_nothing_lost, baseline, check_repositories, host_state
from tests.reliability.ledger import Ledger
from tests.reliability.site import Site, assert_killed

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

POLICIES = {"free": ("esxi1", "web01"), "lic": ("esxi2", "app201")}
STEPS = (
    "backup.snapshot-created",
    "backup.chunk-written",
    "backup.index-written",
    "backup.disks-read",
    "backup.snapshot-removed",
    "backup.point-written",
)
CASES = [(policy, step, False) for policy in POLICIES for step in STEPS] + [
    ("lic", "snapshot.remove-started", False),  # the API task to remove it is running
    ("free", "backup.chunk-written:2", True),  # a full read, on its second stored chunk
    ("lic", "backup.index-written", True),
]
_seeds = count(7000)


@pytest.fixture(scope="module")
def site(rlab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Repository ``r`` with a first point of each policy (so later runs are incrementals)."""
    policies = "".join(policy_yaml(name, host, [vm]) for name, (host, vm) in POLICIES.items())
    site = Site.create(rlab, tmp_path_factory.mktemp("crash-backup"), policies)
    for name in POLICIES:
        first = site.run("backup", name)
        assert first.code == 0, first.err[-3000:]
    yield site


@pytest.mark.parametrize(
    ("policy", "step", "full"), CASES, ids=[f"{p}-{s}{'-full' if f else ''}" for p, s, f in CASES]
)
def test_a_backup_killed_at_a_step_loses_nothing(
    site: Site, ledger: Ledger, capsys: pytest.CaptureFixture[str], policy: str, step: str, full: bool
) -> None:
    lab = site.lab
    host, vm = POLICIES[policy]
    lab.client(host).guest_write(vm, 5, seed=next(_seeds))  # the run has new data to store
    before = baseline(lab, {"r": site.repo})
    args = ["backup", policy, *(["--full"] if full else [])]

    killed = site.run(*args, kill_at=step)
    assert_killed(killed, step)
    ledger.count("kill_points")

    # right after the kill: earlier points verify; a point is listed only once it was written whole
    after_kill = check_repositories(ledger, before)
    assert not after_kill.lost and not after_kill.problems, after_kill
    new = set(site.repo.point_ids()) - before.points["r"]
    assert len(new) == (1 if step == "backup.point-written" else 0), new
    left = [s for s in host_state(lab, host).snapshots[vm]]
    assert all(name.startswith(SNAPSHOT_PREFIX) for name in left), left  # only our own, an orphan

    again = site.cli(capsys, *args)
    assert again.code == 0, again.out + again.err[-3000:]
    assert f"{vm}: ok " in again.out
    if left:  # the user is told what was cleaned up
        assert "backup.orphaned_snapshot_removed" in again.err
    assert_nothing_lost(ledger, before)
    assert len(set(site.repo.point_ids()) - before.points["r"]) == len(new) + 1
