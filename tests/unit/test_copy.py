"""Copy jobs between repositories: local -> S3 -> local byte-identical, only missing chunks sent,
re-encryption when the keys differ, incremental id mapping, verification, resume after an interruption."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.facts.points import DiskRecord, PointStatus, RestorePoint, VmRef, new_point_id
from reconciler.operations.copy import copy_points, same_chunk_names, verify_copy
from reconciler.planning.copies import select_points
from reconciler.repository import CHUNK_SIZE, DigestMap, KdfParams, Repository, verify_repository
from reconciler.repository.errors import ObjectStoreUnavailable
from tests.s3server import Fault, FaultProxy, S3Server

MiB = CHUNK_SIZE
KDF = KdfParams(64, 1, 1)
MOTO_ONLY = pytest.mark.skipif(
    bool(os.environ.get("S3_TEST_ENDPOINT")), reason="fault injection needs the test proxy in front of moto"
)


def disk_data(seed: int, chunks: int = 4, changed: int | None = None) -> list[bytes]:
    """A disk of ``chunks`` chunks: text, random-looking, a hole, ...; ``changed`` alters one slot."""
    out = []
    for slot in range(chunks):
        if slot == 2:
            out.append(bytes(MiB))  # a hole
            continue
        tag = f"vm{seed}-slot{slot}-{'v2' if slot == changed else 'v1'}"
        out.append((tag * (MiB // len(tag) + 1)).encode()[:MiB])
    return out


def backup(
    repo: Repository, vm: str, data: list[bytes], when: datetime, digest_map: bool = True
) -> RestorePoint:
    writer = repo.chunk_writer(len(data) * MiB)
    for slot, chunk in enumerate(data):
        writer.write(slot * MiB, chunk)
    dm = (
        DigestMap("sha1", 65536, len(data) * MiB, 20, os.urandom(16 * len(data) * 20)) if digest_map else None
    )
    index = writer.finish(dm)
    point = RestorePoint(
        id=new_point_id(when),
        policy="nightly",
        vm=VmRef(vm, f"uuid-{vm}", "esxi1", "1"),
        started=when,
        snapshot_time=when,
        finished=when,
        status="success",
        mode="full",
        config_revision="r",
        files=(repo.write_file(f"{vm}.vmx", f"displayName = {vm}\n".encode()),),
        disks=(
            DiskRecord(
                2000,
                "Hard disk 1",
                f"[ds] {vm}/{vm}.vmdk",
                len(data) * MiB,
                index,
                digest_map=repo.read_index(index).digest_map.hex() if dm else None,  # type: ignore[union-attr]
            ),
        ),
    )
    repo.write_point(point)
    return point


def disk_of(repo: Repository, point_id: str) -> list[bytes]:
    point = repo.read_point(point_id)
    index = repo.read_index(point.disks[0].index)
    return [repo.read_chunk(cid)[: index.chunk_length(slot)] for slot, cid in enumerate(index)]


T0 = datetime(2026, 12, 1, 2, 0, tzinfo=timezone.utc)


def test_local_to_s3_to_local_is_byte_identical_and_reencrypts(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    nas = Repository.init(tmp_path / "nas", "nas pass", kdf=KDF)
    with nas.lock():
        first = backup(nas, "web01", disk_data(1), T0)
        second = backup(nas, "web01", disk_data(1, changed=3), T0 + timedelta(days=1))
        other = backup(nas, "db01", disk_data(2), T0)
    offsite = Repository.init(s3_server.backend(s3_bucket), "offsite pass", kdf=KDF)
    assert not same_chunk_names(nas, offsite)

    report = copy_points(nas, offsite)
    assert report.ok and report.reencrypted
    assert report.count("copied") == 3
    by_id = {p.point_id: p for p in report.points}
    # the second point of web01 shares all but one changed chunk with the first: one chunk (plus its
    # .vmx, the same as before) goes over
    assert by_id[second.id].chunks_uploaded == 1
    assert verify_repository(offsite).ok
    for point in (first, second, other):
        assert disk_of(offsite, point.id) == disk_of(nas, point.id)
    copied = offsite.read_point(second.id)
    assert copied.extra["copied_from"]["repository"] == nas.id
    assert offsite.read_file(copied.files[0]) == b"displayName = web01\n"
    assert copied.disks[0].digest_map is not None
    assert offsite.read_digest_map(copied.disks[0].digest_map) == nas.read_digest_map(
        second.disks[0].digest_map or ""
    )

    # again: nothing to do
    again = copy_points(nas, offsite)
    assert again.count("present") == 3 and again.chunks_uploaded == 0

    # and back to a second local repository, plain: restores the same bytes
    home = Repository.init(tmp_path / "home")
    back = copy_points(offsite, home, vms=["web*"])
    assert back.ok and back.count("copied") == 2
    assert sorted(home.point_ids()) == sorted([first.id, second.id])
    assert disk_of(home, second.id) == disk_data(1, changed=3)
    assert verify_repository(home).ok


def test_same_keys_copy_blobs_unchanged(tmp_path: Path) -> None:
    a = Repository.init(tmp_path / "a")
    b = Repository.init(tmp_path / "b", compression="none")
    with a.lock():
        point = backup(a, "web01", disk_data(1), T0)
    assert same_chunk_names(a, b)
    report = copy_points(a, b)
    assert not report.reencrypted
    assert b.read_point(point.id).disks[0].index == point.disks[0].index  # same ids, same index
    assert disk_of(b, point.id) == disk_data(1)


def test_selection_by_vm_policy_and_time() -> None:
    def point(vm: str, policy: str, days: int, status: PointStatus = "success") -> RestorePoint:
        when = T0 + timedelta(days=days)
        return RestorePoint(
            new_point_id(when),
            policy,
            VmRef(vm, vm, "h", "1"),
            when,
            when,
            when,
            status,
            "full",
            "r",
        )

    points = [
        point("web01", "a", 0),
        point("web02", "b", 1),
        point("db01", "a", 2),
        point("web01", "a", 3, "failed"),
    ]
    assert [p.vm.name for p in select_points(points)] == ["web01", "web02", "db01"]
    assert [p.vm.name for p in select_points(points, vms=["web*"])] == ["web01", "web02"]
    assert [p.vm.name for p in select_points(points, policies=["a"])] == ["web01", "db01"]
    assert [p.vm.name for p in select_points(points, since=T0 + timedelta(days=1))] == ["web02", "db01"]


@MOTO_ONLY
def test_an_interrupted_copy_resumes_without_sending_chunks_again(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_faults: tuple[FaultProxy, str]
) -> None:
    proxy, endpoint = s3_faults
    nas = Repository.init(tmp_path / "nas", "nas pass", kdf=KDF)
    with nas.lock():
        point = backup(nas, "web01", disk_data(3, chunks=6), T0)
    Repository.init(s3_server.backend(s3_bucket), "offsite pass", kdf=KDF)
    flaky = Repository.open(s3_server.backend(s3_bucket, endpoint=endpoint, max_attempts=2), "offsite pass")
    # the manifest never gets through: chunks and index are stored, the point is not
    proxy.inject(Fault("PUT", r"/points/", times=100, status=500, code="InternalError"))
    with pytest.raises(ObjectStoreUnavailable, match="InternalError writing a restore point manifest"):
        copy_points(nas, flaky)
    assert flaky.point_ids() == []
    assert list(flaky.backend.list("chunks"))  # what was sent before the failure stays
    proxy.clear()
    resumed = copy_points(nas, flaky)
    assert resumed.ok and resumed.count("copied") == 1
    assert resumed.chunks_uploaded == 0  # every chunk was already there
    puts = [path for method, path, _ in proxy.log if method == "PUT" and "/chunks/" in path]
    assert puts == []
    verify_copy(flaky, point.id)
    assert disk_of(flaky, point.id) == disk_of(nas, point.id)
