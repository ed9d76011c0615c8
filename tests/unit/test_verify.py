"""verify_repository: a healthy repository passes; each kind of damage is found, named precisely, and
blamed on exactly the restore points it breaks; data subsets cover what they promise."""

from __future__ import annotations

import io
import os
import random
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.facts.points import DiskRecord, RestorePoint, StoredFile, VmRef
from reconciler.operations.progress import DiskProgress, Progress
from reconciler.repository import CHUNK_SIZE, DigestMap, KdfParams, LockedError, Repository
from reconciler.repository.chunks import chunk_name
from reconciler.repository.verify import in_subset, parse_subset, point_label, verify_repository

MiB = CHUNK_SIZE
FAST_KDF = KdfParams(memory_kib=1024, iterations=1, lanes=1)
T0 = datetime(2026, 11, 20, 2, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["plain", "encrypted"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Repository:
    if request.param == "plain":
        return Repository.init(tmp_path / "repo")
    return Repository.init(tmp_path / "repo", "pw", kdf=FAST_KDF)


def chunk(tag: str) -> bytes:
    """A 1 MiB chunk that does not compress (stored as is in a plain repository)."""
    return random.Random(tag).randbytes(MiB)


def write_disk(repo: Repository, chunks: list[bytes | None], digest_map: bool = False) -> str:
    """A disk through a ChunkWriter as the backup engine writes it; None = a zero chunk (hole)."""
    capacity = len(chunks) * MiB
    writer = repo.chunk_writer(capacity)
    for i, data in enumerate(chunks):
        writer.write(i * MiB, data if data is not None else bytes(MiB))
    dm = DigestMap("sha1", 65536, capacity, 20, os.urandom(16 * len(chunks) * 20)) if digest_map else None
    return writer.finish(dm)


def write_point(
    repo: Repository,
    vm: str,
    minute: int,
    disks: list[tuple[str, str]],
    files: tuple[StoredFile, ...] | None = None,
) -> RestorePoint:
    """A point of ``vm`` frozen at 02:<minute> on 2026-11-20 with ``disks`` as (label, index id)."""
    when = T0 + timedelta(minutes=minute)
    point = RestorePoint(
        id=f"{when:%Y%m%dT%H%M%S%f}Z-{random.Random(vm).getrandbits(32):08x}",
        policy="nightly",
        vm=VmRef(vm, f"uuid-{vm}", "esxi1", "1"),
        started=when,
        snapshot_time=when,
        finished=when,
        status="success",
        mode="full",
        config_revision="git:abc",
        files=files
        if files is not None
        else (repo.write_file(f"{vm}.vmx", f'displayName = "{vm}"\n'.encode()),),
        disks=tuple(
            DiskRecord(2000 + i, label, f"[ds1] {vm}/{i}.vmdk", repo.read_index(index).capacity, index)
            for i, (label, index) in enumerate(disks)
        ),
    )
    repo.write_point(point)
    return point


def short(hexid: str) -> str:
    return hexid[:12] + "…"


def test_a_healthy_repository_passes_and_shared_chunks_are_read_once(repo: Repository) -> None:
    shared = chunk("shared")
    a = write_point(repo, "web01", 0, [("Hard disk 1", write_disk(repo, [shared, chunk("a"), None]))])
    b = write_point(repo, "db 01", 1, [("Hard disk 1", write_disk(repo, [None, shared, chunk("b")], True))])
    report = verify_repository(repo)
    assert report.ok, [p.message for p in report.problems]
    assert report.points == 2
    assert report.chunks == 5  # shared, a, b and the two .vmx files: holes are not chunks
    assert report.chunks_read == 5
    assert report.bytes_read >= 3 * MiB
    assert report.damaged_points == {} and not report.cancelled
    assert {a.id, b.id} == set(repo.point_ids())


def test_a_deleted_chunk_is_named_with_every_point_and_offset_that_needs_it(repo: Repository) -> None:
    shared = chunk("shared")
    a = write_point(repo, "web01", 0, [("Hard disk 1", write_disk(repo, [chunk("a"), shared]))])
    b = write_point(
        repo,
        "db 01",
        5,
        [
            ("Hard disk 1", write_disk(repo, [chunk("x")])),
            ("Hard disk 2", write_disk(repo, [None, None, shared])),
        ],
    )
    healthy = write_point(repo, "app", 9, [("Hard disk 1", write_disk(repo, [chunk("c")]))])
    cid = repo.chunk_id(shared)
    (repo.path / chunk_name(cid)).unlink()

    for report in (verify_repository(repo), verify_repository(repo, read_data_percent=0)):
        assert not report.ok
        [problem] = report.problems
        assert problem.kind == "chunk-missing"
        assert problem.object == chunk_name(cid)
        assert problem.message == (
            f"chunk {short(cid.hex())} is missing: needed by 2 points"
            " (web01@2026-11-20T02:00Z disk 'Hard disk 1' at offset 1 MiB,"
            " db 01@2026-11-20T02:05Z disk 'Hard disk 2' at offset 2 MiB)"
        )
        assert set(problem.points) == {a.id, b.id}
        assert report.damaged_points == {a.id: "web01@2026-11-20T02:00Z", b.id: "db 01@2026-11-20T02:05Z"}
        assert healthy.id not in report.damaged_points


def test_a_flipped_byte_in_a_chunk_is_found_by_reading_the_data(repo: Repository) -> None:
    data = chunk("flip")
    point = write_point(repo, "web01", 0, [("Hard disk 1", write_disk(repo, [None, None, data]))])
    cid = repo.chunk_id(data)
    path = repo.path / chunk_name(cid)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))

    assert verify_repository(repo, read_data_percent=0).ok  # present; only reading finds it
    report = verify_repository(repo)
    [problem] = report.problems
    cause = "authentication failed" if repo.encrypted else "content does not match the chunk id"
    assert problem.kind == "chunk-damaged"
    assert problem.message == (
        f"chunk {short(cid.hex())} is damaged ({cause}): needed by 1 point"
        " (web01@2026-11-20T02:00Z disk 'Hard disk 1' at offset 2 MiB)"
    )
    assert problem.points == (point.id,)


def test_repair_sets_bad_chunks_aside_and_rewriting_the_data_heals_the_points(repo: Repository) -> None:
    damaged, lost, fine = chunk("damaged"), chunk("lost"), chunk("fine")
    point = write_point(repo, "web01", 0, [("Hard disk 1", write_disk(repo, [damaged, lost, fine]))])
    path = repo.path / chunk_name(repo.chunk_id(damaged))
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    (repo.path / chunk_name(repo.chunk_id(lost))).unlink()

    assert len(verify_repository(repo).problems) == 2
    assert repo.quarantined() == set()  # without --repair, verify changes nothing
    report = verify_repository(repo, quarantine=True)
    assert report.quarantined == 2 and set(report.damaged_points) == {point.id}
    bad = {repo.chunk_id(damaged), repo.chunk_id(lost)}
    assert repo.quarantined() == bad
    assert not any(repo.has_chunk(c) for c in bad)
    assert (repo.path / "quarantine" / repo.chunk_id(damaged).hex()).read_bytes() == bytes(blob)

    # a backup that meets the same content stores it again: the old point is whole again
    with repo.lock(purpose="test"):
        write_disk(repo, [damaged, lost, None])
        repo.flush()
    assert verify_repository(repo).ok


def test_a_damaged_configuration_file_chunk_names_the_file(repo: Repository) -> None:
    vmx = repo.write_file("web01.vmx", b'displayName = "web01"\n')
    point = write_point(repo, "web01", 0, [], files=(vmx,))
    (repo.path / chunk_name(bytes.fromhex(vmx.chunks[0]))).write_bytes(b"garbage")
    [problem] = verify_repository(repo).problems
    assert problem.kind == "chunk-damaged"
    assert problem.message.endswith("needed by 1 point (web01@2026-11-20T02:00Z file 'web01.vmx')")
    assert problem.points == (point.id,)


@pytest.mark.parametrize("cut", ["half", "checksum"])
@pytest.mark.parametrize("holes", [False, True], ids=["dense", "sparse"])
def test_a_truncated_index_is_named_with_its_points(repo: Repository, holes: bool, cut: str) -> None:
    layout: list[bytes | None] = [None] * 40 if holes else [chunk(f"d{i}") for i in range(4)]
    if holes:
        layout[7] = chunk("only")
    index_id = write_disk(repo, layout)
    other = write_disk(repo, [chunk("ok")])
    a = write_point(repo, "web01", 0, [("Hard disk 1", other), ("Hard disk 2", index_id)])
    b = write_point(repo, "web01", 60, [("Hard disk 1", other), ("Hard disk 2", index_id)])
    path = repo.path / "indexes" / index_id
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2] if cut == "half" else blob[:-1])

    report = verify_repository(repo)
    [problem] = report.problems
    assert problem.kind == "index-truncated"
    assert problem.object == f"indexes/{index_id}"
    expected = len(layout)
    left = expected if cut == "checksum" else 0  # zstd yields whole blocks only: nothing of half a frame
    assert problem.message == (
        f"index {short(index_id)} is truncated ({left} of {expected} entries): needed by 2 points"
        " (web01@2026-11-20T02:00Z disk 'Hard disk 2', web01@2026-11-20T03:00Z disk 'Hard disk 2')"
    )
    assert set(problem.points) == {a.id, b.id}


@pytest.mark.parametrize("passphrase", [None, "pw"], ids=["plain", "encrypted"])
def test_a_truncated_uncompressed_index_counts_the_entries_left(
    tmp_path: Path, passphrase: str | None
) -> None:
    repo = Repository.init(tmp_path / "repo", passphrase, compression="none", kdf=FAST_KDF)
    index_id = write_disk(repo, [chunk(f"d{i}") for i in range(10)])
    point = write_point(repo, "web01", 0, [("Hard disk 1", index_id)])
    path = repo.path / "indexes" / index_id
    envelope = 8 + (12 if passphrase else 0)
    path.write_bytes(path.read_bytes()[: envelope + 60 + 6 * 32 + 5])  # 6 entries and a bit
    [problem] = verify_repository(repo).problems
    assert problem.message.startswith(
        f"index {short(index_id)} is truncated (6 of 10 entries): needed by 1 point"
    )
    assert problem.points == (point.id,)


def test_a_flipped_byte_in_an_index_is_damage_not_truncation(repo: Repository) -> None:
    index_id = write_disk(repo, [chunk("a"), chunk("b")])
    point = write_point(repo, "web01", 0, [("Hard disk 1", index_id)])
    path = repo.path / "indexes" / index_id
    blob = bytearray(path.read_bytes())
    blob[-40] ^= 0x80
    path.write_bytes(bytes(blob))
    [problem] = verify_repository(repo).problems
    assert problem.kind == "index-damaged"
    cause = "authentication failed" if repo.encrypted else "checksum mismatch"
    assert problem.message == (
        f"index {short(index_id)} is damaged ({cause}):"
        " needed by 1 point (web01@2026-11-20T02:00Z disk 'Hard disk 1')"
    )
    assert problem.points == (point.id,)


def test_a_missing_index_and_a_missing_digest_map(repo: Repository) -> None:
    lost = write_disk(repo, [chunk("a")])
    with_map = write_disk(repo, [chunk("b")], digest_map=True)
    point = write_point(repo, "web01", 0, [("Hard disk 1", lost), ("Hard disk 2", with_map)])
    (repo.path / "indexes" / lost).unlink()
    dm = repo.read_index(with_map).digest_map
    assert dm is not None
    (repo.path / "digests" / dm.hex()).unlink()

    report = verify_repository(repo)
    messages = sorted(p.message for p in report.problems)
    assert messages == [
        f"digest map {short(dm.hex())} is missing:"
        " needed by 1 point (web01@2026-11-20T02:00Z disk 'Hard disk 2')",
        f"index {short(lost)} is missing: needed by 1 point (web01@2026-11-20T02:00Z disk 'Hard disk 1')",
    ]
    assert {p.kind for p in report.problems} == {"index-missing", "digest-map-missing"}
    assert report.damaged_points == {point.id: "web01@2026-11-20T02:00Z"}
    assert report.chunks == 2  # the .vmx and chunk b; the lost index's chunks are unknown


def test_an_index_that_does_not_fit_its_disk(repo: Repository) -> None:
    index_id = write_disk(repo, [chunk("a")])
    point = write_point(repo, "web01", 0, [("Hard disk 1", index_id)])
    bigger = RestorePoint(
        **{
            **point.__dict__,
            "id": point.id[:-8] + "0000beef",
            "disks": (DiskRecord(2000, "Hard disk 1", "x", 2 * MiB, index_id),),
        }
    )
    repo.write_point(bigger)
    [problem] = verify_repository(repo).problems
    assert problem.kind == "index-mismatch"
    assert problem.points == (bigger.id,)
    assert f"(index: {MiB} bytes in {MiB}-byte chunks; manifest: {2 * MiB} bytes)" in problem.message


def test_a_corrupt_manifest_is_reported_and_the_other_points_still_checked(repo: Repository) -> None:
    good = write_point(repo, "web01", 0, [("Hard disk 1", write_disk(repo, [chunk("a")]))])
    bad = write_point(repo, "db 01", 1, [("Hard disk 1", write_disk(repo, [chunk("b")]))])
    path = repo.path / bad.name
    blob = bytearray(path.read_bytes())
    blob[20] ^= 0x04
    path.write_bytes(bytes(blob))

    report = verify_repository(repo)
    [problem] = report.problems
    assert problem.kind == "manifest-damaged"
    assert problem.object == bad.name
    cause = "authentication failed" if repo.encrypted else "checksum mismatch"
    assert problem.message == f"restore point {bad.id} is damaged ({cause}): its manifest cannot be read"
    assert report.damaged_points == {bad.id: bad.id}
    assert report.points == 1 and good.id not in report.damaged_points
    assert report.chunks == 2  # good's disk chunk and .vmx


def test_n_of_t_slices_read_every_chunk_exactly_once(repo: Repository) -> None:
    files = tuple(repo.write_file(f"f{i}", f"file {i}".encode()) for i in range(60))
    write_point(repo, "web01", 0, [], files=files)
    ids = [bytes.fromhex(f.chunks[0]) for f in files]
    t = 4
    total = 0
    for n in range(1, t + 1):
        report = verify_repository(repo, subset=(n, t))
        assert report.ok and report.chunks == 60
        assert report.chunks_read == sum(in_subset(cid, (n, t)) for cid in ids)
        total += report.chunks_read
    assert total == 60
    for cid in ids:
        assert sum(in_subset(cid, (n, t)) for n in range(1, t + 1)) == 1


def test_slices_partition_the_id_space() -> None:
    rng = random.Random(5)
    for t in (1, 2, 3, 7, 10):
        for _ in range(200):
            cid = rng.randbytes(32)
            assert sum(in_subset(cid, (n, t)) for n in range(1, t + 1)) == 1
    assert in_subset(b"\x00" * 32, (1, 3)) and in_subset(b"\xff" * 32, (3, 3))


def test_a_percentage_reads_that_share_and_still_checks_presence(repo: Repository) -> None:
    files = tuple(repo.write_file(f"f{i}", f"file {i}".encode()) for i in range(40))
    write_point(repo, "web01", 0, [], files=files)
    report = verify_repository(repo, read_data_percent=25, seed=1)
    assert report.ok and report.chunks == 40 and report.chunks_read == 10
    assert verify_repository(repo, read_data_percent=25, seed=1).bytes_read == report.bytes_read
    (repo.path / chunk_name(bytes.fromhex(files[3].chunks[0]))).unlink()
    missing = verify_repository(repo, read_data_percent=25, seed=2)
    assert [p.kind for p in missing.problems] == ["chunk-missing"]


def test_parse_subset() -> None:
    assert parse_subset("2/7") == (2, 7)
    assert parse_subset("10%") == 10.0
    assert parse_subset(" 100% ") == 100.0
    for bad in ("0/3", "4/3", "1/0", "x/2", "0%", "101%", "ten%", "5", "", "1/2/3"):
        with pytest.raises(ValueError):
            parse_subset(bad)


def test_verify_runs_beside_a_backup_but_not_during_gc(repo: Repository) -> None:
    write_point(repo, "web01", 0, [("Hard disk 1", write_disk(repo, [chunk("a")]))])
    with repo.lock(purpose="backup nightly/web01"):
        write_disk(repo, [chunk("in progress")])  # no manifest yet: not looked at
        report = verify_repository(repo)
    assert report.ok and report.chunks == 2
    with repo.lock(exclusive=True, purpose="gc"), pytest.raises(LockedError, match="gc"):
        verify_repository(repo)
    assert list((repo.path / "locks").iterdir()) == []


def test_cancel_stops_early_and_is_not_ok(repo: Repository) -> None:
    write_point(repo, "web01", 0, [("Hard disk 1", write_disk(repo, [chunk("a")]))])
    cancel = threading.Event()
    cancel.set()
    report = verify_repository(repo, cancel=cancel)
    assert report.cancelled and not report.ok and report.problems == []


def test_progress_reports_the_data_read(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    write_point(repo, "web01", 0, [("Hard disk 1", write_disk(repo, [chunk("a"), chunk("b")]))])
    progress = Progress(io.StringIO(), tty=False)
    items: list[DiskProgress] = []
    make = progress.disk

    def disk(vm: str, disk: str, total: int) -> DiskProgress:
        items.append(make(vm, disk, total))
        return items[-1]

    monkeypatch.setattr(progress, "disk", disk)
    report = verify_repository(repo, progress=progress)
    [item] = items
    assert item.total == 3 * MiB and item.position == 3 * MiB and item.finished is not None
    assert item.received == report.bytes_read


def test_point_labels_are_in_utc() -> None:
    tokyo = timezone(timedelta(hours=9))
    point = RestorePoint(
        id="20261120T020000000000Z-0000beef",
        policy="p",
        vm=VmRef('ファイル鯖 "q" $(x)', "u", "h", "1"),
        started=T0,
        snapshot_time=T0.astimezone(tokyo),
        finished=T0,
        status="success",
        mode="full",
        config_revision="r",
    )
    assert point_label(point) == 'ファイル鯖 "q" $(x)@2026-11-20T02:00Z'


def test_repository_check_is_verify(repo: Repository) -> None:
    data = chunk("a")
    write_point(repo, "web01", 0, [("Hard disk 1", write_disk(repo, [data]))])
    path = repo.path / chunk_name(repo.chunk_id(data))
    path.write_bytes(path.read_bytes()[:-1])
    assert verify_repository(repo, read_data_percent=0).ok
    assert [p.kind for p in verify_repository(repo).problems] == ["chunk-damaged"]
