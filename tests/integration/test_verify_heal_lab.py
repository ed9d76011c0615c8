"""Damage found by ``verify --repair`` is healed by the next backup: the bad chunk is set aside, the next
backup of the VM reads in full (an incremental would keep referencing the bad chunk) and stores the data
again, which makes the older point whole again too."""

from __future__ import annotations

from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler.config import load_config
from reconciler.operations.backup import backup_policy
from reconciler.operations.repositories import open_repository
from reconciler.operations.restore import disk_content
from reconciler.repository import KdfParams, Repository, verify_repository
from reconciler.repository.chunks import HOLE, chunk_name
from tests.integration.labconfig import PASSPHRASE, policy_yaml, write_lab_config

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("which", ["free", "licensed"])
def test_the_next_backup_after_a_repair_reads_in_full_and_heals_the_points(
    lab: LabHandle, tmp_path: Path, which: str
) -> None:
    host, vm = (lab.free, "web01") if which == "free" else (lab.licensed, "app203")
    cfg = write_lab_config(lab, tmp_path, policy_yaml("heal", host, [vm]))
    Repository.init(tmp_path / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
    desired = load_config(cfg)
    repo = open_repository(desired.repository("r"))

    [first] = backup_policy(desired, "heal")
    assert first.ok, first.error
    point = repo.read_point(str(first.point_id))
    disk = point.disks[0]
    before = disk_content(repo, point, disk.key)
    victim = next(c for c in repo.read_index(disk.index).referenced() if c != HOLE)
    path = repo.path / chunk_name(victim)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    path.write_bytes(bytes(blob))

    report = verify_repository(repo, quarantine=True)
    assert not report.ok and report.quarantined == 1 and set(report.damaged_points) == {point.id}

    [second] = backup_policy(desired, "heal")
    assert second.ok, second.error
    assert second.mode == "full"
    assert "verify found damaged or missing" in (second.fallback_reason or "")
    assert verify_repository(repo).ok  # the data stored again under the same id: both points whole
    assert disk_content(repo, point, disk.key) == before
