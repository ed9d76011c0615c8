"""Crash consistency of repository maintenance: ``apply`` SIGKILLed while it prunes expired points and
while GC marks and sweeps, ``verify --repair`` SIGKILLed while it sets a damaged chunk aside. After the
kill every point that was not meant to go still verifies; the next run finishes the job (the expired
points gone, no garbage left, no GC marker; the damaged chunk quarantined and stored again by the next
backup), and nothing else is lost."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count

import pytest

from esxisim.handle import LabHandle
from reconciler.repository.chunks import chunk_name
from reconciler.repository.gc import GC_MARKER, collect_garbage
from tests.integration.labconfig import policy_yaml
from tests.reliability.invariants import assert_nothing_lost, baseline, check_repositories
from tests.reliability.ledger import Ledger
from tests.reliability.site import Site, assert_killed

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

PRUNE_GC_STEPS = (
    ("prune.point-deleted", 2),
    ("prune.point-deleted:2", 2),
    ("gc.marker-written", 1),
    ("gc.object-deleted", 1),
    ("gc.object-deleted:4", 1),
    ("gc.swept", 1),
)
"""(kill step, backups made before: each leaves one more point past ``keep_last: 1``)."""
_seeds = count(8100)


@pytest.fixture(scope="module")
def site(rlab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    policies = policy_yaml("free", rlab.free, ["db 01"], retention="{keep_last: 1}")
    site = Site.create(
        rlab,
        tmp_path_factory.mktemp("crash-maintenance"),
        policies,
        repository_extra="  prune: {enabled: true, max_deletions_per_run: 10}\n",
    )
    first = site.run("backup", "free")
    assert first.code == 0, first.err[-3000:]
    yield site


def backup(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.lab.client(site.lab.free).guest_write("db 01", 10, seed=next(_seeds))  # chunks of its own
    done = site.cli(capsys, "backup", "free")
    assert done.code == 0, done.out + done.err[-3000:]


@pytest.mark.parametrize(("step", "backups"), PRUNE_GC_STEPS, ids=[s for s, _ in PRUNE_GC_STEPS])
def test_prune_and_gc_killed_at_a_step_are_finished_by_the_next_apply(
    site: Site, ledger: Ledger, capsys: pytest.CaptureFixture[str], step: str, backups: int
) -> None:
    for _ in range(backups):
        backup(site, capsys)
    before = baseline(site.lab, {"r": site.repo})
    *expired, newest = site.repo.point_ids()
    assert expired

    killed = site.run("apply", "--yes", kill_at=step)
    assert_killed(killed, step)
    ledger.count("kill_points")
    found = check_repositories(ledger, before, gone=expired)
    assert not found.lost and not found.problems, found
    assert newest in site.repo.point_ids()

    again = site.cli(capsys, "apply", "--yes")
    assert again.code == 0, again.out + again.err[-3000:]
    assert site.repo.point_ids() == [newest]
    assert not (site.repo.path / GC_MARKER).exists()
    leftover = collect_garbage(site.repo, dry_run=True)
    assert (leftover.unreferenced_chunks, leftover.unreferenced_indexes, leftover.tmp_files) == (0, 0, 0)
    assert_nothing_lost(ledger, before, gone=expired)


@pytest.mark.parametrize("step", ["verify.quarantine-copied", "verify.chunk-quarantined"])
def test_verify_repair_killed_while_quarantining_is_finished_and_healed(
    site: Site, ledger: Ledger, capsys: pytest.CaptureFixture[str], step: str
) -> None:
    backup(site, capsys)  # the newest point's data is the VM's current data: a backup can heal it
    before = baseline(site.lab, {"r": site.repo})
    newest = site.repo.read_point(site.repo.point_ids()[-1])
    (bad, *_) = sorted(site.repo.read_index(newest.disks[0].index).referenced())
    blob = site.repo.path / chunk_name(bad)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit on the NAS
    blob.write_bytes(bytes(data))
    ledger.count("faults_injected")

    killed = site.run("verify", "r", "--repair", kill_at=step)
    assert_killed(killed, step)
    ledger.count("kill_points")

    again = site.cli(capsys, "verify", "r", "--repair")
    assert again.code == 1  # the damage is reported, naming the point, and set aside
    assert newest.id in again.out or "web01@" in again.out or "db 01@" in again.out, again.out
    assert bad.hex() in {p.name for p in (site.repo.path / "quarantine").iterdir()}
    assert not blob.exists()

    healed = site.cli(capsys, "backup", "free")  # the guest wrote nothing since: the same data, read in
    assert healed.code == 0, healed.out + healed.err[-3000:]  # full, stores the chunk again
    assert "verify found damaged or missing" in healed.out
    assert_nothing_lost(ledger, before)
