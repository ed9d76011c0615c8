"""``vim-cmd`` over SSH: command builders (always quoted) and output parsers (esxi-reference §2).

Builders return an argv list; :func:`command_line` turns any argv into one shell line with every
element quoted by :func:`shlex.quote`, which is correct for ESXi's BusyBox ``ash`` (single quotes,
``'"'"'`` for an embedded single quote; no other character is special inside single quotes, a line
break included: POSIX makes every character between two single quotes literal, so a VM name or path
holding a newline reaches the command as one argument — tested against BusyBox ``ash`` in the lab).
Only NUL cannot be passed: it ends a C string, so no argv can hold it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from reconciler.esxi.errors import CommandError, ProtocolError

VIM_CMD = "vim-cmd"


def check_arg(value: str) -> str:
    """Refuse what no remote command can receive: NUL (it ends a C string). Line breaks are fine: quoted,
    they stay inside the argument."""
    if "\x00" in value:
        raise ValueError(f"refusing a NUL character in a remote command argument: {value[:60]!r}")
    return value


def command_line(argv: Sequence[str]) -> str:
    """One shell line with every element quoted (and checked by :func:`check_arg`); a line break in an
    element stays inside its single quotes (see :func:`line_breaks_quoted`)."""
    if not argv:
        raise ValueError("empty command")
    return " ".join(shlex.quote(check_arg(str(a))) for a in argv)


def line_breaks_quoted(line: str) -> bool:
    """Whether every line break of a shell line is inside quotes, its quotes are closed and it holds no
    NUL: then the shell reads it as the one line it was built as. Scanned with the POSIX quoting rules
    that BusyBox ``ash`` follows (everything between single quotes is literal; a backslash escapes the
    next character outside them), so a line built by :func:`command_line` passes and a hand-built
    ``echo a<newline>reboot`` does not. A backslash before a line break (a line continuation) fails too."""
    quote = ""
    escaped = False
    for ch in line:
        if ch == "\x00":
            return False
        if escaped:
            if ch in "\n\r":
                return False
            escaped = False
        elif quote == "'":
            quote = "" if ch == "'" else quote
        elif ch == "\\":
            escaped = True
        elif quote == '"':
            quote = "" if ch == '"' else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "\n\r":
            return False
    return not quote and not escaped


# -- builders ------------------------------------------------------------------------------------


def snapshot_get(vmid: str) -> list[str]:
    return [VIM_CMD, "vmsvc/snapshot.get", vmid]


def snapshot_create(vmid: str, name: str, description: str, *, memory: bool, quiesce: bool) -> list[str]:
    flags = ["1" if memory else "0", "1" if quiesce else "0"]
    return [VIM_CMD, "vmsvc/snapshot.create", vmid, name, description, *flags]


def snapshot_remove(vmid: str, snapshot_id: str) -> list[str]:
    if not snapshot_id.isdigit():
        raise ValueError(f"snapshot id must be numeric, got {snapshot_id!r}")
    return [VIM_CMD, "vmsvc/snapshot.remove", vmid, snapshot_id]


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


def vmkfstools_create(path: str, capacity: int, *, thin: bool) -> list[str]:
    """``vmkfstools -c <size>k -d thin|zeroedthick <path>``. ``k`` is a suffix both the vSphere storage
    guide (``size[bB|sS|kK|mM|gG]``) and vmkfstools' own usage (``#[gGmMkK]``) name (docs/lab.md), so the
    exact size is given in KiB; a capacity that is no whole number of KiB cannot be created exactly this
    way (ValueError; :meth:`EsxiHost.create_disk` writes such a descriptor itself)."""
    if capacity <= 0 or capacity % 1024:
        raise ValueError(f"vmkfstools -c takes whole KiB; {capacity} bytes is not one")
    return ["vmkfstools", "-c", f"{capacity // 1024}k", "-d", "thin" if thin else "zeroedthick", path]


_VMKFSTOOLS_FAILURE = re.compile(r"(?:^|: )(Failed to [^\n]*)", re.MULTILINE)


def vmkfstools_failure(text: str) -> str | None:
    """The line that says why vmkfstools failed (``Failed to create virtual disk: … (12)``), ignoring the
    ``DISKLIB-…`` debug noise of ``-v`` and progress such as ``Clone: 19% done.``; the last such line
    wins (vmkfstools retries other methods before giving up)."""
    found = _VMKFSTOOLS_FAILURE.findall(text)
    return found[-1].strip() if found else None


# -- parsers ------------------------------------------------------------------------------------
#
# Every parser here was checked against outputs captured on real hosts (``tests/fixtures/real``,
# ESXi 4 … 9). A line that matches no known shape raises ProtocolError naming the command and quoting
# the line: guessing (e.g. "no licence key found, so licensed") has cost us wrong plans before.

FAULT = re.compile(
    r"^(?:(?P<context>[^\n(]*?): )?\((?P<ns>vim|vmodl)\.fault\.(?P<name>\w+)\)(?: \{)?[ \t]*$", re.MULTILINE
)
"""A fault object, at the start of a line (``(vim.fault.NotFound) {``) or after what vim-cmd was doing
(``Power on failed: (vim.fault.GenericVmConfigFault) {``, ESXi 7–9)."""
_FAULT_MSG = re.compile(r'^(?P<indent>\s*)msg = "(?P<text>.*)$')
_MSG_END = re.compile(r'",?\s*$')


def unexpected(command: str, line: str, why: str = "unexpected line") -> ProtocolError:
    """The error for output we do not understand: names the command and quotes the line."""
    return ProtocolError(f"{command}: {why} {line[:160]!r} (an ESXi output shape this version does not know)")


@dataclass(frozen=True)
class VimFault:
    """A fault printed by vim-cmd: ``(vim.fault.NotFound) { ... msg = "..." }``."""

    type: str
    """e.g. ``vim.fault.NotFound``."""
    msg: str
    context: str = ""
    """What vim-cmd printed before the fault on the same line (``Power on failed``), if anything."""

    def describe(self) -> str:
        """One line for an error message."""
        head = f"{self.context}: {self.type}" if self.context else self.type
        return f"{head}: {self.msg}" if self.msg else head


def _fault_msg(lines: list[str]) -> str:
    """The fault's own ``msg``: the least indented ``msg = "..."`` before the object closes (nested
    faults and messages are deeper); a message may run over several lines; old builds end it with
    ``",`` and new ones with ``"``."""
    best: tuple[int, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == "}" and not line.startswith(" "):
            break
        m = _FAULT_MSG.match(line)
        i += 1
        if m is None:
            continue
        parts = [m.group("text")]
        # only the newest line can end the message: searching the whole text again each time took
        # quadratic time on a message that never closes (fuzzing)
        while not _MSG_END.search(parts[-1]) and i < len(lines):
            parts.append(lines[i])
            i += 1
        text = _MSG_END.sub("", "\n".join(parts))
        indent = len(m.group("indent"))
        if best is None or indent <= best[0]:
            best = (indent, text)
    return best[1] if best else ""


def find_fault(text: str) -> VimFault | None:
    """The first fault object in vim-cmd output, or None."""
    m = FAULT.search(text)
    if m is None:
        return None
    rest = text[m.end() :].split("\n")[1:]
    context = (m.group("context") or "").strip()
    return VimFault(f"{m.group('ns')}.fault.{m.group('name')}", _fault_msg(rest), context)


_POWER_PROGRESS = {
    "on": "Powering on VM:",
    "off": "Powering off VM:",
    "suspend": "Suspending VM:",
    "reset": "Reset VM:",
}


def check_power_output(operation: str, text: str) -> None:
    """Check what ``vmsvc/power.<operation>`` printed. vim-cmd may exit 0 after a failure, so the text
    is the verdict: ``Powering on VM:`` alone is success; a fault (``Power on failed: (vim.fault…)``, ESXi
    7–9; a bare ``(vim.fault…)``, older builds) or a bare ``Power on failed`` (ESXi 6.0/6.5) is an error;
    anything else is an unknown shape. ``shutdown``/``reboot`` print nothing on success."""
    command = f"vim-cmd vmsvc/power.{operation}"
    fault = find_fault(text)
    if fault is not None:
        raise CommandError(command, 0, text, "", fault.describe())
    expected = _POWER_PROGRESS.get(operation)
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped == expected:
            continue
        if re.fullmatch(r"[A-Z][A-Za-z ]* failed\.?", stripped):
            raise CommandError(command, 0, text, "", stripped)
        raise unexpected(command, line)


_SNAPSHOT_HEADERS = frozenset(
    {"Get Snapshot:", "Create Snapshot:", "Remove Snapshot:", "Revert Snapshot:", "Remove All Snapshots:"}
)


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
    """Parse ``vmsvc/snapshot.get`` (and the tree that ``snapshot.remove|revert`` print). Depth is the
    number of leading ``--`` pairs; an empty tree prints only ``Get Snapshot:``; times are M/D/YYYY with
    unpadded fields (``11/30/2017 0:0:4``); a description may run over several lines."""
    command = "vim-cmd vmsvc/snapshot.get"
    out: list[ShellSnapshot] = []
    current: dict[str, str] = {}
    field = ""
    depth = 0
    stack: list[str] = []  # ids by depth

    def flush() -> None:
        if not current:
            return
        if "Id" not in current or "Name" not in current:
            raise unexpected(
                command,
                f"--Snapshot Name        : {current.get('Name', '')}",
                "snapshot without an Id (ESX 4-era output; snapshots are removed by id) at",
            )
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
            continue
        if line.rstrip() in _SNAPSHOT_HEADERS or re.match(r"^(--)*\|-(ROOT|CHILD)$", line):
            field = ""
            continue
        if field in ("Desciption", "Description") and current:
            current[field] += "\n" + line  # a description with line breaks
            continue
        if line.strip():
            raise unexpected(command, line)
    flush()
    return out


_LICENSE_FIELD = re.compile(r"^\s*(serial|vmodl key|name|total|used|unit|Properties):(?:\s+(.*?))?\s*$")
_LICENSE_PROPERTY = re.compile(r"^\s+\[\w+\] = .*$")
_LICENSE_STATUS = re.compile(r"^\[\d{3}\] .*$")


def parse_license_editions(text: str) -> list[str]:
    """The ``vmodl key`` of each licence ``vimsvc/license --show`` reports, e.g.
    ``esx.hypervisor.cpuPackageCoreLimited`` (free), ``esxBasic`` (free, ESX 4), ``eval`` /
    ``esx.eval.entitlement.cpuCoreMin`` (evaluation). Real output starts with ``[200] Sending request for
    installed licenses...`` and indents every field; an unknown line, or no key at all, raises (a host
    must never be taken for licensed because its output was not understood)."""
    command = "vim-cmd vimsvc/license --show"
    keys: list[str] = []
    for line in text.splitlines():
        if not line.strip() or _LICENSE_STATUS.match(line) or _LICENSE_PROPERTY.match(line):
            continue
        m = _LICENSE_FIELD.match(line)
        if m is None:
            raise unexpected(command, line)
        if m.group(1) == "vmodl key":
            if not m.group(2):
                raise unexpected(command, line, "empty licence key in")
            keys.append(m.group(2))
    if not keys:
        raise unexpected(command, text, "no 'vmodl key' in")
    return keys
