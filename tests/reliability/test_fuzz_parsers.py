"""Fuzzing every parser of outside input: ``.vmx`` (esxi/vmx.py), VMDK descriptors (vmdk.py), vim-cmd and
esxcli output (vimcmd.py, esxcli.py), and the repository's blobs (chunks.py envelope, crypto.py key files,
index.py disk indexes and digest maps, manifest.py). Seeds are the real samples of ``tests/fixtures/real``
(and, for the repository, objects the code itself writes); each input is fed the way the product feeds it
(bytes from a host decoded as the product decodes them).

Each input must give a result or the parser's documented exception — ``ProtocolError``/``CommandError``
for host output, ``FormatError`` (``IntegrityError``) for repository objects — never another exception
and never a call longer than ``fuzz.CALL_SECONDS``. ``RELIABILITY_LONG=1`` runs many more inputs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from reconciler.esxi import esxcli, vimcmd
from reconciler.esxi.errors import CommandError, ProtocolError
from reconciler.esxi.vmdk import Descriptor
from reconciler.esxi.vmx import VmxFile
from reconciler.facts.points import DiskRecord, RestorePoint, StoredFile, VmRef
from reconciler.repository.chunks import BlobCodec
from reconciler.repository.crypto import KdfParams, KeyFile, MasterKey
from reconciler.repository.errors import FormatError
from reconciler.repository.index import DigestMap, DiskIndex
from reconciler.repository.manifest import decode_manifest, encode_manifest
from tests.reliability.fuzz import (
    Target,
    bounded,
    corpus,
    mutated_bytes,
    mutated_texts,
    run_settings,
)
from tests.reliability.ledger import Ledger

HOST_ERRORS = (ProtocolError, CommandError)


def from_host(text: str) -> str:
    """Text as the product gets vim-cmd output: bytes decoded with replacement characters."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def as_file(text: str) -> str:
    """Text as the product gets a .vmx or descriptor: bytes decoded with surrogate escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")


def encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def fuzz(target: Target, strategy: st.SearchStrategy[Any], ledger: Ledger, *examples: Any) -> None:
    """Run ``target`` over ``strategy`` (plus explicit ``examples``), then count the inputs."""

    @run_settings()
    @given(strategy)
    def run(data: Any) -> None:
        target(data)

    for data in reversed(examples):
        run = example(data)(run)
    try:
        run()
    finally:
        ledger.count("fuzz_inputs", target.runs)


# -- host output -----------------------------------------------------------------------------------------


def _vmx(text: str) -> None:
    vmx = VmxFile.parse(as_file(text))
    vmx.disks(include_independent=True)
    for disk in vmx.disks():
        vmx.cbt_usable(disk.node)
    vmx.set("displayName", "x")
    VmxFile.parse(vmx.dumps())


def test_vmx(ledger: Ledger) -> None:
    fuzz(
        Target("VmxFile.parse", _vmx, (ProtocolError,)),
        mutated_texts(corpus("vmx")),
        ledger,
        'displayName = "caf\udce9 |22quoted|22"\n',  # a Latin-1 byte and an escape in one value
        'a = "' + "|" * 5000 + '"\n',
    )


def _descriptor(text: str) -> None:
    desc = Descriptor.parse(as_file(text))
    _ = (desc.capacity, desc.flat_extent, desc.has_parent, desc.thin, desc.create_type)


def test_vmdk_descriptor(ledger: Ledger) -> None:
    fuzz(
        Target("Descriptor.parse", _descriptor, (ProtocolError,)),
        mutated_texts(corpus("descriptor")),
        ledger,
        "RW " + "9" * 5000 + ' VMFS "x-flat.vmdk"\n',  # more digits than int() converts
        'RW 8 VMFS "x-flat.vmdk" ' + "1" * 5000 + "\n",
    )


# The product parses these outputs (getallvms and power.getstate listings are read by the lab tests only).
VIMCMD_PARSERS: dict[str, Callable[[str], object]] = {
    "snapshot_get": vimcmd.parse_snapshot_get,
    "license": vimcmd.parse_license_editions,
    "fault": vimcmd.find_fault,
    "power_on": lambda text: vimcmd.check_power_output("on", text),
    "power_off": lambda text: vimcmd.check_power_output("off", text),
    "vmkfstools": vimcmd.vmkfstools_failure,
    "esxcli_fs": esxcli.parse_filesystem_list,
}
KINDS = {
    "snapshot_get": ("snapshot_get",),
    "license": ("license",),
    "fault": ("fault",),
    "power_on": ("fault", "power_getstate"),
    "power_off": ("fault", "power_getstate"),
    "vmkfstools": ("vmkfstools",),
    "esxcli_fs": ("esxcli_fs",),
}


@pytest.mark.parametrize("parser", sorted(VIMCMD_PARSERS))
def test_host_command_output(parser: str, ledger: Ledger) -> None:
    parse = VIMCMD_PARSERS[parser]
    fuzz(
        Target(parser, lambda text: parse(from_host(text)), HOST_ERRORS),
        mutated_texts(corpus(*KINDS[parser])),
        ledger,
        "(vim.fault.NotFound) {\n" + '   msg = "never closed\n' * 3000,  # a message that never ends
    )


# -- repository objects ----------------------------------------------------------------------------------

KEY = MasterKey(bytes(range(64)))
CODECS = {"encrypted": BlobCodec(KEY), "plain": BlobCodec(None)}
IDENTITY = b"points/20260101T000000000000Z-00000000"


def _point() -> RestorePoint:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    disk = DiskRecord(
        2000, "Hard disk 1", "[ds] vm/vm.vmdk", 8 << 20, "indexes/ab", "52 aa/3", "maps/cd", 1, 2, 3
    )
    files = (StoredFile("vm.vmx", 100, ("ab" * 32,)),)
    return RestorePoint(
        "20260102T030405000000Z-0123abcd", "p", VmRef("vm", "u", "h", "1"), now, now, now, "success", "cbt",
        "git:abc", files=files, disks=(disk,),
    )  # fmt: skip


def _blob_seeds() -> list[bytes]:
    payloads = [encode_manifest(_point()), b"\x00" * 4096, bytes(range(256)) * 8]
    seeds = []
    for codec in CODECS.values():
        for payload in payloads:
            seeds.append(b"".join(bytes(p) for p in codec.encode(IDENTITY, payload)))
            seeds.append(b"".join(bytes(p) for p in codec.encode(IDENTITY, payload, trailer=False)))
    return seeds


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_blob_envelope(codec: str, ledger: Ledger) -> None:
    decode = CODECS[codec].decode
    fuzz(
        Target(
            f"BlobCodec.decode ({codec})", lambda blob: decode("points/x", IDENTITY, blob), (FormatError,)
        ),
        mutated_bytes(_blob_seeds()),
        ledger,
    )


def test_manifest(ledger: Ledger) -> None:
    seed = encode_manifest(_point())
    fuzz(
        Target("decode_manifest", lambda data: decode_manifest("points/x", data), (FormatError,)),
        st.one_of(mutated_bytes([seed]), mutated_texts([seed.decode()]).map(encoded)),
        ledger,
        seed.replace(b'"size":100', b'"size":1e400'),  # a number JSON reads as infinity
        b"[" * 100_000,  # nesting deeper than the JSON reader recurses
    )


def test_key_file(ledger: Ledger) -> None:
    seed = KeyFile.create(
        KEY, "repo-id", "passphrase", KdfParams(memory_kib=64, iterations=1, lanes=1)
    ).to_json()
    fuzz(
        Target("KeyFile.from_json", lambda data: KeyFile.from_json(data, "keys/x.json"), (FormatError,)),
        st.one_of(mutated_bytes([seed]), mutated_texts([seed.decode()]).map(encoded)),
        ledger,
        seed.replace(b'"iterations": 1', b'"iterations": 1e400'),
        seed.replace(b'"memory_kib": 64', b'"memory_kib": 1099511627776'),  # 1 PiB for Argon2id
    )


def test_key_file_cost_is_bounded() -> None:
    """A key file is read before anything is authenticated: Argon2id parameters from it must not make
    unwrapping allocate or compute without bound (a damaged or planted file is a clean error)."""
    seed = json.loads(
        KeyFile.create(KEY, "r", "pw", KdfParams(memory_kib=64, iterations=1, lanes=1)).to_json().decode()
    )
    for field, value in (("memory_kib", 1 << 40), ("iterations", 1 << 40), ("lanes", 1 << 30)):
        doc = json.loads(json.dumps(seed))
        doc["kdf"][field] = value
        with pytest.raises(FormatError, match=field), bounded("KeyFile.from_json"):
            KeyFile.from_json(json.dumps(doc).encode(), "keys/x.json")


def test_disk_index_and_digest_map(ledger: Ledger) -> None:
    index = DiskIndex(5 << 20, ids=bytearray(b"\x01" * 32 * 5), digest_map=b"\x02" * 32).encode()
    digests = DigestMap("sha256", 64 << 10, 1 << 20, 32, b"\x03" * 32 * 16).encode()

    def both(data: bytes) -> None:
        for decode in (DiskIndex.decode, DigestMap.decode):
            with contextlib.suppress(FormatError):
                decode("indexes/x", data)

    fuzz(Target("DiskIndex/DigestMap.decode", both, (FormatError,)), mutated_bytes([index, digests]), ledger)
