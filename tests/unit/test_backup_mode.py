"""The per-disk backup mode choice (planning/backup_mode.py): every branch, with plain values."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from reconciler.planning.backup_mode import (
    CBT_SINCE_PREVIOUS,
    DIGEST_SINCE_PREVIOUS,
    FIRST_BACKUP,
    FULL_REQUESTED,
    CbtRefusal,
    DigestShape,
    DiskFacts,
    ModeChoice,
    PreviousDisk,
    PreviousMap,
    choose_disk_mode,
    describe_mode,
    per_disks,
    point_mode,
)

GiB = 1 << 30
OURS = DigestShape("blake2b-128", 65536, 16)
SHA = DigestShape("sha256-128", 65536, 16)
POINT = "20260101T000000000000Z-0a0b0c0d"


def facts(*, licensed: bool = False, ssh: bool = True, **changes: object) -> DiskFacts:
    """A disk of 10 GiB with an earlier point holding it (same capacity, no changeId, a digest map)."""
    base = DiskFacts(
        capacity=10 * GiB,
        change_id="52 de/7" if licensed else None,
        licensed=licensed,
        ssh=ssh,
        digest_shapes=(OURS, SHA),
        previous_point=POINT,
        previous=PreviousDisk(
            capacity=10 * GiB, change_id="52 de/6" if licensed else None, has_digest_map=not licensed
        ),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def previous(f: DiskFacts, **changes: object) -> DiskFacts:
    assert f.previous is not None
    return replace(f, previous=replace(f.previous, **changes))  # type: ignore[arg-type]


# -- full: asked for, or nothing to compare with -------------------------------------------------------


def test_a_full_backup_asked_for_is_not_a_fallback() -> None:
    choice = choose_disk_mode(facts(full_requested=True))
    assert choice == ModeChoice("full", "https-allocated", (FULL_REQUESTED,), fallback=False)
    assert choice.fallback_reason is None
    assert choice.describe() == "full: a full backup was asked for"


def test_the_first_backup_is_full() -> None:
    choice = choose_disk_mode(facts(previous_point=None, previous=None))
    assert (choice.mode, choice.reasons, choice.fallback) == ("full", (FIRST_BACKUP,), True)
    assert choice.describe() == "full: no earlier restore point of this VM"
    assert choice.fallback_reason == FIRST_BACKUP


def test_a_disk_the_previous_point_does_not_hold_is_read_in_full() -> None:
    choice = choose_disk_mode(facts(previous=None))
    assert choice.mode == "full" and choice.fallback
    assert choice.reasons == (f"the previous restore point {POINT} has no record of this disk",)


def test_a_resized_disk_is_read_in_full() -> None:
    choice = choose_disk_mode(facts(capacity=12 * GiB))
    assert choice.mode == "full"
    assert choice.reasons == ("the disk was resized from 10.0 GiB to 12.0 GiB since the previous point",)
    # sizes that read the same rounded are given in bytes
    choice = choose_disk_mode(facts(capacity=10 * GiB + 4096))
    assert choice.reasons == (
        f"the disk was resized from {10 * GiB} to {10 * GiB + 4096} bytes since the previous point",
    )


def test_chunks_set_aside_by_verify_force_a_full_read() -> None:
    choice = choose_disk_mode(previous(facts(licensed=True), lost_chunks=3))
    assert choice.mode == "full" and choice.read == "allocated-areas"
    assert "needs 3 chunk(s) that verify found damaged or missing" in choice.reasons[0]


# -- CBT -----------------------------------------------------------------------------------------------


def test_cbt_when_both_changeids_are_known() -> None:
    choice = choose_disk_mode(facts(licensed=True))
    assert choice == ModeChoice("cbt", "changed-areas", (CBT_SINCE_PREVIOUS,))
    assert choice.fallback_reason is None


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("change-id-rejected", "CBT was reset since the previous point (change-id-rejected)"),
        ("cbt-inactive", "CBT is not active for the disk on the host (cbt-inactive)"),
        ("restricted", "the host's licence refuses QueryChangedDiskAreas (restricted)"),
        ("no-change-id", "there is no CBT changeId to compare with (no-change-id)"),
        ("odd", "CBT could not answer (odd): the detail"),
    ],
)
def test_cbt_refused_at_run_time_falls_back_with_the_reason(code: str, reason: str) -> None:
    choice = choose_disk_mode(facts(licensed=True, cbt_refused=CbtRefusal(code, "the detail")))
    assert choice.mode == "full" and choice.fallback
    assert choice.reasons == (reason, "no digest compare: the previous point has no digest map of the disk")
    # the licence refuses the allocated areas too: straight to the SSH full read
    assert choice.read == ("https-allocated" if code == "restricted" else "allocated-areas")
    assert choice.describe().startswith(f"full: {reason}; ")


def test_cbt_not_active_or_no_previous_changeid() -> None:
    choice = choose_disk_mode(facts(licensed=True, change_id=None))
    assert choice.reasons[0] == "CBT is not active for the disk"
    assert choice.read == "https-allocated"  # no changeId: no allocated areas either
    choice = choose_disk_mode(previous(facts(licensed=True), change_id=None))
    assert choice.reasons[0] == "the previous point recorded no CBT changeId for the disk"
    assert choice.mode == "full" and choice.read == "allocated-areas"


def test_a_licensed_host_without_cbt_uses_the_digest_compare_and_says_why() -> None:
    choice = choose_disk_mode(previous(facts(licensed=True, change_id=None), has_digest_map=True))
    assert choice.mode == "digest" and choice.read == "digest-compare" and not choice.fallback
    assert choice.reasons == ("CBT is not active for the disk", DIGEST_SINCE_PREVIOUS)
    assert choice.fallback_reason is None


def test_a_free_host_never_mentions_cbt() -> None:
    choice = choose_disk_mode(facts(ssh=False))
    assert choice.reasons == ("no digest compare: SSH is disabled for the host",)
    assert choice.read == "whole-disk"


# -- digest compare ------------------------------------------------------------------------------------


def test_digest_compare_is_chosen_then_confirmed_once_the_map_is_read() -> None:
    f = facts()
    assert choose_disk_mode(f) == ModeChoice("digest", "digest-compare", (DIGEST_SINCE_PREVIOUS,))
    read = previous(f, digest_map=PreviousMap(OURS, 10 * GiB))
    assert choose_disk_mode(read) == ModeChoice("digest", "digest-compare", (DIGEST_SINCE_PREVIOUS,))
    sha = previous(f, digest_map=PreviousMap(SHA, 10 * GiB))  # either algorithm the program computes
    assert choose_disk_mode(sha) == ModeChoice("digest", "digest-compare", (DIGEST_SINCE_PREVIOUS,))


def test_a_map_of_another_shape_or_capacity_means_a_full_read() -> None:
    other = previous(facts(), digest_map=PreviousMap(DigestShape("sha1", 65536, 20), 10 * GiB))
    choice = choose_disk_mode(other)
    assert choice.mode == "full" and choice.read == "https-allocated"
    assert choice.reasons == (
        "no digest compare: the previous digest map is sha1/65536-byte blocks, this host program computes"
        " blake2b-128/65536 or sha256-128/65536",
    )
    smaller = previous(facts(), digest_map=PreviousMap(OURS, 9 * GiB))
    assert choose_disk_mode(smaller).reasons == (
        "no digest compare: the previous digest map is of another capacity",
    )


def test_no_map_or_no_ssh() -> None:
    assert choose_disk_mode(previous(facts(), has_digest_map=False)).reasons == (
        "no digest compare: the previous point has no digest map of the disk",
    )
    assert choose_disk_mode(facts(ssh=False)).mode == "full"


# -- how a full read is done ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "read"),
    [
        ({"licensed": True}, "allocated-areas"),
        ({"licensed": True, "allocated_refused": True}, "https-allocated"),
        ({"licensed": True, "allocated_refused": True, "ssh": False}, "whole-disk"),
        ({"licensed": True, "change_id": None, "ssh": False}, "whole-disk"),
        ({}, "https-allocated"),
        ({"https_allowed": False}, "digest-program"),
        ({"https_refused": True}, "digest-program"),
        ({"ssh": False}, "whole-disk"),
    ],
)
def test_how_a_full_read_is_done(changes: dict[str, object], read: str) -> None:
    licensed = bool(changes.pop("licensed", False))
    ssh = bool(changes.pop("ssh", True))
    choice = choose_disk_mode(facts(licensed=licensed, ssh=ssh, full_requested=True, **changes))
    assert choice.mode == "full" and choice.read == read


# -- every combination: the invariants the caller relies on --------------------------------------------


def test_every_combination_keeps_the_invariants() -> None:
    """Reasons always; cbt only unrefused; a fallback is a full not asked for; each fact the caller
    learns by trying (refusal, map read, allocated areas or HTTPS refused) moves the choice on, so the
    caller's ask-try-ask loop ends."""
    shapes = [None, PreviousMap(SHA, GiB), PreviousMap(DigestShape("md5", 65536, 16), GiB)]
    for licensed, ssh, change_id, prev_cid, has_map, shape, full, refused, alloc, https in itertools.product(
        *([False, True],) * 4, [False, True], shapes, [False, True], [None, "change-id-rejected"],
        *([False, True],) * 2,
    ):  # fmt: skip
        f = DiskFacts(
            capacity=GiB,
            change_id="c" if change_id else None,
            licensed=licensed,
            ssh=ssh,
            digest_shapes=(OURS, SHA),
            previous_point=POINT,
            previous=PreviousDisk(GiB, "p" if prev_cid else None, has_map, 0, shape if has_map else None),
            full_requested=full,
            cbt_refused=CbtRefusal(refused) if refused else None,
            allocated_refused=alloc,
            https_refused=https,
        )
        choice = choose_disk_mode(f)
        assert choice.reasons, f
        assert choice.fallback == (choice.mode == "full" and not full), f
        if choice.mode == "cbt":
            assert licensed and change_id and prev_cid and refused is None and choice.read == "changed-areas"
            assert choose_disk_mode(replace(f, cbt_refused=CbtRefusal("x"))).mode != "cbt"
        if choice.mode == "digest":
            assert ssh and has_map and choice.read == "digest-compare"
            assert shape is None or shape.shape in (OURS, SHA)
        if choice.read == "allocated-areas":
            assert choose_disk_mode(replace(f, allocated_refused=True)).read != "allocated-areas"
        if choice.read == "https-allocated":
            assert choose_disk_mode(replace(f, https_refused=True)).read == "digest-program"
        if choice.mode == "full":
            assert choice.read in ("allocated-areas", "https-allocated", "digest-program", "whole-disk")


def test_point_mode_and_describe() -> None:
    assert point_mode([]) == "full"
    assert point_mode(["cbt", "full"]) == "full"
    assert point_mode(["digest", "cbt"]) == "cbt"
    assert point_mode(["digest", "digest"]) == "digest"
    assert describe_mode(None, []) == "mode not recorded"
    assert describe_mode(None, ["old reason"]) == "old reason"
    assert describe_mode("cbt", []) == "cbt"
    assert describe_mode("full", ["a", "b"]) == "full: a; b"


def test_disks_with_the_same_text_share_a_line() -> None:
    assert per_disks([]) == []
    assert per_disks([("Hard disk 1", "a"), ("Hard disk 2", "b"), ("Hard disk 3", "a")]) == [
        "Hard disk 1, Hard disk 3: a",
        "Hard disk 2: b",
    ]
