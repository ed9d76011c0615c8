"""No repository path escapes its directory: a restore point planted in an unencrypted repository (whose
manifests anyone with write access can forge) naming ``../`` paths as its index, chunks and files is
refused as damaged, and exporting it writes nothing anywhere."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from reconciler.facts.points import DiskRecord, RestorePoint, StoredFile, VmRef
from reconciler.operations.export import export_point
from reconciler.repository import Repository
from reconciler.repository.errors import RepositoryError
from tests.reliability.ledger import Ledger

ESCAPES = ("../../../outside", "../" * 8 + "etc/passwd", "/etc/passwd", "..", "a/../../b")


def test_planted_paths_stay_inside_the_repository(tmp_path: Path, ledger: Ledger) -> None:
    repo_dir = tmp_path / "nested" / "repo"
    repo = Repository.init(repo_dir, None)
    bait = tmp_path / "outside"
    bait.write_bytes(b"not a repository object")
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    for i, escape in enumerate(ESCAPES):
        point = RestorePoint(
            f"20260102T03040500000{i}Z-0000000{i}", "p", VmRef("vm", "u", "h", "1"), now, now, now,
            "success", "full", "r",
            files=(StoredFile("vm.vmx", 10, (escape,)),),
            disks=(DiskRecord(2000, "Hard disk 1", "[ds] vm/vm.vmdk", 1 << 20, escape),),
        )  # fmt: skip
        with repo.lock(purpose="test", exclusive=True):
            repo.write_point(point)
        read = repo.read_point(point.id)
        with pytest.raises(RepositoryError, match="invalid"):
            repo.read_index(read.disks[0].index)
        with pytest.raises(RepositoryError, match="invalid"):
            repo.read_file(read.files[0])
        target = tmp_path / "export" / str(i)
        with pytest.raises(RepositoryError):
            export_point(repo, read, target)
        assert not target.exists() or list(target.iterdir()) == []
    assert bait.read_bytes() == b"not a repository object"
    outside = {p for p in tmp_path.rglob("*") if repo_dir not in p.parents and p != repo_dir}
    assert outside <= {tmp_path / "nested", repo_dir, bait, tmp_path / "export"} | set(
        (tmp_path / "export").rglob("*")
    )
    ledger.count("hostile_inputs", len(ESCAPES))
