"""Failures of the repository and the NAS under it, with the real product against the lab: the volume
fills up during an ``apply`` (no partial point, the space given back, a clear message), the NAS not
mounted (nothing written in its place), a corrupted chunk (found by verify and by restore, named per
point), a stale lock of a dead process and a live one of another machine, two runs at once, and the
daemon's clock stepping hours back and forth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from esxisim.handle import LabHandle
from reconciler.daemon import Daemon
from reconciler.daemon.notify import Notifier
from reconciler.repository import CHUNK_SIZE, Repository
from reconciler.repository.chunks import chunk_name
from reconciler.repository.lock import LockInfo, list_locks
from reconciler.status.store import StatusStore, status_path
from tests.integration.labconfig import PASSPHRASE, policy_yaml
from tests.reliability.invariants import assert_nothing_lost, baseline, check_repositories
from tests.reliability.ledger import Ledger
from tests.reliability.site import FAST_KDF, Site, assert_killed
from tests.smallvolume import fill, free_bytes, small_volume

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

_seeds = count(4100)


def staged(repo: Path) -> list[str]:
    return sorted(p.name for p in (repo / "tmp").iterdir())


def test_a_volume_that_fills_up_during_apply_keeps_every_point(
    rlab: LabHandle, tmp_path: Path, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """``apply`` (the daemon's path) on a 64 MiB NAS volume that runs out of space part-way: the backup
    fails naming the volume and the fix, nothing partial is listed or left staged, the space the run
    took is given back; the daemon would try again within minutes (a full volume is transient), and
    once the admin frees space the next run succeeds and every point verifies.
    (``tests/integration/test_full_volume_lab.py`` covers the ``backup`` command's message.)"""
    policies = policy_yaml("free", rlab.free, ["web01"], schedule="{every: 1h}", extra="  cbt: unmanaged\n")
    with small_volume(tmp_path / "nas", "64m") as volume:
        site = Site.create(rlab, tmp_path / "site", policies)
        site.repo = Repository.init(volume / "repo", PASSPHRASE, kdf=FAST_KDF)
        repo_yaml = site.config / "repositories" / "r.yaml"
        repo_yaml.write_text(repo_yaml.read_text().replace(str(tmp_path / "site" / "repo"), str(volume / "repo")))
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
        assert record.retry_after is not None
        assert record.retry_after - datetime.now(timezone.utc) < timedelta(minutes=10)  # not 6 hours

        filler.unlink()  # the admin frees space; nothing else
        again = site.cli(capsys, "backup", "free2")
        assert again.code == 0, again.out + again.err[-3000:]
        assert len(site.repo.point_ids()) == len(point_ids) + 1
        assert_nothing_lost(ledger, before)
