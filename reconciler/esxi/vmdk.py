"""Read and write VMDK *descriptor* files (esxi-reference §4).

Header ``key=value`` lines (``version``, ``encoding``, ``CID``, ``parentCID``, ``isNativeSnapshot``,
``createType``, ``parentFileNameHint``, ``changeTrackPath``), extent lines
``ACCESS SECTORS TYPE "file" [offset]`` and ``ddb.* = "value"`` lines.

Quoting: VMware writes file names between double quotes *without* escaping quotes inside them (a VM
named ``a "b"`` gets ``RW 8 VMFS "a "b"-flat.vmdk"``), so a quoted value runs from the first to the
last double quote of its line; the optional extent offset is the bare number after the closing quote.
Writing does the same (no escaping). A newline in a name cannot be represented and is refused.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from reconciler.esxi.errors import ProtocolError
from reconciler.esxi.vmx import new_vmx_uuid

SECTOR = 512
NO_PARENT = "ffffffff"
_EXTENT = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"(.*)"(?:\s+(\d+))?)?\s*$')
_KV = re.compile(r"^\s*([A-Za-z][\w.]*)\s*=\s*(.*?)\s*$")
FLAT_TYPES = frozenset({"VMFS", "FLAT"})


def _unquote(raw: str) -> str:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
        return raw[1:-1]
    return raw


@dataclass(frozen=True)
class Extent:
    """One extent line."""

    access: str
    sectors: int
    type: str
    file_name: str | None
    offset: int = 0

    @property
    def size(self) -> int:
        """Bytes covered by this extent."""
        return self.sectors * SECTOR

    def line(self) -> str:
        """The extent line as written in a descriptor."""
        if self.file_name is None:
            return f"{self.access} {self.sectors} {self.type}"
        _check_name(self.file_name)
        tail = f" {self.offset}" if self.offset or self.type == "FLAT" else ""
        return f'{self.access} {self.sectors} {self.type} "{self.file_name}"{tail}'


def _check_name(name: str) -> None:
    if "\n" in name or "\r" in name:
        raise ValueError("a VMDK file name cannot contain a line break")


@dataclass
class Descriptor:
    """A parsed descriptor. ``header`` keeps every header key (values unquoted), ``ddb`` the ddb.* keys."""

    header: dict[str, str] = field(default_factory=dict)
    extents: list[Extent] = field(default_factory=list)
    ddb: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Descriptor:
        """Parse a descriptor; raises ProtocolError when it is not one."""
        if "\x00" in text[:1024]:
            raise ProtocolError("binary data where a VMDK descriptor was expected")
        d = cls()
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = _EXTENT.match(line)
            if m:
                try:
                    sectors, offset = int(m.group(2)), int(m.group(5) or 0)
                except ValueError:  # more digits than int() converts: no disk is that large
                    raise ProtocolError(f"VMDK extent with an impossible size: {line[:120]!r}") from None
                d.extents.append(Extent(m.group(1), sectors, m.group(3).upper(), m.group(4), offset))
                continue
            kv = _KV.match(line)
            if kv is None:
                raise ProtocolError(f"not a VMDK descriptor line: {line[:120]!r}")
            key, value = kv.group(1), _unquote(kv.group(2))
            if key.startswith("ddb."):
                d.ddb[key] = value
            else:
                d.header[key] = value
        if not d.extents:
            raise ProtocolError("VMDK descriptor without extents")
        return d

    # -- fields

    @property
    def create_type(self) -> str:
        return self.header.get("createType", "")

    @property
    def cid(self) -> str | None:
        return self.header.get("CID")

    @property
    def parent_cid(self) -> str | None:
        return self.header.get("parentCID")

    @property
    def has_parent(self) -> bool:
        """Whether this is a delta (parentCID set and not ffffffff)."""
        return (self.parent_cid or NO_PARENT).lower() != NO_PARENT

    @property
    def parent_file_name_hint(self) -> str | None:
        return self.header.get("parentFileNameHint")

    @property
    def change_track_path(self) -> str | None:
        return self.header.get("changeTrackPath")

    @property
    def capacity(self) -> int:
        """Disk size in bytes: the sum of the extents."""
        return sum(e.size for e in self.extents)

    @property
    def thin(self) -> bool:
        return self.ddb.get("ddb.thinProvisioned") == "1"

    @property
    def flat_extent(self) -> Extent | None:
        """The single raw (VMFS/FLAT) extent of a base disk, or None (delta, sparse, several extents …)."""
        if len(self.extents) == 1 and self.extents[0].type in FLAT_TYPES and not self.has_parent:
            return self.extents[0]
        return None

    # -- writing

    def dumps(self) -> str:
        """Descriptor text in VMware's layout."""
        lines = ["# Disk DescriptorFile"]
        quoted = {"encoding", "createType", "isNativeSnapshot", "parentFileNameHint", "changeTrackPath"}
        for key, value in self.header.items():
            _check_name(value)
            lines.append(f'{key}="{value}"' if key in quoted else f"{key}={value}")
        lines += ["", "# Extent description"]
        lines += [e.line() for e in self.extents]
        lines += ["", "# The Disk Data Base", "#DDB", ""]
        for key, value in self.ddb.items():
            _check_name(value)
            lines.append(f'{key} = "{value}"')
        return "\n".join(lines) + "\n"


def new_cid() -> str:
    """A random content id (8 hex digits, never ``ffffffff``)."""
    while True:
        cid = secrets.token_hex(4)
        if cid != NO_PARENT:
            return cid


def flat_descriptor(
    flat_name: str,
    capacity: int,
    *,
    create_type: str = "vmfs",
    thin: bool = True,
    adapter: str = "lsilogic",
    hw_version: str = "14",
) -> Descriptor:
    """The descriptor of a new base disk whose data is the raw file ``flat_name``: ``createType="vmfs"``
    with a ``VMFS`` extent (on a datastore) or ``"monolithicFlat"`` with a ``FLAT`` extent at offset 0
    (hosted products, ``qemu-img``, VirtualBox)."""
    if capacity % SECTOR:
        raise ValueError(f"capacity {capacity} is not a multiple of {SECTOR}")
    _check_name(flat_name)
    sectors = capacity // SECTOR
    extent_type = "VMFS" if create_type == "vmfs" else "FLAT"
    ddb = {"ddb.adapterType": adapter, "ddb.virtualHWVersion": hw_version, "ddb.uuid": new_vmx_uuid()}
    if create_type != "vmfs":  # hosted tools want a geometry
        cylinders = min(65535, max(1, sectors // (255 * 63)))
        ddb.update({"ddb.geometry.cylinders": str(cylinders), "ddb.geometry.heads": "255"})
        ddb["ddb.geometry.sectors"] = "63"
    if thin and create_type == "vmfs":
        ddb["ddb.thinProvisioned"] = "1"
    return Descriptor(
        header={
            "version": "1",
            "encoding": "UTF-8",
            "CID": new_cid(),
            "parentCID": NO_PARENT,
            "createType": create_type,
        },
        extents=[Extent("RW", sectors, extent_type, flat_name, 0)],
        ddb=ddb,
    )


def vmfs_descriptor(
    flat_name: str, capacity: int, *, thin: bool = True, adapter: str = "lsilogic", hw_version: str = "14"
) -> str:
    """Text of a ``createType="vmfs"`` descriptor for a datastore (see :func:`flat_descriptor`)."""
    return flat_descriptor(flat_name, capacity, thin=thin, adapter=adapter, hw_version=hw_version).dumps()
