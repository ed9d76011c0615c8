"""LocalBackend: atomic put-if-absent, staged (deferred) writes and flush, listing, names."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from reconciler.directio import direct_io_fits
from reconciler.repository import LocalBackend, MissingObjectError, RepositoryError, StorageError


@pytest.fixture(params=["syncfs", "fsync"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> LocalBackend:
    for d in ("tmp", "objs", "objs/ab"):
        (tmp_path / d).mkdir()
    return LocalBackend(tmp_path, sync=request.param)


def test_put_is_if_absent_and_leaves_no_temp_files(backend: LocalBackend, tmp_path: Path) -> None:
    assert backend.put("objs/a", [b"one", memoryview(b"two")])
    assert not backend.put("objs/a", [b"other"])
    assert backend.get("objs/a") == b"onetwo"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_replace_overwrites_atomically(backend: LocalBackend) -> None:
    backend.replace("objs/a", [b"1"])
    backend.replace("objs/a", [b"2"])
    assert backend.get("objs/a") == b"2"


def test_deferred_objects_are_visible_only_after_flush(backend: LocalBackend, tmp_path: Path) -> None:
    assert backend.put_deferred("objs/ab/x", [b"chunk"])
    assert not backend.put_deferred("objs/ab/x", [b"chunk"])  # already staged: dedup
    assert backend.exists("objs/ab/x")
    assert not (tmp_path / "objs/ab/x").exists()
    assert len(list((tmp_path / "tmp").iterdir())) == 1
    backend.flush()
    assert (tmp_path / "objs/ab/x").read_bytes() == b"chunk"
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not backend.put_deferred("objs/ab/x", [b"chunk"])


def test_flush_creates_missing_parent_directories(backend: LocalBackend) -> None:
    backend.put_deferred("objs/new/y", [b"y"])
    backend.flush()
    assert backend.get("objs/new/y") == b"y"


def test_discard_pending_removes_staged_files(backend: LocalBackend, tmp_path: Path) -> None:
    backend.put_deferred("objs/ab/z", [b"z"])
    backend.discard_pending()
    backend.flush()
    assert not backend.exists("objs/ab/z")
    assert list((tmp_path / "tmp").iterdir()) == []


def test_concurrent_deferred_writes(backend: LocalBackend) -> None:
    def run(start: int) -> None:
        for i in range(start, start + 300):
            backend.put_deferred(f"objs/ab/{i % 400}", [str(i % 400).encode()])

    threads = [threading.Thread(target=run, args=(s,)) for s in (0, 100, 200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    backend.flush()
    names = sorted(backend.list("objs/ab"))
    assert len(names) == 400
    assert all(backend.get(n) == n.rpartition("/")[2].encode() for n in names)


def test_get_stat_delete_missing(backend: LocalBackend) -> None:
    with pytest.raises(MissingObjectError, match="objs/none: object does not exist"):
        backend.get("objs/none")
    with pytest.raises(MissingObjectError):
        backend.stat("objs/none")
    backend.delete("objs/none")  # no error
    assert list(backend.list("missing-dir")) == []


@pytest.mark.parametrize("name", ["", "/abs", "../up", "a/../b", "a//b", "./a"])
def test_invalid_names_are_refused(backend: LocalBackend, name: str) -> None:
    with pytest.raises(ValueError, match="invalid object name"):
        backend.get(name)


def test_a_failed_flush_poisons_the_backend(backend: LocalBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another thread's chunks may have been in the failed batch: nothing may be written after it."""
    backend.put_deferred("objs/ab/a", [b"a"])

    def broken(self: Path, target: Path) -> Path:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Path, "replace", broken)
    with pytest.raises(OSError, match="Input/output"):
        backend.flush()
    monkeypatch.undo()
    with pytest.raises(RepositoryError, match=r"could not be made durable .*Input/output"):
        backend.flush()
    with pytest.raises(RepositoryError, match="reopen the repository"):
        backend.put_deferred("objs/ab/b", [b"b"])
    assert list((backend.root / "tmp").iterdir()) == []  # the failed batch left no staged file


def test_a_full_volume_poisons_the_backend_with_its_one_line_reason(
    backend: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The volume refusing a write is said the same way by every later write: repository, cause, fix."""
    backend.label = "nas"
    backend.put_deferred("objs/ab/a", [b"a"])

    def full(self: Path, target: Path) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "replace", full)
    with pytest.raises(StorageError) as first:
        backend.flush()
    monkeypatch.undo()
    message = str(first.value)
    assert message.startswith(f"repository nas ({backend.root}): the volume is full: no space left")
    assert "free of" in message and "esxi-reconciler repo gc nas" in message and "\n" not in message
    assert isinstance(first.value.__cause__, OSError) and first.value.errno == errno.ENOSPC
    with pytest.raises(StorageError) as later:
        backend.put_deferred("objs/ab/b", [b"b"])
    assert str(later.value) == message
    assert list((backend.root / "tmp").iterdir()) == []


def _cached_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip())


@pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux fincore is missing")
def test_chunks_bypass_the_page_cache_on_a_local_disk_filesystem(tmp_path: Path) -> None:
    """A full backup writes the whole disk's chunks once: through the page cache it would evict what the
    NAS had cached and cost a kernel copy per byte. Whole blocks are written with O_DIRECT, the tail
    (here 123 bytes) through the cache; the object reads back exactly; a small one takes the ordinary way."""
    if not direct_io_fits(tmp_path):
        pytest.skip(f"{tmp_path} is not on a local disk filesystem")
    for d in ("tmp", "objs", "objs/ab"):
        (tmp_path / d).mkdir()
    backend = LocalBackend(tmp_path, sync="syncfs")  # chunks are staged, then made durable by syncfs
    big = os.urandom(4 * (1 << 20) + 123)
    small = os.urandom(1000)
    assert backend.put_deferred("objs/ab/big", [big[:100], big[100:]])
    assert backend.put_deferred("objs/ab/small", [small])
    backend.flush()
    assert _cached_bytes(tmp_path / "objs" / "ab" / "big") <= 8192  # the tail's page, at most
    assert _cached_bytes(tmp_path / "objs" / "ab" / "small") == 4096  # one page: it went through the cache
    assert backend.get("objs/ab/big") == big
    assert backend.get("objs/ab/small") == small
