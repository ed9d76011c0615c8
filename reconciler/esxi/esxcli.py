"""Parsers of ``esxcli`` table output (checked against real hosts, ``tests/fixtures/real/esxcli``).

esxcli prints a header, a line of dash runs (one per column, as wide as the widest value) and one row per
item; text columns are left-aligned, numbers and booleans right-aligned, empty values are blank (an
unnamed volume). Columns are cut at the dash runs, so values with spaces are kept whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from reconciler.esxi.vimcmd import unexpected


@dataclass(frozen=True)
class Filesystem:
    """One row of ``esxcli storage filesystem list``."""

    mount_point: str
    volume_name: str
    uuid: str
    mounted: bool
    type: str
    """``VMFS-5``, ``VMFS-6``, ``NFS``, ``NFS41``, ``vsan``, ``VMFSOS`` (ESXi 7+ OSDATA), ``vfat`` …"""
    size: int
    free: int


_FS_HEADER = ["Mount Point", "Volume Name", "UUID", "Mounted", "Type", "Size", "Free"]


def parse_table(command: str, text: str, header: list[str]) -> list[list[str]]:
    """Rows of an esxcli table as lists of stripped cells; the header must be exactly ``header``."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        raise unexpected(command, text, "no table in")
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", lines[1])]
    if not re.fullmatch(r"[- ]+", lines[1]) or len(spans) != len(header):
        raise unexpected(command, lines[1], "expected the dashes under the header, got")
    cuts = [start for start, _ in spans] + [None]
    got = [lines[0][cuts[i] : cuts[i + 1]].strip() for i in range(len(spans))]
    if got != header:
        raise unexpected(command, lines[0], "unexpected header")
    return [[line[cuts[i] : cuts[i + 1]].strip() for i in range(len(spans))] for line in lines[2:]]


def parse_filesystem_list(text: str) -> list[Filesystem]:
    """Parse ``esxcli storage filesystem list``."""
    command = "esxcli storage filesystem list"
    out = []
    for row in parse_table(command, text, _FS_HEADER):
        mount, name, uuid, mounted, fstype, size, free = row
        if mounted not in ("true", "false") or not size.isdigit() or not free.isdigit():
            raise unexpected(command, "  ".join(row), "unexpected row")
        out.append(Filesystem(mount, name, uuid, mounted == "true", fstype, int(size), int(free)))
    return out
