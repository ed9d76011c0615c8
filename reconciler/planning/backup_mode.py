"""How to back up one disk: full, CBT incremental or digest-compare incremental, and why.

:func:`choose_disk_mode` is a pure function of what the backup observed about one disk
(:class:`DiskFacts`); it returns the mode, how to read the disk, and the reasons in words for people.
The reasons are recorded per disk in the restore point and shown by ``esxi-reconciler points``.

The caller (:mod:`reconciler.operations.backup.disk`) gathers the facts, asks, and tries what was
chosen. What is learnt only by trying goes into the facts and the question is asked again, so every
fallback and its reason is decided here:

* QueryChangedDiskAreas refuses (:attr:`DiskFacts.cbt_refused`: CBT reset, inactive, licence);
* the previous digest map, read only once the digest compare is chosen, is of an algorithm this
  version does not compute, another block size or capacity (:attr:`PreviousDisk.digest_map`);
* the allocated areas (``"*"``) of a full read are refused (:attr:`DiskFacts.allocated_refused`);
* HTTPS disk reads are refused (:attr:`DiskFacts.https_refused`).

Order of preference:

1. **full** when asked for (``--full``);
2. **full** when there is nothing to compare with: no earlier restore point of the VM; that point has no
   record of this disk (added since); the disk was resized; the point needs chunks that verify set
   aside (an incremental would keep referencing them; a full read stores them again);
3. **cbt** on a licensed host when the disk has a changeId under our snapshot and the previous point
   recorded one: only the areas changed since are read;
4. **digest** with SSH and a previous digest map of one of the host program's algorithms, its block
   size and the disk's capacity: the host compares block digests (with the map's algorithm) and sends
   only the differing blocks;
5. **full** otherwise, with the reasons 3 and 4 did not apply.

A full read, in order: the allocated areas by QueryChangedDiskAreas ``"*"`` (licensed, CBT active);
with SSH, parallel HTTPS Range reads of the blocks the host lists as allocated with the digest map
computed locally (unless the transport is ``ssh`` or HTTPS was refused), else the digest program with
no previous map; without SSH, the whole disk through the transport.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from reconciler.facts.points import BackupMode
from reconciler.units import human_size

ReadMethod = Literal[
    "changed-areas", "digest-compare", "allocated-areas", "https-allocated", "digest-program", "whole-disk"
]
"""How the disk's data is read:

* ``changed-areas``: QueryChangedDiskAreas since the previous changeId, those areas through the transport;
* ``digest-compare``: the host program compares with the previous digest map and sends what differs;
* ``allocated-areas``: QueryChangedDiskAreas ``"*"``, those areas through the transport;
* ``https-allocated``: HTTPS Range reads of the blocks the host lists as allocated, digests computed
  here (the digest program when HTTPS turns out to be unavailable);
* ``digest-program``: the host program with no previous map (every non-zero block sent);
* ``whole-disk``: every byte through the transport.
"""


@dataclass(frozen=True)
class DigestShape:
    """What a digest map is made of; two maps compare only when their shapes are equal."""

    algorithm: str
    block_size: int
    digest_size: int


@dataclass(frozen=True)
class PreviousMap:
    """The previous point's digest map of the disk, as read from the repository."""

    shape: DigestShape
    capacity: int


@dataclass(frozen=True)
class PreviousDisk:
    """The same disk (same device key) in the VM's previous restore point."""

    capacity: int
    change_id: str | None
    has_digest_map: bool
    lost_chunks: int = 0
    """Chunks its index needs that verify set aside and no backup has stored again since."""
    digest_map: PreviousMap | None = None
    """Once read (only when the digest compare is chosen): None means "not read yet", and the choice
    then assumes it fits; the caller reads it and asks again."""


@dataclass(frozen=True)
class CbtRefusal:
    """QueryChangedDiskAreas refused the previous changeId."""

    code: str
    """The host layer's word: ``change-id-rejected``, ``cbt-inactive``, ``restricted``, ``no-change-id``."""
    detail: str = ""


@dataclass(frozen=True)
class DiskFacts:
    """What the backup observed about one disk, under its snapshot."""

    capacity: int
    change_id: str | None
    """The disk's changeId under our snapshot (None: CBT is not active for it)."""
    licensed: bool
    """The host answers QueryChangedDiskAreas (its licence allows API writes and CBT queries)."""
    ssh: bool
    """SSH is enabled for the host (the digest program can run)."""
    digest_shapes: tuple[DigestShape, ...]
    """The shapes of the maps the host program computes (one per algorithm it can be asked for)."""
    previous_point: str | None = None
    """Id of the VM's previous successful restore point of this policy (None: the first backup)."""
    previous: PreviousDisk | None = None
    full_requested: bool = False
    https_allowed: bool = True
    """The transport setting allows HTTPS (``auto`` or ``https``)."""
    cbt_refused: CbtRefusal | None = None
    allocated_refused: bool = False
    https_refused: bool = False


@dataclass(frozen=True)
class ModeChoice:
    """The decision for one disk."""

    mode: BackupMode
    read: ReadMethod
    reasons: tuple[str, ...]
    fallback: bool = False
    """A full read that was not asked for: an incremental was not possible (the reasons say why)."""

    @property
    def fallback_reason(self) -> str | None:
        return "; ".join(self.reasons) if self.fallback else None

    def describe(self) -> str:
        """``"full: no earlier restore point of this VM"``: how ``points`` shows it."""
        return describe_mode(self.mode, self.reasons)


def describe_mode(mode: str | None, reasons: Iterable[str]) -> str:
    """A disk's mode and reasons as one line for people (``mode`` None: written before reasons were)."""
    text = "; ".join(reasons)
    if mode is None:
        return text or "mode not recorded"
    return f"{mode}: {text}" if text else mode


def per_disks(texts: Iterable[tuple[str, str]]) -> list[str]:
    """``(disk label, text)`` pairs as lines, disks with the same text on one (``"Hard disk 1, Hard disk
    2: …"``), in the disks' order: a VM's disks usually share their reasons."""
    labels: dict[str, list[str]] = {}
    for label, text in texts:
        labels.setdefault(text, []).append(label)
    return [f"{', '.join(names)}: {text}" for text, names in labels.items()]


FULL_REQUESTED = "a full backup was asked for"
FIRST_BACKUP = "no earlier restore point of this VM"
CBT_SINCE_PREVIOUS = "only the areas CBT reports changed since the previous restore point"
DIGEST_SINCE_PREVIOUS = "only the blocks whose digests differ from the previous restore point's"


def choose_disk_mode(facts: DiskFacts) -> ModeChoice:
    """The mode, how to read, and the reasons (module docstring for the order)."""
    if facts.full_requested:
        return _full(facts, [FULL_REQUESTED], fallback=False)
    prev = facts.previous
    if facts.previous_point is None:
        return _full(facts, [FIRST_BACKUP])
    if prev is None:
        return _full(facts, [f"the previous restore point {facts.previous_point} has no record of this disk"])
    if prev.capacity != facts.capacity:
        return _full(
            facts,
            [f"the disk was resized from {_size(prev.capacity, facts.capacity)} since the previous point"],
        )
    if prev.lost_chunks:
        return _full(
            facts,
            [
                f"the previous point needs {prev.lost_chunks} chunk(s) that verify found damaged or missing;"
                " a full read stores them again"
            ],
        )
    reasons: list[str] = []
    if facts.licensed:
        if facts.cbt_refused is not None:
            reasons.append(_cbt_refusal(facts.cbt_refused))
        elif not facts.change_id:
            reasons.append("CBT is not active for the disk")
        elif not prev.change_id:
            reasons.append("the previous point recorded no CBT changeId for the disk")
        else:
            return ModeChoice("cbt", "changed-areas", (CBT_SINCE_PREVIOUS,))
    if not facts.ssh:
        reasons.append("no digest compare: SSH is disabled for the host")
    elif not prev.has_digest_map:
        reasons.append("no digest compare: the previous point has no digest map of the disk")
    elif prev.digest_map is not None and prev.digest_map.shape not in facts.digest_shapes:
        old = prev.digest_map.shape
        ours = " or ".join(f"{s.algorithm}/{s.block_size}" for s in facts.digest_shapes)
        reasons.append(
            f"no digest compare: the previous digest map is {old.algorithm}/{old.block_size}-byte blocks,"
            f" this host program computes {ours}"
        )
    elif prev.digest_map is not None and prev.digest_map.capacity != facts.capacity:
        reasons.append("no digest compare: the previous digest map is of another capacity")
    else:
        return ModeChoice("digest", "digest-compare", (*reasons, DIGEST_SINCE_PREVIOUS))
    return _full(facts, reasons)


def point_mode(modes: Iterable[BackupMode]) -> BackupMode:
    """A point's mode from its disks': full if any disk (or none) was read in full, else cbt if any."""
    seen = set(modes)
    if "full" in seen or not seen:
        return "full"
    return "cbt" if "cbt" in seen else "digest"


def _full(facts: DiskFacts, reasons: list[str], *, fallback: bool = True) -> ModeChoice:
    return ModeChoice("full", _full_read(facts), tuple(reasons), fallback)


def _full_read(facts: DiskFacts) -> ReadMethod:
    cbt_refused_by_licence = facts.cbt_refused is not None and facts.cbt_refused.code == "restricted"
    if facts.licensed and facts.change_id and not facts.allocated_refused and not cbt_refused_by_licence:
        return "allocated-areas"
    if facts.ssh:
        return "https-allocated" if facts.https_allowed and not facts.https_refused else "digest-program"
    return "whole-disk"


_CBT_REFUSALS = {
    "change-id-rejected": "CBT was reset since the previous point",
    "cbt-inactive": "CBT is not active for the disk on the host",
    "restricted": "the host's licence refuses QueryChangedDiskAreas",
    "no-change-id": "there is no CBT changeId to compare with",
}


def _cbt_refusal(refusal: CbtRefusal) -> str:
    known = _CBT_REFUSALS.get(refusal.code)
    if known is not None:
        return f"{known} ({refusal.code})"
    detail = f": {refusal.detail}" if refusal.detail else ""
    return f"CBT could not answer ({refusal.code}){detail}"


def _size(before: int, after: int) -> str:
    """``"10.0 GiB to 12.0 GiB"``, in bytes when the rounded sizes read the same."""
    a, b = human_size(before), human_size(after)
    return f"{a} to {b}" if a != b else f"{before} to {after} bytes"
