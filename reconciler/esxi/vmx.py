"""Read and write ``.vmx`` (and ``.vmsd``) files, per esxi-reference §3.

Format: one ``key = "value"`` per line; values are always double-quoted and escaped with ``|XX``
(``|`` + two hex digits of the UTF-8 byte): we decode every ``|XX`` on read and, on write, escape
``"``, ``|``, ``#`` and control characters (what ESXi and libvirt's vmx.c do). Keys are
case-insensitive for lookups (ESXi writes ``fileName`` but accepts ``filename``); the original spelling
and line order are kept when a file is rewritten, so an edit changes only the edited lines.
Booleans are compared case-insensitively (``TRUE``/``true``/``True``).

A device is a backed-up disk when ``present`` is TRUE, ``fileName`` ends in ``.vmdk`` and
``deviceType`` is not a CD-ROM; ``mode`` independent-* disks are excluded (snapshots do not cover them)
and reported as such.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from reconciler.esxi.errors import ProtocolError

_LINE = re.compile(r'^\s*([^=\s#][^=]*?)\s*=\s*"(.*)"\s*$')
_ESCAPE = re.compile(r"\|([0-9A-Fa-f]{2})")
_DISK_NODE = re.compile(r"^((?:scsi|sata|ide|nvme)\d+:\d+)\.present$", re.IGNORECASE)


def decode_value(raw: str) -> str:
    """Decode ``|XX`` escapes (sequences of them form UTF-8 bytes)."""
    if "|" not in raw:
        return raw
    data = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(raw):
        data += raw[pos : m.start()].encode("utf-8", "surrogateescape")
        data.append(int(m.group(1), 16))
        pos = m.end()
    data += raw[pos:].encode("utf-8", "surrogateescape")
    return data.decode("utf-8", errors="surrogateescape")


def encode_value(value: str) -> str:
    """Escape a value for a ``.vmx`` line (the inverse of :func:`decode_value`)."""
    out = []
    for ch in value:
        if ch in '"|#' or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"|{ord(ch):02X}")
        else:
            out.append(ch)
    return "".join(out)


def is_true(value: str | None) -> bool:
    """VMware boolean: TRUE/true/yes/1 (case-insensitive) is true; anything else, or unset, is false."""
    return value is not None and value.strip().lower() in ("true", "yes", "1")


@dataclass(frozen=True)
class VmxDisk:
    """A disk device as the .vmx declares it."""

    node: str
    """``scsi0:0``, ``sata0:1`` … (as spelled in the file)."""
    file_name: str
    """Relative to the VM folder, or absolute ``/vmfs/volumes/...``."""
    device_type: str | None
    mode: str | None
    ctk_enabled: bool

    @property
    def independent(self) -> bool:
        """Independent disks are not covered by snapshots: they cannot be hot-backed up."""
        return (self.mode or "").lower().startswith("independent")


class VmxFile:
    """A parsed .vmx/.vmsd: ordered entries, case-insensitive lookup, minimal rewrites."""

    def __init__(self, lines: list[str] | None = None) -> None:
        self._lines: list[str] = []
        self._index: dict[str, tuple[int, str, str]] = {}  # lower key → (line no, key, value)
        for line in lines or []:
            self._append_line(line)

    # -- parsing

    @classmethod
    def parse(cls, text: str) -> VmxFile:
        """Parse the text of a .vmx; comments and blank lines are kept as they are."""
        return cls(text.splitlines())

    def _append_line(self, line: str) -> None:
        m = _LINE.match(line)
        if m is None:
            if line.strip() and not line.lstrip().startswith("#"):
                raise ProtocolError(f"not a .vmx line: {line[:120]!r}")
            self._lines.append(line)
            return
        key, value = m.group(1), decode_value(m.group(2))
        self._index[key.lower()] = (len(self._lines), key, value)
        self._lines.append(line)

    # -- access

    def get(self, key: str, default: str | None = None) -> str | None:
        """The decoded value of ``key`` (case-insensitive), or ``default``."""
        entry = self._index.get(key.lower())
        return default if entry is None else entry[2]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._index

    def items(self) -> list[tuple[str, str]]:
        """(key, decoded value) in file order."""
        return [(k, v) for _, k, v in sorted(self._index.values())]

    def is_true(self, key: str) -> bool:
        """Whether ``key`` holds a true boolean."""
        return is_true(self.get(key))

    def set(self, key: str, value: str) -> None:
        """Set ``key`` (replacing its line in place, or appending a line)."""
        entry = self._index.get(key.lower())
        line = f'{entry[1] if entry else key} = "{encode_value(value)}"'
        if entry is None:
            self._index[key.lower()] = (len(self._lines), key, value)
            self._lines.append(line)
        else:
            self._lines[entry[0]] = line
            self._index[key.lower()] = (entry[0], entry[1], value)

    def remove(self, key: str) -> None:
        """Remove ``key`` if present."""
        entry = self._index.pop(key.lower(), None)
        if entry is None:
            return
        del self._lines[entry[0]]
        self._index = {k: ((n - 1 if n > entry[0] else n), kk, v) for k, (n, kk, v) in self._index.items()}

    def dumps(self) -> str:
        """The file text (``\\n`` line ends, final newline)."""
        return "\n".join(self._lines) + "\n"

    # -- disks and CBT

    def disks(self, *, include_independent: bool = False) -> list[VmxDisk]:
        """Disks per esxi-reference §3: present, a .vmdk fileName, not a CD-ROM; independent ones only
        when ``include_independent``."""
        out = []
        for key, _value in self.items():
            m = _DISK_NODE.match(key)
            if m is None or not self.is_true(key):
                continue
            node = m.group(1)
            file_name = self.get(f"{node}.fileName")
            device_type = self.get(f"{node}.deviceType")
            if not file_name or not file_name.lower().endswith(".vmdk"):
                continue
            if device_type and "cdrom" in device_type.lower():
                continue
            disk = VmxDisk(
                node=node,
                file_name=file_name,
                device_type=device_type,
                mode=self.get(f"{node}.mode"),
                ctk_enabled=self.is_true(f"{node}.ctkEnabled"),
            )
            if disk.independent and not include_independent:
                continue
            out.append(disk)
        return out

    @property
    def ctk_enabled(self) -> bool:
        """VM-level ``ctkEnabled``."""
        return self.is_true("ctkEnabled")

    @property
    def ctk_disallowed(self) -> bool:
        """``ctkDisallowed = TRUE`` forbids CBT."""
        return self.is_true("ctkDisallowed")

    def cbt_usable(self, node: str) -> bool:
        """CBT configured for the disk at ``node``: both enables TRUE and not disallowed."""
        return self.ctk_enabled and not self.ctk_disallowed and self.is_true(f"{node}.ctkEnabled")

    def set_cbt(self, enabled: bool) -> None:
        """Set ``ctkEnabled`` and every disk's ``ctkEnabled`` (the file must be edited with the VM off)."""
        flag = "TRUE" if enabled else "FALSE"
        self.set("ctkEnabled", flag)
        for disk in self.disks():
            self.set(f"{disk.node}.ctkEnabled", flag)


_IDENTITY_KEYS = ("uuid.bios", "uuid.location", "vc.uuid")


def new_vmx_uuid() -> str:
    """A random UUID in VMware's spelling (``56 4d 9a … 1c-4e 2b …``: 8 bytes, dash, 8 bytes), as in
    ``uuid.bios`` and a descriptor's ``ddb.uuid``."""
    raw = secrets.token_bytes(16)
    return " ".join(f"{b:02x}" for b in raw[:8]) + "-" + " ".join(f"{b:02x}" for b in raw[8:])


_ETHERNET = re.compile(r"^(ethernet\d+)\.present$", re.IGNORECASE)
_CTK = re.compile(r"^(?:ctkEnabled|(?:scsi|sata|ide|nvme)\d+:\d+\.ctkEnabled)$", re.IGNORECASE)


def prepare_restored_vmx(
    vmx: VmxFile,
    *,
    display_name: str,
    disk_files: dict[str, str],
    nvram: str | None,
    keep_identity: bool,
) -> list[str]:
    """Rewrite a backed-up .vmx (in place) for a VM restored beside the original: ``displayName``, each
    restored disk's ``fileName`` (``disk_files``: node → file name), ``nvram``; CBT keys removed (the
    restored disks have no change tracking; the reconciler switches it on again); and unless
    ``keep_identity``: new BIOS and vCenter UUIDs (written right away, so the VM's uuid does not change
    when the host re-reads the .vmx), ``uuid.location`` and MAC addresses removed so ESXi generates new
    ones, ``uuid.action = "create"`` (with ``keep_identity``: ``"keep"``, which also avoids the "moved or
    copied?" question). Disks of the .vmx that are not restored are switched off (``present = FALSE``).
    Returns the nodes switched off."""
    vmx.set("displayName", display_name)
    if nvram is not None:
        vmx.set("nvram", nvram)
    elif "nvram" in vmx:
        vmx.remove("nvram")
    dropped = []
    for disk in vmx.disks(include_independent=True):
        if disk.node.lower() in {n.lower() for n in disk_files}:
            continue
        vmx.set(f"{disk.node}.present", "FALSE")
        dropped.append(disk.node)
    for node, name in disk_files.items():
        vmx.set(f"{node}.fileName", name)
    for key, _ in vmx.items():
        if _CTK.match(key):
            vmx.remove(key)
    for key in ("sched.swap.derivedName", "migrate.hostLog"):
        vmx.remove(key)  # point into the original VM's folder
    if keep_identity:
        vmx.set("uuid.action", "keep")
        return dropped
    for key in _IDENTITY_KEYS:
        vmx.remove(key)
    vmx.set("uuid.bios", new_vmx_uuid())  # written now, so the VM's uuid is stable from the start
    vmx.set("vc.uuid", new_vmx_uuid())
    for key, _ in vmx.items():
        m = _ETHERNET.match(key)
        if m is None:
            continue
        nic = m.group(1)
        for suffix in ("address", "generatedAddress", "generatedAddressOffset"):
            vmx.remove(f"{nic}.{suffix}")
        vmx.set(f"{nic}.addressType", "generated")
    vmx.set("uuid.action", "create")
    return dropped
