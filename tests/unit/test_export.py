"""Export without a host: a point with holes, a partial last chunk and a hostile name, written as raw
images, monolithicFlat and streamOptimized VMDKs; digests equal the point's content, holes stay file
holes, descriptors parse with the project's parser, the streamOptimized file reads back through its
grain directory and a damaged one is refused."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reconciler.directio import DIRECT_FILESYSTEMS, filesystem_type
from reconciler.esxi.vmdk import Descriptor, flat_descriptor
from reconciler.esxi.vmx import VmxFile
from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.operations import vmdkstream
from reconciler.operations.export import ImageWriter, export_point
from reconciler.operations.restore import RestoreError, disk_content, disk_sha256, find_point
from reconciler.repository import CHUNK_SIZE, Repository

MiB = CHUNK_SIZE
NAME = 'ファイル鯖 "q" $(x)'
VMX = f"""\
.encoding = "UTF-8"
displayName = "{NAME.replace('"', "|22")}"
nvram = "vm.nvram"
uuid.bios = "56 4d 00 11 22 33 44 55-66 77 88 99 aa bb cc dd"
ctkEnabled = "TRUE"
scsi0.present = "TRUE"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "vm.vmdk"
scsi0:0.ctkEnabled = "TRUE"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "vm_1.vmdk"
ethernet0.present = "TRUE"
ethernet0.generatedAddress = "00:0c:29:aa:bb:cc"
"""


def make_point(repo: Repository) -> RestorePoint:
    """Disk 1: 4 MiB + 512 bytes (data, hole, data, partial last chunk); disk 2: all holes."""
    cap1 = 4 * MiB + 512
    w = repo.chunk_writer(cap1)
    w.write(0, os.urandom(MiB))
    w.write(2 * MiB, b"\x01" * 4096 + bytes(MiB - 4096))
    w.write(4 * MiB, b"\x07" * 512)
    disk1 = w.finish()
    disk2 = repo.chunk_writer(2 * MiB).finish()
    now = datetime.now(timezone.utc)
    desc = flat_descriptor("vm-flat.vmdk", cap1, adapter="pvscsi").dumps().encode()
    point = RestorePoint(
        id=new_point_id(now),
        policy="p",
        vm=VmRef(NAME, "uuid", "h", "1"),
        started=now,
        snapshot_time=now,
        finished=now,
        status="success",
        mode="full",
        config_revision="r",
        files=(
            repo.write_file("vm.vmx", VMX.encode()),
            repo.write_file("vm.nvram", b"nvram" * 100),
            repo.write_file("vm.vmdk", desc),
        ),
        disks=(
            DiskRecord(2000, "Hard disk 1", "[ds] vm/vm.vmdk", cap1, disk1),
            DiskRecord(2001, "Hard disk 2", "[ds] vm/vm_1.vmdk", 2 * MiB, disk2),
        ),
    )
    repo.write_point(point)
    return point


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


def sha_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_raw_export_digests_and_holes(repo: Repository, tmp_path: Path) -> None:
    point = make_point(repo)
    out = tmp_path / "out"
    result = export_point(repo, point, out, "raw")
    assert sorted(p.name for p in out.iterdir()) == ["vm.img", "vm.nvram", "vm.vmx", "vm_1.img"]
    for disk, exported in zip(point.disks, result.disks, strict=True):
        assert exported.sha256 == disk_sha256(repo, disk) == sha_file(exported.path)
        assert exported.path.stat().st_size == disk.capacity
    assert (out / "vm.img").read_bytes() == disk_content(repo, point, 2000)
    assert (out / "vm_1.img").stat().st_blocks == 0  # an all-hole disk allocates nothing
    assert (out / "vm.img").stat().st_blocks * 512 < 3 * MiB  # the hole chunk is a file hole
    assert (out / "vm.vmx").read_text() == VMX
    with pytest.raises(RestoreError, match="already exists"):
        export_point(repo, point, out, "raw")


def test_monolithic_flat_export(repo: Repository, tmp_path: Path) -> None:
    point = make_point(repo)
    out = tmp_path / "out"
    export_point(repo, point, out, "vmdk")
    desc = Descriptor.parse((out / "vm.vmdk").read_text())
    assert desc.create_type == "monolithicFlat" and desc.capacity == point.disks[0].capacity
    assert desc.extents[0].type == "FLAT" and desc.extents[0].file_name == "vm-flat.vmdk"
    assert desc.ddb["ddb.adapterType"] == "pvscsi"
    assert sha_file(out / "vm-flat.vmdk") == disk_sha256(repo, point.disks[0])
    vmx = VmxFile.parse((out / "vm.vmx").read_text())
    assert vmx.get("scsi0:0.fileName") == "vm.vmdk" and vmx.get("scsi0:1.fileName") == "vm_1.vmdk"
    assert vmx.get("displayName") == NAME


def test_stream_optimized_export_reads_back(repo: Repository, tmp_path: Path) -> None:
    point = make_point(repo)
    out = tmp_path / "out"
    result = export_point(repo, point, out, "stream-optimized")
    assert sorted(p.name for p in out.iterdir()) == ["vm.nvram", "vm.vmdk", "vm.vmx", "vm_1.vmdk"]
    for disk, exported in zip(point.disks, result.disks, strict=True):
        with exported.path.open("rb") as f:
            desc, capacity, grains = vmdkstream.read(f)
            image = bytearray(capacity)
            for off, data in grains:
                image[off : off + len(data)] = data
        assert desc.create_type == "streamOptimized" and desc.extents[0].type == "SPARSE"
        assert capacity == disk.capacity and bytes(image) == disk_content(repo, point, disk.key)
    # compressed: the random MiB dominates, the zeros cost almost nothing
    assert (out / "vm.vmdk").stat().st_size < 1.2 * MiB
    head = (out / "vm.vmdk").read_bytes()[:512]
    assert head[:4] == b"KDMV" and struct.unpack_from("<I", head, 4)[0] == 3


def test_stream_optimized_damage_is_refused() -> None:
    buf = io.BytesIO()
    data = os.urandom(70000)
    vmdkstream.write(buf, MiB, [(65536, data)], flat_descriptor("x.vmdk", MiB, create_type="streamOptimized"))
    raw = bytearray(buf.getvalue())
    _, _, grains = vmdkstream.read(io.BytesIO(bytes(raw)))
    got = dict(grains)
    assert got[65536] == data[:65536] and got[131072][: 70000 - 65536] == data[65536:]
    raw[-3 * 512 + 12] = 0  # the footer marker's type
    with pytest.raises(vmdkstream.StreamVmdkError, match="footer"):
        vmdkstream.read(io.BytesIO(bytes(raw)))
    with pytest.raises(vmdkstream.StreamVmdkError, match="KDMV"):
        vmdkstream.read(io.BytesIO(bytes(1024)))


def test_find_point(repo: Repository) -> None:
    point = make_point(repo)
    assert find_point(repo, NAME, None) == point == find_point(repo, NAME, "latest")
    assert find_point(repo, NAME, point.id) == point
    with pytest.raises(RestoreError, match="no successful restore point of VM 'other'"):
        find_point(repo, "other", None)
    with pytest.raises(RestoreError, match="is of VM"):
        find_point(repo, "other", point.id)


@pytest.mark.parametrize("fmt", ["raw", "vmdk", "stream-optimized"])
def test_exported_files_are_private_whatever_the_umask(repo: Repository, tmp_path: Path, fmt: str) -> None:
    point = make_point(repo)
    out = tmp_path / "new" / "out"
    old_umask = os.umask(0o002)  # a permissive umask must not widen anything
    try:
        result = export_point(repo, point, out, fmt)
    finally:
        os.umask(old_umask)
    files = list(out.iterdir())
    assert len(files) == len(result.files) >= 4
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


def test_export_mode_option(repo: Repository, tmp_path: Path) -> None:
    point = make_point(repo)
    existing = tmp_path / "share"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    old_umask = os.umask(0o077)  # a strict umask must not narrow what was asked for
    try:
        export_point(repo, point, existing / "web" / "vm", "raw", mode=0o640)
    finally:
        os.umask(old_umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in (existing / "web" / "vm").iterdir()} == {0o640}
    assert stat.S_IMODE((existing / "web").stat().st_mode) == 0o750
    assert stat.S_IMODE((existing / "web" / "vm").stat().st_mode) == 0o750
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755  # not created by the export: untouched


@pytest.mark.usefixtures("restore_logging")
def test_export_mode_is_checked_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from reconciler.cli import main

    for bad, why in (("rw", "not an octal mode"), ("1777", "give permission bits"), ("044", "owner read")):
        with pytest.raises(SystemExit) as exit_:
            main(["export", "web01", "--to", "out", "--mode", bad])
        assert exit_.value.code == 64
        assert why in capsys.readouterr().err


def _direct_io_works(directory: Path) -> bool:
    try:
        fd = os.open(directory / ".direct-probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    (directory / ".direct-probe").unlink()
    return True


@pytest.mark.parametrize("direct", [True, False], ids=["o-direct", "page-cache"])
def test_image_writer_writes_every_piece_either_way(tmp_path: Path, direct: bool) -> None:
    """Aligned pieces go past the page cache where the filesystem allows it, the rest (a short tail, an
    odd offset) through the ordinary descriptor; from several threads; the file reads back exactly."""
    if direct and not _direct_io_works(tmp_path):
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    path = tmp_path / "img"
    capacity = 3 * MiB + 4096 + 512
    pieces = [(0, os.urandom(MiB)), (2 * MiB, os.urandom(MiB)), (3 * MiB, os.urandom(4096 + 512))]
    pieces.append((MiB + 100, os.urandom(1000)))  # neither offset nor length aligned
    expected = bytearray(capacity)
    for off, data in pieces:
        expected[off : off + len(data)] = data
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, capacity)
    writer = ImageWriter(path, fd, direct=direct)
    assert writer.direct is direct
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda piece: writer.write(*piece), pieces))
    writer.sync()
    writer.close()
    os.close(fd)
    assert path.read_bytes() == bytes(expected)


def test_the_page_cache_is_bypassed_only_on_local_disk_filesystems(tmp_path: Path) -> None:
    """O_DIRECT on NFS, SMB or FUSE is a synchronous round trip per write (or ignored): only local disk
    filesystems get it; the filesystem is found from the mount table, for the path itself."""
    assert filesystem_type(Path("/proc/self")) == "proc"
    assert filesystem_type(Path("/")) is not None
    kind = filesystem_type(tmp_path)
    path = tmp_path / "img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        writer = ImageWriter(path, fd)
        assert writer.direct is (kind in DIRECT_FILESYSTEMS and _direct_io_works(tmp_path))
        writer.close()
    finally:
        os.close(fd)
    shm = Path("/dev/shm")
    if filesystem_type(shm) == "tmpfs":
        probe = shm / f"export-test-{os.getpid()}"
        fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            assert ImageWriter(probe, fd).direct is False  # tmpfs: RAM already, nothing to bypass
        finally:
            os.close(fd)
            probe.unlink()
