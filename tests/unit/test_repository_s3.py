"""S3Backend against a real S3 protocol server (moto's server mode, or ``S3_TEST_ENDPOINT``, e.g. the Ceph
RGW of ``make test-ceph``): put-if-absent, deferred uploads, multipart and ranged reads, retries on
throttling and 5xx, dropped connections, interrupted multipart uploads, one-line errors, and a whole
repository (init, backup-like writes, read back, verify, GC) on object storage."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest

from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.repository import (
    MissingObjectError,
    NotARepositoryError,
    Repository,
    RepositoryError,
    RepositoryLock,
    StorageError,
    collect_garbage,
    verify_repository,
)
from reconciler.repository.errors import LockedError, ObjectStoreUnavailable
from reconciler.repository.s3 import S3Backend
from tests.s3server import Fault, FaultProxy, S3Server

MiB = 1024 * 1024
MOTO_ONLY = pytest.mark.skipif(
    bool(os.environ.get("S3_TEST_ENDPOINT")), reason="fault injection needs the test proxy in front of moto"
)


def _data(seed: int, size: int = MiB) -> bytes:
    return (seed.to_bytes(4, "little") * (size // 4 + 1))[:size]


# -- the object protocol -----------------------------------------------------------------------------


def test_put_is_if_absent_and_replace_overwrites(s3_server: S3Server, s3_bucket: str) -> None:
    backend = s3_server.backend(s3_bucket)
    assert backend.put("points/a", [b"first"]) is True
    assert backend.put("points/a", [b"second"]) is False
    assert backend.get("points/a") == b"first"
    backend.replace("locks/l.json", [b"1"])
    backend.replace("locks/l.json", [b"2"])
    assert backend.get("locks/l.json") == b"2"
    assert backend.stat("points/a").size == 5


def test_missing_objects_listing_and_delete(s3_server: S3Server, s3_bucket: str) -> None:
    backend = s3_server.backend(s3_bucket, prefix="site-a/repo")
    other = s3_server.backend(s3_bucket, prefix="site-a/repo2")
    with pytest.raises(MissingObjectError):
        backend.get("points/nothing")
    with pytest.raises(MissingObjectError):
        backend.stat("points/nothing")
    assert not backend.exists("points/nothing")
    for name in ("chunks/ab/ab01", "chunks/cd/cd02", "indexes/x"):
        backend.put(name, [b"x"])
    other.put("chunks/ab/ab03", [b"y"])
    assert sorted(backend.list("chunks")) == ["chunks/ab/ab01", "chunks/cd/cd02"]
    assert list(other.list("chunks")) == ["chunks/ab/ab03"]  # the prefix separates repositories
    backend.delete("indexes/x")
    backend.delete("indexes/x")  # absent: ignored
    assert list(backend.list("indexes")) == []
    with pytest.raises(ValueError):
        backend.get("../escape")


def test_deferred_uploads_are_visible_after_flush(s3_server: S3Server, s3_bucket: str) -> None:
    backend = s3_server.backend(s3_bucket, max_inflight_bytes=3 * MiB)
    names = [f"chunks/{i:02x}/{i:064x}" for i in range(12)]
    for i, name in enumerate(names):
        assert backend.put_deferred(name, [_data(i)]) is True
        assert backend.exists(name)  # queued counts as present (dedup within the run)
        assert backend.put_deferred(name, [_data(i)]) is False
    backend.flush()
    fresh = s3_server.backend(s3_bucket)
    for i, name in enumerate(names):
        assert fresh.get(name) == _data(i)
    backend.close()


def test_multipart_upload_and_ranged_reads(s3_server: S3Server, s3_bucket: str) -> None:
    backend = s3_server.backend(s3_bucket, part_size=5 * MiB, multipart_threshold=5 * MiB)
    big = os.urandom(12 * MiB + 123)
    assert backend.put("indexes/big", [big[: 3 * MiB], big[3 * MiB :]]) is True
    assert backend.put("indexes/big", [b"other"]) is False
    assert backend.get("indexes/big") == big
    assert backend.stat("indexes/big").size == len(big)
    assert backend.incomplete_uploads() == []


@MOTO_ONLY
def test_multipart_parts_and_ranges_go_in_parallel_requests(
    s3_server: S3Server, s3_bucket: str, s3_faults: tuple[FaultProxy, str]
) -> None:
    proxy, endpoint = s3_faults
    backend = s3_server.backend(s3_bucket, endpoint=endpoint, part_size=5 * MiB, multipart_threshold=5 * MiB)
    big = os.urandom(11 * MiB)
    backend.put("indexes/big", [big])
    parts = [p for m, p, _ in proxy.log if m == "PUT" and "partNumber=" in p]
    assert len(parts) == 3
    proxy.log.clear()
    assert backend.get("indexes/big") == big
    assert len([p for m, p, _ in proxy.log if m == "GET"]) == 3


# -- faults ------------------------------------------------------------------------------------------


@MOTO_ONLY
def test_throttling_and_server_errors_are_retried(
    s3_server: S3Server, s3_bucket: str, s3_faults: tuple[FaultProxy, str]
) -> None:
    proxy, endpoint = s3_faults
    backend = s3_server.backend(s3_bucket, endpoint=endpoint)
    slow = proxy.inject(Fault("PUT", r"/chunks/", times=3, status=503, code="SlowDown"))
    for i in range(4):
        backend.put_deferred(f"chunks/{i:02x}/{i:064x}", [_data(i)])
    backend.flush()
    assert slow.hits == 3
    broken = proxy.inject(Fault("GET", r"/chunks/", times=2, status=500, code="InternalError"))
    dropped = proxy.inject(Fault("GET", r"/chunks/", times=1, drop=True))
    assert backend.get(f"chunks/01/{1:064x}") == _data(1)
    assert broken.hits == 2
    assert dropped.hits == 1
    many = proxy.inject(Fault("PUT", r"/points/", times=4, status=429, code="TooManyRequests"))
    assert backend.put("points/p1", [b"manifest"]) is True
    assert many.hits == 4


@MOTO_ONLY
def test_an_upload_that_keeps_failing_poisons_the_backend(
    s3_server: S3Server, s3_bucket: str, s3_faults: tuple[FaultProxy, str]
) -> None:
    proxy, endpoint = s3_faults
    backend = s3_server.backend(s3_bucket, endpoint=endpoint, max_attempts=3)
    proxy.inject(Fault("PUT", r"/chunks/", times=100, status=503, code="SlowDown"))
    backend.put_deferred(f"chunks/00/{0:064x}", [_data(0)])
    with pytest.raises(ObjectStoreUnavailable) as failed:
        backend.flush()
    message = str(failed.value)
    assert "\n" not in message
    assert "SlowDown" in message
    assert "after 3 attempts" in message
    proxy.clear()
    with pytest.raises(ObjectStoreUnavailable):  # no index or manifest may follow a lost chunk
        backend.put_deferred(f"chunks/01/{1:064x}", [_data(1)])
    with pytest.raises(ObjectStoreUnavailable):
        backend.flush()


@MOTO_ONLY
def test_refusals_are_one_line_storage_errors(
    s3_server: S3Server, s3_bucket: str, s3_faults: tuple[FaultProxy, str]
) -> None:
    proxy, endpoint = s3_faults
    backend = S3Backend(s3_server.location(s3_bucket, endpoint=endpoint), label="offsite")
    proxy.inject(Fault("PUT", r"/points/", times=1, status=403, code="AccessDenied"))
    with pytest.raises(StorageError) as denied:
        backend.put("points/p", [b"x"])
    assert str(denied.value).startswith("repository offsite (s3://")
    assert "access denied writing a restore point manifest" in str(denied.value)
    assert "backend.credentials" in str(denied.value)
    proxy.inject(Fault("PUT", r"/chunks/", times=1, status=403, code="QuotaExceeded"))
    with pytest.raises(StorageError, match="refuses more data"):
        backend.put("chunks/00/00", [b"x"])
    missing = S3Backend(s3_server.location("no-such-bucket-here", endpoint=endpoint), label="offsite")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        missing.put("points/p", [b"x"])


def test_an_unreachable_endpoint_is_one_line(s3_server: S3Server, s3_bucket: str) -> None:
    from tests.s3server import free_port

    backend = s3_server.backend(
        s3_bucket, endpoint=f"http://127.0.0.1:{free_port()}", max_attempts=2, connect_timeout=1
    )
    with pytest.raises(ObjectStoreUnavailable) as failed:
        backend.get("config")
    assert "cannot reach the object store" in str(failed.value)
    assert "\n" not in str(failed.value)


@MOTO_ONLY
def test_an_interrupted_multipart_upload_stays_invisible_and_is_aborted(
    s3_server: S3Server, s3_bucket: str, s3_faults: tuple[FaultProxy, str]
) -> None:
    proxy, endpoint = s3_faults
    backend = s3_server.backend(
        s3_bucket, endpoint=endpoint, part_size=5 * MiB, multipart_threshold=5 * MiB, max_attempts=2
    )
    # the completion never gets through: the writer gives up and aborts its upload
    proxy.inject(Fault("POST", r"uploadId=", times=10, drop=True))
    with pytest.raises(ObjectStoreUnavailable):
        backend.put("indexes/big", [os.urandom(11 * MiB)])
    assert not backend.exists("indexes/big")
    assert backend.incomplete_uploads() == []
    proxy.clear()
    # a writer killed half-way cannot abort: its upload stays, invisible, until GC aborts it
    client = s3_server.client()
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key="repo/indexes/killed")["UploadId"]
    client.upload_part(
        Bucket=s3_bucket, Key="repo/indexes/killed", UploadId=upload, PartNumber=1, Body=b"x" * 5 * MiB
    )
    assert not backend.exists("indexes/killed")
    assert [(n, u) for n, u, _ in backend.incomplete_uploads()] == [("indexes/killed", upload)]


# -- a whole repository on object storage -------------------------------------------------------------


def _point(repo: Repository, vm: str, seed: int, chunks: int = 3) -> RestorePoint:
    writer = repo.chunk_writer(chunks * MiB)
    for slot in range(chunks):
        writer.write(slot * MiB, _data(seed + slot))
    index = writer.finish()
    now = datetime.now(timezone.utc)
    point = RestorePoint(
        id=new_point_id(now),
        policy="nightly",
        vm=VmRef(vm, f"uuid-{vm}", "esxi1", "1"),
        started=now,
        snapshot_time=now,
        finished=now,
        status="success",
        mode="full",
        config_revision="r",
        files=(repo.write_file(f"{vm}.vmx", vm.encode()),),
        disks=(DiskRecord(2000, "Hard disk 1", "x", chunks * MiB, index),),
    )
    repo.write_point(point)
    return point


def test_a_repository_on_s3_round_trips_and_verifies(s3_server: S3Server, s3_bucket: str) -> None:
    repo = Repository.init(s3_server.backend(s3_bucket), "pass phrase")
    with repo.lock(purpose="backup"):
        point = _point(repo, "web01", 1)
    again = Repository.open(S3Backend(s3_server.location(s3_bucket), label="offsite"), "pass phrase")
    assert [p.id for p in again.list_points()] == [point.id]
    index = again.read_index(point.disks[0].index)
    assert again.read_chunk(index[1]) == _data(2)
    report = verify_repository(again)
    assert report.ok, report.problems
    assert "s3://" in again.location
    with pytest.raises(RepositoryError, match="objects exist"):
        Repository.init(s3_server.backend(s3_bucket), "pass phrase")


def test_opening_an_empty_prefix_says_not_a_repository(s3_server: S3Server, s3_bucket: str) -> None:
    backend = S3Backend(s3_server.location(s3_bucket, prefix="nothing/here"), label="offsite")
    with pytest.raises(NotARepositoryError) as failed:
        Repository.open(backend, None, label="offsite")
    assert "nothing is stored under that prefix" in str(failed.value)
    assert "repo init offsite" in str(failed.value)
    assert list(backend.list_any()) == []  # nothing was written


def test_gc_on_s3_sweeps_garbage_and_aborts_interrupted_uploads(s3_server: S3Server, s3_bucket: str) -> None:
    repo = Repository.init(s3_server.backend(s3_bucket), None)
    with repo.lock(purpose="backup"):
        keep = _point(repo, "web01", 10)
        gone = _point(repo, "web02", 20)
    repo.delete_point(gone.id)
    client = s3_server.client()
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key="repo/indexes/killed")["UploadId"]
    report = collect_garbage(repo)
    assert report.unreferenced_chunks == 4  # three of the disk, one of the .vmx
    assert report.aborted_uploads == 1
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    del upload
    assert verify_repository(repo).ok
    assert [p.id for p in repo.list_points()] == [keep.id]


def test_locks_on_s3_conflict_across_hosts_and_use_the_store_clock(
    s3_server: S3Server, s3_bucket: str
) -> None:
    Repository.init(s3_server.backend(s3_bucket), None)
    site_a = s3_server.backend(s3_bucket)
    site_b = s3_server.backend(s3_bucket)
    backup = RepositoryLock(site_a, exclusive=False, purpose="backup", host="nas-a", pid=100)
    backup.acquire()
    gc = RepositoryLock(site_b, exclusive=True, purpose="gc", host="nas-b", pid=100)
    with pytest.raises(LockedError, match="shared by pid 100 on nas-a"):
        gc.acquire()
    assert backup.info is not None
    assert abs((backup.info.time - site_b.now()).total_seconds()) < 120
    backup.release()
    # a lock not refreshed within the stale window (by the store's clock) does not block GC
    old = RepositoryLock(
        site_a, exclusive=False, host="nas-a", pid=101, clock=lambda: site_a.now() - timedelta(hours=1)
    )
    old.acquire()
    with gc:
        assert not site_b.exists(old.info.name if old.info else "")


# -- GC and concurrent writers ------------------------------------------------------------------------


def test_gc_never_deletes_a_chunk_a_concurrent_writer_is_about_to_reference(
    s3_server: S3Server, s3_bucket: str
) -> None:
    repo = Repository.init(s3_server.backend(s3_bucket), None)
    with repo.lock(purpose="backup"):
        old = _point(repo, "web01", 30)
    repo.delete_point(old.id)  # its chunks are garbage now...
    writer = Repository.open(s3_server.backend(s3_bucket), None)
    with writer.lock(purpose="backup web02 (site b)") as held:
        # ...but a writer at another site finds them present and skips the upload (dedup)
        new_writer = writer.chunk_writer(3 * MiB)
        for slot in range(3):
            new_writer.write(slot * MiB, _data(30 + slot))
        assert new_writer.bytes_stored == 0
        # a GC now is refused while that writer's lock is live, and deletes nothing
        with pytest.raises(LockedError, match="site b"):
            collect_garbage(Repository.open(s3_server.backend(s3_bucket), None))
        index = new_writer.finish()
        held.check()
        now = datetime.now(timezone.utc)
        kept = RestorePoint(
            id=new_point_id(now),
            policy="nightly",
            vm=VmRef("web02", "uuid-web02", "esxi2", "1"),
            started=now,
            snapshot_time=now,
            finished=now,
            status="success",
            mode="full",
            config_revision="r",
            disks=(DiskRecord(2000, "Hard disk 1", "x", 3 * MiB, index),),
        )
        writer.write_point(kept)
    report = collect_garbage(repo)
    assert report.unreferenced_chunks == 1  # the old point's .vmx only: the disk's chunks are used again
    assert verify_repository(repo, read_data_percent=100).ok


def test_gc_sweeps_nothing_when_a_writers_lock_shows_up_late(s3_server: S3Server, s3_bucket: str) -> None:
    """A store whose listing lags: the writer's lock was not listed when GC took its lock. GC lists the
    locks again after the settle window and, finding it, deletes nothing."""
    import threading

    from reconciler.repository.lock import LockInfo, list_locks

    repo = Repository.init(s3_server.backend(s3_bucket), None)
    with repo.lock(purpose="backup"):
        old = _point(repo, "web01", 40)
    repo.delete_point(old.id)
    gc_repo = Repository.open(s3_server.backend(s3_bucket, settle_seconds=3.0), None)
    failure: list[BaseException] = []

    def run_gc() -> None:
        try:
            collect_garbage(gc_repo)
        except LockedError as exc:
            failure.append(exc)

    thread = threading.Thread(target=run_gc)
    thread.start()
    backend = s3_server.backend(s3_bucket)
    for _ in range(100):
        if any(info.exclusive for info in list_locks(backend)):
            break
        thread.join(0.05)
    late = LockInfo("f" * 32, False, "site-b", 4242, backend.now(), "backup web02 (site b)")
    backend.put(late.name, [late.to_json()])  # what the writer wrote, unseen by GC's first listing
    thread.join(30)
    assert failure and "site b" in str(failure[0]) and "appeared after" in str(failure[0])
    assert sum(1 for _ in backend.list("chunks")) == 4  # nothing swept
    assert not backend.exists("gc-running.json")  # and no "interrupted GC" to report
    backend.delete(late.name)
    assert collect_garbage(repo).unreferenced_chunks == 4
