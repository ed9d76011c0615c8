"""``repo stats``: the figures of a repository built with known content."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.repository import CHUNK_SIZE, Repository
from reconciler.repository.stats import usage_report
from tests.unit.test_cli_outcomes import check

pytestmark = pytest.mark.usefixtures("restore_logging")

MiB = CHUNK_SIZE
T0 = datetime(2026, 11, 20, 2, 0, tzinfo=timezone.utc)


def random_disk(seed: int, chunks: int) -> bytes:
    """Incompressible content: zstd stores it as it is."""
    return random.Random(seed).randbytes(chunks * MiB)


def text_disk(chunks: int, zero_chunks: int) -> bytes:
    """Very compressible chunks, then ``zero_chunks`` of zeros (holes: never stored)."""
    text = b"".join(f"line {i} of a log file\n".encode() for i in range(200000))
    return b"".join(text[i * 1000 : i * 1000 + MiB] for i in range(chunks)) + bytes(zero_chunks * MiB)


def write_disk(repo: Repository, image: bytes) -> str:
    writer = repo.chunk_writer(len(image))
    for offset in range(0, len(image), MiB):
        writer.write(offset, image[offset : offset + MiB])
    return writer.finish()


def add_point(repo: Repository, vm: str, policy: str, days: int, *images: bytes) -> RestorePoint:
    when = T0 + timedelta(days=days)
    disks = tuple(
        DiskRecord(
            2000 + n, f"Hard disk {n + 1}", f"[ds1] {vm}/{vm}_{n}.vmdk", len(image), write_disk(repo, image)
        )
        for n, image in enumerate(images)
    )
    point = RestorePoint(
        id=new_point_id(when),
        policy=policy,
        vm=VmRef(vm, f"uuid-{vm}", "esxi1", "1"),
        started=when,
        snapshot_time=when,
        finished=when,
        status="success",
        mode="full",
        config_revision="r",
        disks=disks,
    )
    repo.write_point(point)
    return point


def chunk_bytes(repo: Repository) -> int:
    return sum(p.stat().st_size for p in (repo.path / "chunks").rglob("*") if p.is_file())


@pytest.fixture(params=["plain", "encrypted"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Repository:
    from reconciler.repository import KdfParams

    if request.param == "plain":
        return Repository.init(tmp_path / "repo")
    return Repository.init(tmp_path / "repo", "pw", kdf=KdfParams(memory_kib=64, iterations=1, lanes=1))


def test_two_identical_disks_deduplicate_to_one(repo: Repository) -> None:
    image = random_disk(1, 4)
    add_point(repo, "web01", "nightly", 0, image, image)
    report = usage_report(repo, repo.list_points())
    total = report.total
    assert (total.points, total.logical, total.data, total.unique, total.chunks) == (
        1,
        8 * MiB,
        8 * MiB,
        4 * MiB,
        4,
    )
    assert total.dedup_ratio == 2.0
    assert 0.95 < (total.compression_ratio or 0) <= 1.0  # random data does not compress
    assert total.stored == chunk_bytes(repo) == report.volume_bytes
    assert (report.unreferenced_chunks, report.missing_chunks) == (0, 0)


def test_zeros_compression_and_points_that_change_nothing(repo: Repository) -> None:
    image = text_disk(2, zero_chunks=2)
    for day in range(3):  # three points of an unchanged disk
        add_point(repo, "db01", "weekly", day, image)
    total = usage_report(repo, repo.list_points()).total
    assert total.logical == 3 * 4 * MiB
    assert total.data == 3 * 2 * MiB  # the zeros are holes
    assert total.unique == 2 * MiB and total.dedup_ratio == 3.0
    assert (total.compression_ratio or 0) > 20  # text compresses well
    assert total.stored == chunk_bytes(repo)
    assert total.reduction_ratio == round(total.logical / total.stored, 3)


def test_per_vm_and_per_policy_and_what_forgetting_would_free(repo: Repository) -> None:
    shared = random_disk(2, 2)  # a template both VMs were cloned from
    web = add_point(repo, "web01", "nightly", 0, shared + random_disk(3, 1))
    add_point(repo, "web01", "nightly", 1, shared + random_disk(4, 1))
    add_point(repo, "db01", "weekly", 0, shared + text_disk(1, 0))
    report = usage_report(repo, repo.list_points())
    vms = {key.name: usage for key, usage in report.by_vm.items()}
    assert set(vms) == {"web01", "db01"} and set(report.by_policy) == {"nightly", "weekly"}
    web01, db01 = vms["web01"], vms["db01"]
    assert (web01.points, web01.logical, web01.unique, web01.chunks) == (2, 6 * MiB, 4 * MiB, 4)
    assert (db01.points, db01.logical, db01.unique, db01.chunks) == (1, 3 * MiB, 3 * MiB, 3)
    assert report.total.unique == 5 * MiB  # the shared chunks counted once
    # exclusive: what only this VM references; the template's chunks are shared
    sizes = {
        cid: len(repo.backend.get(f"chunks/{cid.hex()[:2]}/{cid.hex()}")) for cid in repo.iter_chunk_ids()
    }
    shared_ids = set(repo.read_index(web.disks[0].index)) & set(
        repo.read_index(repo.list_points(vm="db01")[0].disks[0].index)
    )
    assert len(shared_ids) == 2
    assert web01.exclusive == web01.stored - sum(sizes[c] for c in shared_ids)
    assert db01.exclusive == db01.stored - sum(sizes[c] for c in shared_ids)
    assert report.by_policy["nightly"].exclusive == web01.exclusive  # one VM per policy here

    repo.delete_point(web.id)  # forgotten: its own chunk is garbage until GC
    after = usage_report(repo, repo.list_points())
    assert after.unreferenced_chunks == 1 and after.unreferenced_bytes > 0.9 * MiB
    assert after.volume_bytes == after.total.stored + after.unreferenced_bytes == chunk_bytes(repo)


def test_cli_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "repo.yaml").write_text(
        f"""apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: nas}}
spec:
  backend: {{type: local, path: {tmp_path / "repo"}}}
  encryption: {{enabled: false}}
"""
    )
    repo = Repository.init(tmp_path / "repo")
    image = random_disk(5, 2)
    add_point(repo, "web01", "nightly", 0, image, image)

    assert main(["--config", str(cfg), "repo", "stats", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    check("repo-stats", doc)
    assert doc["ok"] is True
    (entry,) = doc["repositories"]
    assert entry["repository"] == "nas" and entry["ok"] is True
    assert entry["total"]["dedup_ratio"] == 2.0
    assert entry["total"]["logical_bytes"] == 4 * MiB and entry["total"]["unique_bytes"] == 2 * MiB
    assert [(v["vm"], v["host"], v["points"]) for v in entry["vms"]] == [("web01", "esxi1", 1)]
    assert [(p["policy"], p["dedup_ratio"]) for p in entry["policies"]] == [("nightly", 2.0)]
    assert entry["volume"]["unreferenced_chunks"] == 0

    assert main(["--config", str(cfg), "repo", "stats", "nas"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"repository nas ({tmp_path / 'repo'}): 1 restore point of 1 VM in 1 policy\n")
    assert "after deduplication: 2.00x" in out
    assert "web01  esxi1  1       4.0 MiB" in out

    assert main(["--config", str(cfg), "repo", "stats", "nsa"]) == 64
    assert "no Repository named 'nsa'; did you mean 'nas'?" in capsys.readouterr().err
