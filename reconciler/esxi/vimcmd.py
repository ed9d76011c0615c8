"""``vim-cmd`` over SSH: command builders (always quoted) and output parsers (esxi-reference §2).

Builders return an argv list; :func:`command_line` turns any argv into one shell line with every
element quoted by :func:`shlex.quote`, which is correct for ESXi's BusyBox ``ash`` (single quotes,
``'"'"'`` for an embedded single quote; no other character is special inside single quotes).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from reconciler.esxi.errors import ProtocolError

VIM_CMD = "vim-cmd"

GETALLVMS_ROW = re.compile(r"^(\d+)\s+(.*?)\s+(\[[^\]]+\] .*?\.vmx)\s+(\S+)\s+(vmx-\d+)\s*(.*)$")
FAULT = re.compile(r"^\((vim|vmodl)\.fault\.(\w+)\)", re.MULTILINE)
_FAULT_MSG = re.compile(r'^\s*msg = "(.*)"\s*$', re.MULTILINE)


def check_arg(value: str) -> str:
    """Refuse what cannot be passed safely to a remote command: line breaks and NUL."""
    if "\n" in value or "\r" in value or "\x00" in value:
        raise ValueError(f"refusing a line break or NUL in a remote command argument: {value[:60]!r}")
    return value


def command_line(argv: Sequence[str]) -> str:
    """One shell line with every element quoted (and checked by :func:`check_arg`)."""
    if not argv:
        raise ValueError("empty command")
    return " ".join(shlex.quote(check_arg(str(a))) for a in argv)


# -- builders ------------------------------------------------------------------------------------


def getallvms() -> list[str]:
    return [VIM_CMD, "vmsvc/getallvms"]


def power_getstate(vmid: str) -> list[str]:
    return [VIM_CMD, "vmsvc/power.getstate", vmid]


def snapshot_get(vmid: str) -> list[str]:
    return [VIM_CMD, "vmsvc/snapshot.get", vmid]


def snapshot_create(vmid: str, name: str, description: str, *, memory: bool, quiesce: bool) -> list[str]:
    flags = ["1" if memory else "0", "1" if quiesce else "0"]
    return [VIM_CMD, "vmsvc/snapshot.create", vmid, name, description, *flags]


def snapshot_remove(vmid: str, snapshot_id: str) -> list[str]:
    if not snapshot_id.isdigit():
        raise ValueError(f"snapshot id must be numeric, got {snapshot_id!r}")
    return [VIM_CMD, "vmsvc/snapshot.remove", vmid, snapshot_id]


def get_config(vmid: str) -> list[str]:
    return [VIM_CMD, "vmsvc/get.config", vmid]


def reload(vmid: str) -> list[str]:
    return [VIM_CMD, "vmsvc/reload", vmid]


def power(vmid: str, operation: str) -> list[str]:
    """``vmsvc/power.on|off|shutdown``; ``shutdown`` asks the guest through VMware Tools."""
    if operation not in ("on", "off", "shutdown"):
        raise ValueError(f"unknown power operation {operation!r}")
    return [VIM_CMD, f"vmsvc/power.{operation}", vmid]


def registervm(vmx_path: str) -> list[str]:
    """``solo/registervm /vmfs/volumes/…/x.vmx``: prints the new Vmid."""
    return [VIM_CMD, "solo/registervm", vmx_path]


def unregister(vmid: str) -> list[str]:
    return [VIM_CMD, "vmsvc/unregister", vmid]


def license_show() -> list[str]:
    return [VIM_CMD, "vimsvc/license", "--show"]


# -- parsers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VimFault:
    """A fault printed by vim-cmd: ``(vim.fault.NotFound) { ... msg = "..." }``."""

    type: str
    """e.g. ``vim.fault.NotFound``."""
    msg: str


def find_fault(text: str) -> VimFault | None:
    """The first fault object in vim-cmd output, or None."""
    m = FAULT.search(text)
    if m is None:
        return None
    msg = _FAULT_MSG.search(text, m.end())
    return VimFault(f"{m.group(1)}.fault.{m.group(2)}", msg.group(1) if msg else "")


@dataclass(frozen=True)
class VmRow:
    """One VM of ``getallvms``."""

    vmid: str
    name: str
    vmx: str
    guest: str
    version: str
    annotation: str


def parse_getallvms(text: str) -> list[VmRow]:
    """Rows anchored on the ``[ds] path.vmx`` column; other lines continue the previous annotation;
    ``Skipping invalid VM`` lines are dropped."""
    rows: list[VmRow] = []
    lines = text.splitlines()
    if not lines or not lines[0].startswith("Vmid"):
        raise ProtocolError(f"unexpected getallvms output: {text[:200]!r}")
    for line in lines[1:]:
        m = GETALLVMS_ROW.match(line)
        if m:
            rows.append(VmRow(*(g.strip() if i != 1 else g for i, g in enumerate(m.groups()))))
        elif rows and line.strip() and not line.startswith("Skipping invalid VM"):
            last = rows[-1]
            rows[-1] = VmRow(
                last.vmid, last.name, last.vmx, last.guest, last.version, f"{last.annotation}\n{line}"
            )
    return rows


_POWER = {"powered on": "poweredOn", "powered off": "poweredOff", "suspended": "suspended"}


def parse_power_state(text: str) -> str:
    """``poweredOn`` | ``poweredOff`` | ``suspended`` (the API's spelling)."""
    for line in text.splitlines():
        state = _POWER.get(line.strip().lower())
        if state:
            return state
    raise ProtocolError(f"no power state in: {text[:200]!r}")


@dataclass(frozen=True)
class ShellSnapshot:
    """One snapshot of ``snapshot.get`` (the tree flattened, parents first)."""

    id: str
    name: str
    description: str
    created: datetime | None
    state: str
    depth: int
    parent_id: str | None


def parse_snapshot_get(text: str) -> list[ShellSnapshot]:
    """Parse ``vmsvc/snapshot.get``. Depth is the number of leading ``--`` pairs; an empty tree prints
    only ``Get Snapshot:``."""
    out: list[ShellSnapshot] = []
    current: dict[str, str] = {}
    depth = 0
    stack: list[str] = []  # ids by depth

    def flush() -> None:
        if not current:
            return
        if "Id" not in current or "Name" not in current:
            raise ProtocolError(f"snapshot entry without name or id: {current}")
        created = None
        with_date = current.get("Created On", "").strip()
        if with_date:
            try:
                created = datetime.strptime(with_date, "%m/%d/%Y %H:%M:%S")
            except ValueError:
                created = None
        del stack[depth - 1 :]
        parent = stack[-1] if stack else None
        stack.append(current["Id"])
        out.append(
            ShellSnapshot(
                id=current["Id"].strip(),
                name=current["Name"],
                description=current.get("Desciption", current.get("Description", "")),
                created=created,
                state=current.get("State", "").strip(),
                depth=depth,
                parent_id=parent,
            )
        )
        current.clear()

    for line in text.splitlines():
        m = re.match(r"^((?:--)+)Snapshot ([A-Za-z ]+?)\s*: ?(.*)$", line)
        if m:
            level = len(m.group(1)) // 2
            field = m.group(2).strip()
            if field == "Name":
                flush()
                depth = level
            current[field] = m.group(3)
        elif line.startswith(("Get Snapshot:", "Remove Snapshot:", "Create Snapshot:")) or re.match(
            r"^(--)*\|-(ROOT|CHILD)$", line
        ):
            continue
        elif line.strip():
            raise ProtocolError(f"unexpected snapshot.get line: {line[:120]!r}")
    flush()
    return out


def parse_change_tracking_enabled(text: str) -> bool | None:
    """``changeTrackingEnabled`` of ``vmsvc/get.config`` (None if absent or unset)."""
    m = re.search(r"^\s*changeTrackingEnabled = (true|false|<unset>)", text, re.MULTILINE)
    if m is None or m.group(1) == "<unset>":
        return None
    return m.group(1) == "true"


def parse_license_edition(text: str) -> str | None:
    """The ``vmodl key`` of ``vimsvc/license --show`` (e.g. ``esx.hypervisor.cpuPackageCoreLimited``)."""
    m = re.search(r"^vmodl key: (\S+)", text, re.MULTILINE)
    return m.group(1) if m else None
