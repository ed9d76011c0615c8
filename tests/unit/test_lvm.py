"""LVM for file-level restore (``facts/lvm.py``, ``operations/lvm.py``): the PV label and the metadata
text of real lvm2 2.03.16 volume groups (``tests/fixtures/lvm``), where each linear volume's bytes lie on
the disks, and why the others are not browsed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reconciler.facts.lvm import (
    LvmMetadataError,
    Piece,
    PvLocation,
    parse_volume_group,
    pieces_in_range,
    place_volume,
    read_pv_label,
    volume_file_name,
    volume_reader,
)
from reconciler.operations.lvm import read_metadata

MiB = 1 << 20
FIXTURES = Path(__file__).parent.parent / "fixtures" / "lvm"
GUESTVG_PV = "OqBH1W-CkXO-oqMS-fRja-Iy2c-MaTZ-jipopa"
MULTI_PV0 = "8C3BQJ-nr6b-qes5-PqT5-yUMo-TwgF-RxNxfo"
MULTI_PV1 = "WIAQ1e-ZVc3-ocOc-XoJy-NfDS-u4je-SVjIT9"


def test_the_pv_label_gives_uuid_first_extent_and_metadata_area() -> None:
    head = (FIXTURES / "guestvg-pv-head.bin").read_bytes()
    disk = bytes(3 * MiB) + head  # the PV is a partition at 3 MiB
    label = read_pv_label(lambda offset, size: disk[offset : offset + size], 3 * MiB)
    assert label is not None
    assert label.uuid == GUESTVG_PV
    assert label.data_offset == MiB
    assert label.metadata_areas == ((4096, 1044480),)
    assert label.head_size == MiB
    assert read_pv_label(lambda offset, size: disk[offset : offset + size], 0) is None


def test_a_volume_extended_after_another_is_two_pieces_in_order() -> None:
    vg = parse_volume_group((FIXTURES / "guestvg-two-segments.vg").read_text())
    assert (vg.name, vg.seqno, vg.extent_size) == ("guestvg", 4, MiB)
    assert [(pv.key, pv.uuid, pv.pe_start) for pv in vg.physical_volumes] == [("pv0", GUESTVG_PV, MiB)]
    lvs = {lv.name: lv for lv in vg.logical_volumes}
    part = PvLocation("sda", 17 * MiB, 46 * MiB)  # partition 2 of the disk
    root = place_volume(vg, lvs["root"], {GUESTVG_PV: part})
    assert root.problem is None and root.size == 14 * MiB and root.name == "guestvg-root"
    data_start = 17 * MiB + MiB
    assert root.pieces == (
        Piece("sda", data_start, 8 * MiB),  # extents 0-7
        Piece("sda", data_start + 18 * MiB, 6 * MiB),  # extents 18-23, after data's 8-17
    )
    data = place_volume(vg, lvs["data"], {GUESTVG_PV: part})
    assert data.pieces == (Piece("sda", data_start + 8 * MiB, 10 * MiB),)


def test_a_volume_spanning_two_disks_and_one_whose_disk_is_not_in_the_point() -> None:
    vg = parse_volume_group((FIXTURES / "multi-vg-pv0.vg").read_text())
    assert vg == parse_volume_group((FIXTURES / "multi-vg-pv1.vg").read_text())  # each PV has a copy
    lvs = {lv.name: lv for lv in vg.logical_volumes}
    both = {MULTI_PV0: PvLocation("sdb", MiB, 40 * MiB), MULTI_PV1: PvLocation("sdc", MiB, 40 * MiB)}
    span = place_volume(vg, lvs["span"], both)
    assert span.name == "multi--vg-span"
    assert span.pieces == (
        Piece("sdb", MiB + MiB + 6 * MiB, 33 * MiB),
        Piece("sdc", MiB + MiB + 2 * MiB, 7 * MiB),
    )
    only_first = {MULTI_PV0: both[MULTI_PV0]}
    assert place_volume(vg, lvs["lin"], only_first).pieces == (Piece("sdb", 2 * MiB, 4 * MiB),)
    missing = place_volume(vg, lvs["span"], only_first)
    assert missing.pieces == () and missing.problem == (
        f"physical volume {MULTI_PV1} (the guest's /dev/loop2) is not in this restore point"
    )
    striped = place_volume(vg, lvs["striped"], both)
    assert striped.problem == "a volume striped over 2 physical volumes: only linear volumes are browsed"


def test_adjacent_segments_on_one_disk_are_one_piece() -> None:
    text = (FIXTURES / "guestvg-two-segments.vg").read_text().replace('"pv0", 18', '"pv0", 8')
    vg = parse_volume_group(text.replace("data {", "gone {"))
    root = next(lv for lv in vg.logical_volumes if lv.name == "root")
    placed = place_volume(vg, root, {GUESTVG_PV: PvLocation("sda", 0, 46 * MiB)})
    assert placed.pieces == (Piece("sda", MiB, 14 * MiB),)


# Hand-written in lvm2's format (this machine has no device-mapper, so lvm2 refuses to create these):
# the shapes of a RAID1 volume, a thin pool with a thin volume, and an old-style snapshot.
OTHER_KINDS = """
vg1 {
id = "aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaaa"
seqno = 9
extent_size = 8192
physical_volumes { pv0 { id = "bbbbbb-bbbb-bbbb-bbbb-bbbb-bbbb-bbbbbb" device = "/dev/sdb1"
  pe_start = 2048 pe_count = 100 } }
logical_volumes {
mirrored { status = ["READ", "WRITE", "VISIBLE"] segment1 { start_extent = 0 extent_count = 2 type = "raid1"
  device_count = 2
  raids = ["mirrored_rmeta_0", "mirrored_rimage_0", "mirrored_rmeta_1", "mirrored_rimage_1"] } }
mirrored_rimage_0 { status = ["READ", "WRITE"] segment1 { start_extent = 0 extent_count = 2 type = "striped"
  stripe_count = 1 stripes = ["pv0", 1] } }
pool { status = ["READ", "WRITE", "VISIBLE"] segment1 { start_extent = 0 extent_count = 4 type = "thin-pool"
  metadata = "pool_tmeta" pool = "pool_tdata" } }
thinvol { status = ["READ", "WRITE", "VISIBLE"] segment1 { start_extent = 0 extent_count = 8 type = "thin"
  thin_pool = "pool" device_id = 1 } }
root { status = ["READ", "WRITE", "VISIBLE"] segment1 { start_extent = 0 extent_count = 4 type = "striped"
  stripe_count = 1 stripes = ["pv0", 10] } }
snap { status = ["READ", "VISIBLE"] segment1 { start_extent = 0 extent_count = 1 type = "striped"
  stripe_count = 1 stripes = ["pv0", 20] } }
snapshot0 { status = ["READ"] segment1 { start_extent = 0 extent_count = 4 type = "snapshot"
  chunk_size = 8 origin = "root" cow_store = "snap" } }
}
}
# comment "with { braces }"
contents = "Text Format Volume Group"
description = "a \\"quoted\\" value"
version = 1
"""


def test_raid_thin_and_snapshot_volumes_are_listed_with_their_reason() -> None:
    vg = parse_volume_group(OTHER_KINDS)
    found = {"bbbbbb-bbbb-bbbb-bbbb-bbbb-bbbb-bbbbbb": PvLocation("sdb", MiB, 400 * MiB)}
    reasons = {lv.name: place_volume(vg, lv, found).problem for lv in vg.logical_volumes if lv.visible}
    assert reasons == {
        "mirrored": "a mirrored (RAID1) volume: only linear volumes are browsed",
        "pool": "a thin pool: only linear volumes are browsed",
        "thinvol": "a thin volume: only linear volumes are browsed",
        "root": None,
        "snap": "old-style snapshot of root (a copy-on-write store): not browsed; root is",
    }
    assert not next(lv for lv in vg.logical_volumes if lv.name == "mirrored_rimage_0").visible


@pytest.mark.parametrize(
    "text",
    [
        "vg1 { extent_size = 8192",  # cut short
        "vg1 { extent_size = 8192 physical_volumes { pv0 { id = 'x' } } }",  # not lvm2's quotes
        "vg1 { seqno = 1 }",  # no extent size
        "a { extent_size = 1 seqno = 1 } b { extent_size = 1 seqno = 1 }",
    ],
)
def test_metadata_that_cannot_be_understood_is_an_lvm_metadata_error(text: str) -> None:
    with pytest.raises(LvmMetadataError):
        parse_volume_group(text)


def test_a_read_across_the_pieces_of_a_volume() -> None:
    disks = {"sda": bytes(range(256)) * 64, "sdb": bytes(reversed(range(256))) * 64}
    pieces = (Piece("sda", 100, 50), Piece("sdb", 1000, 30), Piece("sda", 4000, 20))
    read = volume_reader(pieces, lambda disk, offset, size: disks[disk][offset : offset + size])
    whole = disks["sda"][100:150] + disks["sdb"][1000:1030] + disks["sda"][4000:4020]
    assert read(0, 100) == whole
    assert read(40, 45) == whole[40:85]
    assert read(90, 100) == whole[90:]
    assert pieces_in_range(pieces, 49, 2) == [Piece("sda", 149, 1), Piece("sdb", 1000, 1)]
    assert pieces_in_range(pieces, 100, 10) == []


def test_volume_names_are_one_unambiguous_path_component() -> None:
    assert volume_file_name("ubuntu-vg", "ubuntu-lv") == "ubuntu--vg-ubuntu--lv"
    assert volume_file_name("vg", "root") == "vg-root"
    assert volume_file_name("a-b", "c") != volume_file_name("a", "b-c")


@pytest.mark.skipif(shutil.which("pvck") is None, reason="lvm2 (pvck) is not installed")
def test_pvck_reads_the_metadata_from_a_copy_of_the_pv_head_and_writes_nothing_else(tmp_path: Path) -> None:
    head = tmp_path / "sda2.head"
    shutil.copyfile(FIXTURES / "guestvg-pv-head.bin", head)
    head.chmod(0o444)
    text = read_metadata(head, tmp_path)
    assert text == (FIXTURES / "guestvg-two-segments.vg").read_text()
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == ["lvm-system", "lvm-system/lock", "lvm-system/lvm.conf", "sda2.head", "sda2.vg"]
    empty = tmp_path / "zeros.head"
    empty.write_bytes(bytes(16384))
    assert read_metadata(empty, tmp_path) is None
    assert os.access(head, os.R_OK)
