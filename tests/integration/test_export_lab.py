"""``export`` of a point taken from the lab (free host, hostile VM name): every format's disk equals the
snapshot-time content (the guest writes after the backup), descriptors parse with the project's
parser, and the raw images keep the disks' holes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler import cli
from reconciler.config import load_config
from reconciler.esxi.vmdk import Descriptor
from reconciler.esxi.vmx import VmxFile
from reconciler.facts.inventory import BackupSnapshot
from reconciler.operations import vmdkstream
from reconciler.operations.backup import BackupOptions, backup_policy
from reconciler.operations.ports import BackupHost
from reconciler.operations.repositories import open_repository
from reconciler.repository import KdfParams, Repository
from tests.integration.labconfig import PASSPHRASE, policy_yaml, write_lab_config

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

HOSTILE = 'ファイル鯖 "q" $(x)'


def test_export_formats_equal_the_snapshot_content(
    lab: LabHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_lab_config(lab, tmp_path, policy_yaml("odd", lab.free, [HOSTILE]))
    Repository.init(tmp_path / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
    desired = load_config(cfg)
    frozen: dict[int, str] = {}
    capacity: dict[int, int] = {}

    def on_snapshot(host: BackupHost, bs: BackupSnapshot) -> None:
        for disk in bs.disks:
            frozen[disk.key] = hashlib.sha256(
                lab.local_path(lab.free, disk.data_file).read_bytes()
            ).hexdigest()
            capacity[disk.key] = disk.capacity

    (res,) = backup_policy(desired, "odd", options=BackupOptions(on_snapshot=on_snapshot))
    assert res.ok, res.error
    lab.client(lab.free).guest_write(HOSTILE, 10, seed=951)  # not in the point
    point = open_repository(desired.repository("r")).read_point(res.point_id or "")
    stems = {d.key: d.file.rsplit("/", 1)[1][: -len(".vmdk")] for d in point.disks}
    base = ["--config", str(cfg), "--log-level", "warning", "export", HOSTILE, "--point", point.id]

    raw = tmp_path / "raw"
    assert cli.main([*base, "--to", str(raw)]) == 0, capsys.readouterr()
    out = capsys.readouterr().out  # which VM (name, source host, uuid) and which point
    source = f"VM {HOSTILE!r} from {lab.free} (uuid {point.vm.uuid})"
    assert f"exported restore point {point.id} of {source}" in out
    for key, stem in stems.items():
        image = raw / f"{stem}.img"
        assert hashlib.sha256(image.read_bytes()).hexdigest() == frozen[key]
        assert image.stat().st_size == capacity[key]
        assert image.stat().st_blocks * 512 < capacity[key]  # the lab's disks are partly holes
    assert VmxFile.parse((raw / f"{stems[2000]}.vmx").read_text()).get("displayName") == HOSTILE

    flat = tmp_path / "vmdk"
    assert cli.main([*base, "--to", str(flat), "--format", "vmdk"]) == 0, capsys.readouterr()
    vmx = VmxFile.parse((flat / f"{stems[2000]}.vmx").read_text())
    for key, stem in stems.items():
        desc = Descriptor.parse((flat / f"{stem}.vmdk").read_text())
        assert desc.create_type == "monolithicFlat" and desc.capacity == capacity[key]
        data = (flat / (desc.extents[0].file_name or "")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == frozen[key]
        assert f"{stem}.vmdk" in {d.file_name for d in vmx.disks()}

    stream = tmp_path / "stream"
    assert cli.main([*base, "--to", str(stream), "--format", "stream-optimized"]) == 0, capsys.readouterr()
    for key, stem in stems.items():
        with (stream / f"{stem}.vmdk").open("rb") as f:
            desc, size, grains = vmdkstream.read(f)
            content = bytearray(size)
            for off, data in grains:
                content[off : off + len(data)] = data
        assert desc.create_type == "streamOptimized" and size == capacity[key]
        assert hashlib.sha256(content).hexdigest() == frozen[key]

    assert cli.main([*base, "--to", str(raw)]) == 1  # never overwrites
    assert "already exists" in capsys.readouterr().err
