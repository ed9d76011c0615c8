"""Parsers of ``vim-cmd`` listings the product does not read (it lists VMs and their power state through
the API): ``vmsvc/getallvms`` and ``vmsvc/power.getstate``. The lab's fidelity tests read the lab's
output with them, after ``tests/unit/test_real_outputs.py`` checked them against the outputs of real
hosts (``tests/fixtures/real``), so what the lab prints has the real shapes.

A line that matches no known shape raises ProtocolError naming the command and quoting the line.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from reconciler.esxi.errors import CommandError
from reconciler.esxi.vimcmd import VIM_CMD, find_fault, unexpected


def getallvms() -> list[str]:
    return [VIM_CMD, "vmsvc/getallvms"]


@dataclass(frozen=True)
class VmRow:
    """One VM of ``getallvms``."""

    vmid: str
    name: str
    vmx: str
    """``[datastore] dir/x.vmx``; ``[] /var/run/crx/…`` for VMs outside any datastore (vCLS, ESXi 8/9)."""
    guest: str
    version: str
    annotation: str


# Columns are padded with spaces; \s would also take a U+2028 or U+0085 that begins or ends a name.
_ROW_START = re.compile(r"^(\d+)( +)([^ ].*)$", re.DOTALL)
_ROW_END = re.compile(r"\.vmx\s+(\S+)\s+(vmx-\d+)(?:\s+(.*?))?\s*$", re.DOTALL)
_DS_PATH = re.compile(r"\[[^\]\n]*\] \S")
_SKIPPED = re.compile(r"^Skipping invalid VM '\d+'\s*$")
_ROW_MAX_LINES = 64
"""How many lines one row may span: a name (up to 80 characters) and its path, each with line breaks."""


def _split_name_file(middle: str) -> tuple[str, str] | None:
    """Split ``name<spaces>[ds] path`` (without ``.vmx``). Names may contain ``[x] `` and spaces, so
    every `` [`` that starts a datastore path is a candidate: one whose path's folder or file stem is the
    name wins; else the widest gap (columns are padded, a name's own spaces are usually single); ties
    go to the leftmost."""
    candidates: list[tuple[int, int]] = []  # (gap width, start of file)
    for m in re.finditer(r"(\s+)(?=\[)", middle):
        start = m.end()
        if m.start() == 0 or not _DS_PATH.match(middle, start):
            continue
        candidates.append((len(m.group(1)), start))
    if not candidates:
        return None

    def parts(start: int) -> tuple[str, str]:
        return middle[:start].rstrip(" "), middle[start:]

    def related(start: int) -> bool:
        name, path = parts(start)
        rel = path.split("] ", 1)[1]
        folder, _, stem = rel.rpartition("/")
        return name in (posixpath.basename(folder), stem)

    matching = [c for c in candidates if related(c[1])]
    if len(matching) == 1:
        return parts(matching[0][1])
    widest = max(c[0] for c in candidates)
    return parts(next(c[1] for c in candidates if c[0] == widest))


def _parse_row(text: str) -> VmRow | None:
    start = _ROW_START.match(text)
    if start is None:
        return None
    body = start.group(3)
    end = _ROW_END.search(body)
    if end is None:
        return None
    split = _split_name_file(body[: end.start()])
    if split is None:
        return None
    name, path = split
    return VmRow(start.group(1), name, path + ".vmx", end.group(1), end.group(2), end.group(3) or "")


def parse_getallvms(text: str) -> list[VmRow]:
    """Parse ``vmsvc/getallvms``. A row is ``vmid name [ds] path.vmx guest vmx-NN [annotation]``;
    ``Skipping invalid VM 'N'`` lines (anywhere, even before the header) are dropped; a line that is no
    row continues the previous row's annotation (multi-line annotations), unless joined to the next
    line it completes a row (a name with line breaks: the row spans lines up to the one holding the
    path's end and the guest and version columns; it starts with a vmid padded up to the header's
    ``Name`` column, which an annotation line such as ``2023 migrated`` does not)."""
    command = "vim-cmd vmsvc/getallvms"
    # split("\n"), not splitlines(): a name may hold U+2028 or U+0085, which splitlines() breaks at
    lines = [line for line in text.split("\n") if not _SKIPPED.match(line)]
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines or not re.match(r"^Vmid\s+Name\s+File\s+Guest OS\s+Version\s+Annotation\s*$", lines[0]):
        raise unexpected(
            command,
            lines[0] if lines else text,
            "expected the header 'Vmid Name File Guest OS Version Annotation', got",
        )
    rows: list[VmRow] = []
    name_column = lines[0].find("Name")
    i = 1
    while i < len(lines):
        line = lines[i]
        row = _parse_row(line)
        padded_vmid = line[:name_column].rstrip().isdigit() and line[name_column - 1 : name_column] == " "
        if row is None and padded_vmid:
            for end in range(i + 1, min(len(lines), i + _ROW_MAX_LINES)):
                if _parse_row(lines[end]) is not None:
                    break
                row = _parse_row("\n".join(lines[i : end + 1]))
                if row is not None:
                    i = end
                    break
        if row is not None:
            rows.append(VmRow(row.vmid, row.name, row.vmx, row.guest, row.version, row.annotation.rstrip()))
        elif line.strip():
            if not rows:
                raise unexpected(command, line)
            last = rows[-1]
            annotation = f"{last.annotation}\n{line.rstrip()}"
            rows[-1] = VmRow(last.vmid, last.name, last.vmx, last.guest, last.version, annotation)
        i += 1
    return rows


_POWER = {"powered on": "poweredOn", "powered off": "poweredOff", "suspended": "suspended"}


def parse_power_state(text: str) -> str:
    """``poweredOn`` | ``poweredOff`` | ``suspended`` (the API's spelling) from ``vmsvc/power.getstate``:
    ``Retrieved runtime info`` then ``Powered on`` | ``Powered off`` | ``Suspended``."""
    command = "vim-cmd vmsvc/power.getstate"
    fault = find_fault(text)
    if fault is not None:
        raise CommandError(command, 0, text, "", fault.describe())
    state = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped == "Retrieved runtime info":
            continue
        found = _POWER.get(stripped.lower())
        if found is None or state is not None:
            raise unexpected(command, line)
        state = found
    if state is None:
        raise unexpected(command, text, "no power state in")
    return state
