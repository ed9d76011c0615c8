"""The Repository facade: round trips, dedup, holes, keys, integrity, point visibility, check."""

from __future__ import annotations

import json
import os
import random
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.repository import (
    CHUNK_SIZE,
    HOLE,
    DigestMap,
    FormatError,
    IntegrityError,
    KdfParams,
    MissingObjectError,
    ProtectedPointError,
    Repository,
    RepositoryError,
    WrongKeyError,
    export_key,
    import_key,
)
from reconciler.repository.chunks import chunk_name
from reconciler.repository.verify import verify_repository

FAST_KDF = KdfParams(memory_kib=64, iterations=1, lanes=1)
PASSPHRASE = "correct horse battery staple"
MiB = CHUNK_SIZE


@pytest.fixture(params=["plain", "encrypted"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Repository:
    if request.param == "plain":
        return Repository.init(tmp_path / "repo")
    return Repository.init(tmp_path / "repo", PASSPHRASE, kdf=FAST_KDF)


def reopen(repo: Repository) -> Repository:
    return Repository.open(repo.path, PASSPHRASE if repo.encrypted else None)


def disk_image(seed: int, chunks: int) -> bytearray:
    """A disk: random chunks, text chunks, zero chunks."""
    rng = random.Random(seed)
    image = bytearray(chunks * MiB)
    for i in range(chunks):
        kind = i % 3
        if kind == 0:
            image[i * MiB : (i + 1) * MiB] = rng.randbytes(MiB)
        elif kind == 1:
            image[i * MiB : (i + 1) * MiB] = (f"chunk {i} seed {seed} " * 60000).encode()[:MiB]
    return image


def backup(repo: Repository, image: bytes | bytearray, base: str | None = None) -> str:
    writer = repo.chunk_writer(len(image), base=repo.read_index(base) if base else None)
    for offset in range(0, len(image), MiB):
        writer.write(offset, memoryview(image)[offset : offset + MiB])
    return writer.finish()


def restore(repo: Repository, index_id: str) -> bytes:
    index = repo.read_index(index_id)
    return b"".join(repo.read_chunk(cid)[: index.chunk_length(i)] for i, cid in enumerate(index))


def make_point(repo: Repository, index_id: str, vm: str = "web01", protected: bool = False) -> RestorePoint:
    now = datetime.now(timezone.utc)
    vmx = repo.write_file("web01.vmx", b'displayName = "web01"\n')
    capacity = repo.read_index(index_id).capacity
    point = RestorePoint(
        id=new_point_id(now),
        policy="nightly",
        vm=VmRef(vm, f"uuid-{vm}", "esxi1", "1"),
        started=now,
        snapshot_time=now,
        finished=now,
        status="success",
        mode="full",
        config_revision="git:abc",
        protected=protected,
        files=(vmx,),
        disks=(DiskRecord(2000, "Hard disk 1", "[ds1] x.vmdk", capacity, index_id),),
    )
    repo.write_point(point)
    return point


class TestRoundTrip:
    def test_disk_round_trip_through_a_reopened_repository(self, repo: Repository) -> None:
        image = disk_image(1, 7) + b"tail"  # capacity not a multiple of the chunk size
        index_id = backup(repo, image)
        assert restore(reopen(repo), index_id) == image

    def test_zero_chunks_are_holes_and_not_stored(self, repo: Repository) -> None:
        writer = repo.chunk_writer(4 * MiB)
        for offset in range(0, 4 * MiB, MiB):
            writer.write(offset, bytes(MiB))
        index_id = writer.finish()
        assert writer.holes == 4 and writer.bytes_stored == 0
        assert repo.stats().chunks == 0
        index = repo.read_index(index_id)
        assert list(index) == [HOLE] * 4
        assert restore(repo, index_id) == bytes(4 * MiB)

    def test_unwritten_slots_of_a_full_backup_are_holes(self, repo: Repository) -> None:
        writer = repo.chunk_writer(3 * MiB)
        writer.write(MiB, b"x" * MiB)
        index_id = writer.finish()
        assert restore(repo, index_id) == bytes(MiB) + b"x" * MiB + bytes(MiB)

    def test_dedup_across_two_disks_and_points(self, repo: Repository) -> None:
        image = disk_image(2, 6)
        first = backup(repo, image)
        chunks_after_first = repo.stats().chunks
        assert chunks_after_first == 4  # 2 random + 2 text, 2 holes
        other = bytearray(image)
        other[0:10] = b"0123456789"  # one chunk differs
        second = backup(repo, other)
        assert repo.stats().chunks == chunks_after_first + 1
        assert restore(repo, second) == other and restore(repo, first) == image

    def test_incremental_from_a_base_index(self, repo: Repository) -> None:
        image = disk_image(3, 5)
        base = backup(repo, image)
        changed = bytearray(image)
        changed[2 * MiB + 100 : 2 * MiB + 104] = b"WXYZ"
        writer = repo.chunk_writer(len(changed), base=repo.read_index(base))
        writer.write(2 * MiB, memoryview(changed)[2 * MiB : 3 * MiB])  # only the changed chunk
        index_id = writer.finish()
        assert writer.new_chunks == 1 and writer.bytes_written == MiB
        assert restore(repo, index_id) == changed

    def test_base_of_another_size_is_refused(self, repo: Repository) -> None:
        base = repo.read_index(backup(repo, disk_image(4, 2)))
        with pytest.raises(ValueError, match="a full read is needed"):
            repo.chunk_writer(3 * MiB, base=base)

    def test_misaligned_or_wrong_length_writes_are_refused(self, repo: Repository) -> None:
        writer = repo.chunk_writer(2 * MiB + 10)
        with pytest.raises(ValueError, match="not aligned"):
            writer.write(100, b"x")
        with pytest.raises(ValueError, match="must be 1048576 bytes"):
            writer.write(0, b"x")
        writer.write(2 * MiB, b"y" * 10)

    def test_digest_map_is_stored_and_referenced(self, repo: Repository) -> None:
        writer = repo.chunk_writer(3 * MiB)
        writer.write(0, b"z" * MiB)
        dm = DigestMap("sha1", 65536, 3 * MiB, 20, os.urandom(48 * 20))
        index = repo.read_index(writer.finish(dm))
        assert index.digest_map is not None
        assert repo.read_digest_map(index.digest_map.hex()) == dm

    def test_concurrent_writers_of_different_disks(self, repo: Repository) -> None:
        images = [disk_image(10 + i, 6) for i in range(4)]
        results: dict[int, str] = {}

        def run(i: int) -> None:
            results[i] = backup(repo, images[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, image in enumerate(images):
            assert restore(repo, results[i]) == image

    def test_one_writer_from_many_threads(self, repo: Repository) -> None:
        image = disk_image(20, 8)
        writer = repo.chunk_writer(len(image))
        offsets = list(range(0, len(image), MiB))
        threads = [
            threading.Thread(target=writer.write, args=(o, bytes(image[o : o + MiB]))) for o in offsets
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert restore(repo, writer.finish()) == image

    def test_config_files_round_trip(self, repo: Repository) -> None:
        data = os.urandom(MiB + 123)
        stored = repo.write_file("x.nvram", data)
        repo.flush()
        assert len(stored.chunks) == 2 and repo.read_file(stored) == data


class TestKeys:
    def test_wrong_passphrase_is_a_clear_error(self, tmp_path: Path) -> None:
        repo = Repository.init(tmp_path / "r", PASSPHRASE, kdf=FAST_KDF)
        with pytest.raises(
            WrongKeyError,
            match=f"wrong passphrase: it opens none of the repository's keys \\({repo.key_id}\\)",
        ):
            Repository.open(tmp_path / "r", "not the passphrase")

    def test_reopening_in_one_process_still_checks_the_passphrase(self, tmp_path: Path) -> None:
        """Derived keys are reused within a process (a daemon opens a repository every cycle); a wrong
        passphrase, or the old one after a change, is refused all the same."""
        repo = Repository.init(tmp_path / "r", PASSPHRASE, kdf=FAST_KDF)
        for _ in range(2):
            assert Repository.open(tmp_path / "r", PASSPHRASE).key_id == repo.key_id
            with pytest.raises(WrongKeyError):
                Repository.open(tmp_path / "r", PASSPHRASE + " ")
        opened = Repository.open(tmp_path / "r", PASSPHRASE)
        new_id = opened.change_passphrase(PASSPHRASE, "new one", kdf=FAST_KDF).key_id
        assert Repository.open(tmp_path / "r", "new one").key_id == new_id
        with pytest.raises(WrongKeyError):
            Repository.open(tmp_path / "r", PASSPHRASE)

    def test_encrypted_repository_needs_a_passphrase(self, tmp_path: Path) -> None:
        Repository.init(tmp_path / "r", PASSPHRASE, kdf=FAST_KDF)
        with pytest.raises(WrongKeyError, match="passphrase is required"):
            Repository.open(tmp_path / "r")

    def test_config_edited_to_plaintext_is_refused(self, tmp_path: Path) -> None:
        Repository.init(tmp_path / "r", PASSPHRASE, kdf=FAST_KDF)
        config = json.loads((tmp_path / "r/config").read_text())
        config["encryption"] = "none"
        (tmp_path / "r/config").write_text(json.dumps(config))
        with pytest.raises(RepositoryError, match="key files exist"):
            Repository.open(tmp_path / "r")

    def test_expect_encrypted_guard(self, tmp_path: Path) -> None:
        Repository.init(tmp_path / "r")
        with pytest.raises(RepositoryError, match="is not encrypted, but the configuration"):
            Repository.open(tmp_path / "r", expect_encrypted=True)
        with pytest.raises(RepositoryError, match="passphrase was given"):
            Repository.open(tmp_path / "r", PASSPHRASE)

    def test_key_file_records_argon2id_parameters(self, tmp_path: Path) -> None:
        repo = Repository.init(tmp_path / "r", PASSPHRASE, kdf=FAST_KDF)
        doc = json.loads((tmp_path / f"r/keys/{repo.key_id}.json").read_text())
        assert doc["version"] == 1
        assert doc["kdf"] | {"salt": None} == {
            "algorithm": "argon2id",
            "salt": None,
            "memory_kib": 64,
            "iterations": 1,
            "lanes": 1,
        }
        assert PASSPHRASE not in json.dumps(doc)

    def test_default_kdf_is_memory_hard(self) -> None:
        assert KdfParams().memory_kib >= 64 * 1024

    def test_several_threads_open_one_repository_at_once(self, tmp_path: Path) -> None:
        """The daemon opens a repository for several hosts' backups in parallel: two Argon2id
        derivations at once used to deadlock inside cryptography (default parameters, lanes > 1)."""
        Repository.init(tmp_path / "r", "pw", kdf=KdfParams(memory_kib=8 * 1024, iterations=1, lanes=4))
        opened: list[str] = []
        threads = [
            threading.Thread(
                target=lambda: opened.append(Repository.open(tmp_path / "r", "pw").id), daemon=True
            )
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "opening the repository deadlocked"
        assert len(opened) == 3 and len(set(opened)) == 1

    def test_unknown_key_file_version_is_rejected(self, tmp_path: Path) -> None:
        repo = Repository.init(tmp_path / "r", PASSPHRASE, kdf=FAST_KDF)
        path = tmp_path / f"r/keys/{repo.key_id}.json"
        doc = json.loads(path.read_text())
        doc["version"] = 2
        path.write_text(json.dumps(doc))
        with pytest.raises(FormatError, match="unsupported key file version 2"):
            Repository.open(tmp_path / "r", PASSPHRASE)

    def test_unknown_config_version_is_rejected(self, tmp_path: Path) -> None:
        Repository.init(tmp_path / "r")
        config = json.loads((tmp_path / "r/config").read_text())
        config["version"] = 3
        (tmp_path / "r/config").write_text(json.dumps(config))
        with pytest.raises(FormatError, match="unsupported repository version 3"):
            Repository.open(tmp_path / "r")

    def test_change_passphrase(self, tmp_path: Path) -> None:
        repo = Repository.init(tmp_path / "r", PASSPHRASE, kdf=FAST_KDF)
        index_id = backup(repo, disk_image(5, 2))
        repo.change_passphrase(PASSPHRASE, "new one", FAST_KDF)
        with pytest.raises(WrongKeyError):
            Repository.open(tmp_path / "r", PASSPHRASE)
        again = Repository.open(tmp_path / "r", "new one")
        assert restore(again, index_id) == disk_image(5, 2)

    def test_export_and_import_key(self, tmp_path: Path) -> None:
        repo = Repository.init(tmp_path / "r", PASSPHRASE, kdf=FAST_KDF)
        exported = export_key(tmp_path / "r")
        (tmp_path / f"r/keys/{repo.key_id}.json").unlink()
        with pytest.raises(WrongKeyError, match="no key file"):
            Repository.open(tmp_path / "r", PASSPHRASE)
        with pytest.raises(WrongKeyError, match="wrong passphrase"):
            import_key(tmp_path / "r", exported, "wrong")
        assert import_key(tmp_path / "r", exported, PASSPHRASE) == repo.key_id
        assert Repository.open(tmp_path / "r", PASSPHRASE).id == repo.id

    def test_key_of_another_repository_is_refused(self, tmp_path: Path) -> None:
        Repository.init(tmp_path / "a", PASSPHRASE, kdf=FAST_KDF)
        Repository.init(tmp_path / "b", PASSPHRASE, kdf=FAST_KDF)
        with pytest.raises(RepositoryError, match="belongs to repository"):
            import_key(tmp_path / "b", export_key(tmp_path / "a"), PASSPHRASE)

    def test_secrets_never_in_repr_or_errors(self, tmp_path: Path) -> None:
        repo = Repository.init(tmp_path / "r", PASSPHRASE, kdf=FAST_KDF)
        texts = [repr(repo), repr(repo.codec), repr(repo.codec.key), repr(repo.lock())]
        with pytest.raises(WrongKeyError) as err:
            Repository.open(tmp_path / "r", PASSPHRASE + "x")
        texts.append(str(err.value))
        assert repo.codec.key is not None
        material = repo.codec.key.material
        for text in texts:
            assert PASSPHRASE not in text
            assert material.hex() not in text and material[:32].hex() not in text
        assert "hidden" in repr(repo.codec.key)


class TestIntegrity:
    def test_flipped_byte_in_a_chunk_names_the_chunk(self, repo: Repository) -> None:
        index_id = backup(repo, disk_image(6, 3))
        cid = repo.read_index(index_id)[0]
        path = repo.path / chunk_name(cid)
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        path.write_bytes(bytes(blob))
        with pytest.raises(IntegrityError) as err:
            repo.read_chunk(cid)
        assert err.value.name == chunk_name(cid)
        assert cid.hex() in str(err.value)

    def test_truncated_index_is_an_error(self, repo: Repository) -> None:
        index_id = backup(repo, disk_image(7, 3))
        path = repo.path / "indexes" / index_id
        path.write_bytes(path.read_bytes()[:-5])
        with pytest.raises(FormatError, match=f"indexes/{index_id}"):
            repo.read_index(index_id)

    def test_missing_chunk(self, repo: Repository) -> None:
        with pytest.raises(MissingObjectError, match="does not exist"):
            repo.read_chunk(b"\x01" * 32)


class TestPoints:
    def test_listed_points_round_trip(self, repo: Repository) -> None:
        point = make_point(repo, backup(repo, disk_image(8, 2)))
        listed = reopen(repo).list_points()
        assert listed == [point]
        assert reopen(repo).read_file(listed[0].files[0]) == b'displayName = "web01"\n'

    def test_filter_and_order(self, repo: Repository) -> None:
        index_id = backup(repo, disk_image(9, 1))
        a = make_point(repo, index_id, vm="a")
        b = make_point(repo, index_id, vm="b")
        assert [p.id for p in repo.list_points()] == sorted([a.id, b.id])
        assert repo.list_points(vm="b") == [b]
        assert repo.list_points(policy="other") == []

    def test_half_written_point_is_never_listed(self, repo: Repository) -> None:
        backup(repo, disk_image(10, 2))  # chunks + index, no manifest
        (repo.path / "tmp" / "deadbeef").write_bytes(b"partial manifest")
        assert repo.list_points() == []
        assert verify_repository(repo).ok

    def test_delete_point_and_protection(self, repo: Repository) -> None:
        index_id = backup(repo, disk_image(11, 1))
        keep = make_point(repo, index_id, protected=True)
        drop = make_point(repo, index_id)
        repo.delete_point(drop.id)
        with pytest.raises(ProtectedPointError, match=keep.id):
            repo.delete_point(keep.id)
        repo.set_protected(keep.id, False)
        repo.delete_point(keep.id)
        assert repo.list_points() == []

    def test_tampered_manifest_is_detected(self, repo: Repository) -> None:
        point = make_point(repo, backup(repo, disk_image(12, 1)))
        path = repo.path / point.name
        blob = bytearray(path.read_bytes())
        blob[12] ^= 0x10
        path.write_bytes(bytes(blob))
        with pytest.raises(FormatError, match=point.name):
            repo.read_point(point.id)


class TestCheck:
    def test_every_chunk_of_every_listed_point_exists_and_authenticates(self, repo: Repository) -> None:
        index_id = backup(repo, disk_image(13, 6))
        make_point(repo, index_id)
        report = verify_repository(repo)
        assert report.ok, report.problems
        assert report.points == 1 and report.chunks == 5  # 4 disk chunks + the .vmx

    def test_check_reports_damaged_and_missing_chunks(self, repo: Repository) -> None:
        index_id = backup(repo, disk_image(14, 6))
        make_point(repo, index_id)
        index = repo.read_index(index_id)
        damaged, missing = index[0], index[1]
        path = repo.path / chunk_name(damaged)
        path.write_bytes(path.read_bytes()[:-1] + b"\x00")
        (repo.path / chunk_name(missing)).unlink()
        report = verify_repository(repo)
        assert not report.ok
        assert any(p.object == chunk_name(damaged) for p in report.problems)
        assert any(p.object == chunk_name(missing) for p in report.problems)
        quick = verify_repository(repo, read_data_percent=0)
        assert [p for p in quick.problems if p.object == chunk_name(missing)]
        assert not [p for p in quick.problems if p.object == chunk_name(damaged)]

    def test_check_reports_a_missing_index(self, repo: Repository) -> None:
        index_id = backup(repo, disk_image(15, 1))
        make_point(repo, index_id)
        (repo.path / "indexes" / index_id).unlink()
        report = verify_repository(repo)
        assert any(p.object == f"indexes/{index_id}" for p in report.problems)


def test_init_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "file").write_text("x")
    with pytest.raises(RepositoryError, match="not empty"):
        Repository.init(tmp_path / "r")
    with pytest.raises(RepositoryError, match="not a repository"):
        Repository.open(tmp_path / "r")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.integers(min_value=0, max_value=3 * MiB + 17),
    writes=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["zero", "byte", "random"])), max_size=6),
    encrypted=st.booleans(),
)
def test_random_incremental_writes_restore_exactly(
    capacity: int, writes: list[tuple[int, str]], encrypted: bool
) -> None:
    """Full backup of a random disk, then an incremental rewriting some chunks: both restore exactly."""
    rng = random.Random(capacity)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Repository.init(Path(tmp) / "r", PASSPHRASE if encrypted else None, kdf=FAST_KDF)
        image = bytearray(rng.randbytes(capacity))
        first = backup(repo, image)
        index = repo.read_index(first)
        writer = repo.chunk_writer(capacity, base=index)
        for slot, kind in writes:
            if slot >= index.count:
                continue
            length = index.chunk_length(slot)
            data = {"zero": bytes(length), "byte": b"\x07" * length, "random": rng.randbytes(length)}[kind]
            image[slot * MiB : slot * MiB + length] = data
            writer.write(slot * MiB, data)
        second = writer.finish()
        assert restore(repo, second) == image
        assert verify_repository(repo).ok


def test_stats(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r")
    make_point(repo, backup(repo, disk_image(30, 3)))
    stats = repo.stats()
    assert (stats.points, stats.chunks, stats.indexes, stats.digest_maps) == (1, 3, 1, 0)
    assert stats.chunk_bytes > MiB
