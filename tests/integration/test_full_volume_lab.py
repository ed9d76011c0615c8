"""A repository volume that fills up during a backup, the way a user meets it: ``esxi-reconciler backup``
against the lab into a repository on a real 64 MiB tmpfs. The failure is one line naming the repository
and its path, the space and the fix (no traceback); nothing is left in ``tmp/``, no partial point is
listed, the snapshot is gone; once space is freed the next backup succeeds without any cleaning by hand
and every point verifies."""

from __future__ import annotations

from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler import cli
from reconciler.repository import CHUNK_SIZE, KdfParams, Repository
from tests.integration.labconfig import PASSPHRASE, policy_yaml, write_lab_config
from tests.smallvolume import fill, small_volume

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]


def points(repo: Path) -> list[str]:
    return sorted(p.name for p in (repo / "points").iterdir())


def staged(repo: Path) -> list[str]:
    return sorted(p.name for p in (repo / "tmp").iterdir())


def test_a_full_volume_fails_the_backup_in_one_line_and_the_next_backup_succeeds(
    lab: LabHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with small_volume(tmp_path / "repo", "64m") as volume:
        config = write_lab_config(lab, tmp_path, policy_yaml("full-web", lab.free, ["web01"]))
        Repository.init(volume, PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
        backup = ["--config", str(config), "--log-format", "console", "backup", "full-web"]
        assert cli.main(backup) == 0
        (earlier,) = points(volume)
        capsys.readouterr()

        lab.client(lab.free).guest_write("web01", 10, seed=9101)  # new data for the next backup
        filler = fill(volume, leave=CHUNK_SIZE)  # it runs out of space part-way
        assert cli.main(backup) == 1
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        (failed,) = [line for line in out.splitlines() if line.startswith("web01: ")]
        assert failed.startswith("web01: FAILED after ")
        reason = failed.partition("s: ")[2]
        assert reason.startswith(f"repository r ({volume}): the volume is full: no space left writing ")
        assert " free of 64.0 MiB)" in reason
        assert reason.endswith(
            "free space on that volume, or free unreferenced data with 'esxi-reconciler repo gc r', then run"
            " again — nothing needs cleaning up by hand"
        )
        assert staged(volume) == []  # the failed run's staged chunks are gone with it
        assert points(volume) == [earlier]  # no partial point
        (vm,) = [v for v in lab.client(lab.free).state()["vms"] if v["name"] == "web01"]
        assert not vm["snapshots"]  # the snapshot was removed

        filler.unlink()  # the admin frees space; nothing else
        assert cli.main(backup) == 0
        assert "web01: ok " in capsys.readouterr().out
        assert staged(volume) == []
        assert len(points(volume)) == 2 and points(volume)[0] == earlier
        assert cli.main(["--config", str(config), "--log-level", "warning", "verify", "r"]) == 0
        assert "repository r: OK: 2 restore points" in capsys.readouterr().out
