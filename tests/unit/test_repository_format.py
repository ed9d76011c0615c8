"""Repository binary formats: the blob envelope, chunk ids, disk indexes, digest maps, manifests."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.facts.points import (
    DiskRecord,
    RestorePoint,
    StoredFile,
    VmRef,
    group_points,
    new_point_id,
)
from reconciler.repository.chunks import (
    FLAG_AEAD,
    FLAG_ZSTD,
    HEADER_SIZE,
    HOLE,
    MAGIC,
    BlobCodec,
    chunk_name,
    is_zero,
)
from reconciler.repository.crypto import MasterKey
from reconciler.repository.errors import FormatError, IntegrityError
from reconciler.repository.index import DigestMap, DiskIndex
from reconciler.repository.lock import LockInfo
from reconciler.repository.manifest import decode_manifest, encode_manifest
from reconciler.repository.repo import RepositoryConfig

KEY = MasterKey(bytes(range(64)))
PLAIN = BlobCodec(None, 3)
SEALED = BlobCodec(KEY, 3)


def join(parts: tuple[bytes | bytearray | memoryview, ...]) -> bytes:
    return b"".join(bytes(p) for p in parts)


class TestChunkIds:
    def test_plain_ids_are_sha256_of_the_plaintext(self) -> None:
        assert PLAIN.id_of(b"abc") == hashlib.sha256(b"abc").digest()

    def test_encrypted_ids_are_keyed_and_differ_from_sha256(self) -> None:
        other = BlobCodec(MasterKey(bytes(64)), 3)
        assert SEALED.id_of(b"abc") != hashlib.sha256(b"abc").digest()
        assert SEALED.id_of(b"abc") != other.id_of(b"abc")
        assert SEALED.id_of(b"abc") == SEALED.id_of(b"abc")

    def test_chunk_name_fans_out_by_first_byte(self) -> None:
        cid = bytes.fromhex("3f" + "00" * 31)
        assert chunk_name(cid) == "chunks/3f/3f" + "00" * 31

    def test_is_zero(self) -> None:
        assert is_zero(bytes(1 << 20))
        assert is_zero(b"")
        assert is_zero(bytes(3 << 20))
        assert not is_zero(bytes(1 << 20)[:-1] + b"\x01")
        assert not is_zero(bytes(2 << 20) + b"\x01")


class TestBlobEnvelope:
    @pytest.mark.parametrize("codec", [PLAIN, SEALED], ids=["plain", "encrypted"])
    def test_compressible_chunk_is_compressed_and_round_trips(self, codec: BlobCodec) -> None:
        data = b"hello world " * 80000
        enc = codec.encode_chunk(data)
        blob = join(enc.parts)
        assert blob[:4] == MAGIC and blob[4] == 1
        assert blob[5] & FLAG_ZSTD
        assert len(blob) < len(data) // 10
        assert codec.decode_chunk(enc.id, blob) == data

    @pytest.mark.parametrize("codec", [PLAIN, SEALED], ids=["plain", "encrypted"])
    def test_incompressible_chunk_is_stored_raw(self, codec: BlobCodec) -> None:
        data = os.urandom(1 << 20)
        enc = codec.encode_chunk(data)
        blob = join(enc.parts)
        assert not blob[5] & FLAG_ZSTD
        assert codec.decode_chunk(enc.id, blob) == data

    def test_no_compression_level_none(self) -> None:
        codec = BlobCodec(None, None)
        enc = codec.encode_chunk(b"a" * 10000)
        assert not join(enc.parts)[5] & FLAG_ZSTD

    def test_encrypted_blob_hides_the_plaintext(self) -> None:
        data = b"SECRET-PAYLOAD-" * 1000
        blob = join(SEALED.encode(b"id", data, trailer=True))
        assert blob[5] & FLAG_AEAD
        assert b"SECRET" not in blob
        # two encodings of the same data differ (random nonce)
        assert blob != join(SEALED.encode(b"id", data, trailer=True))

    @pytest.mark.parametrize("codec", [PLAIN, SEALED], ids=["plain", "encrypted"])
    def test_flipped_byte_anywhere_is_an_integrity_error_naming_the_chunk(self, codec: BlobCodec) -> None:
        data = b"0123456789abcdef" * 4096
        enc = codec.encode_chunk(data)
        blob = bytearray(join(enc.parts))
        for position in (6, HEADER_SIZE, HEADER_SIZE + 20, len(blob) - 1):
            damaged = bytearray(blob)
            damaged[position] ^= 0x40
            with pytest.raises(IntegrityError) as err:
                codec.decode_chunk(enc.id, bytes(damaged))
            assert chunk_name(enc.id) in str(err.value)

    def test_plain_metadata_blob_has_a_checksum_trailer(self) -> None:
        blob = bytearray(join(PLAIN.encode(b"index:x", b"payload" * 100, trailer=True)))
        assert PLAIN.decode("indexes/x", b"index:x", bytes(blob)) == b"payload" * 100
        blob[-40] ^= 1
        with pytest.raises(IntegrityError, match="indexes/x"):
            PLAIN.decode("indexes/x", b"index:x", bytes(blob))

    def test_blob_is_bound_to_its_identity(self) -> None:
        blob = join(SEALED.encode(b"point:a", b"{}", trailer=True))
        with pytest.raises(IntegrityError, match="points/b"):
            SEALED.decode("points/b", b"point:b", blob)

    def test_unknown_blob_version_is_rejected(self) -> None:
        blob = bytearray(join(PLAIN.encode(b"x", b"data", trailer=True)))
        blob[4] = 2
        with pytest.raises(FormatError, match="unsupported blob version 2"):
            PLAIN.decode("indexes/x", b"x", bytes(blob))

    def test_plaintext_blob_refused_in_an_encrypted_repository(self) -> None:
        blob = join(PLAIN.encode(b"x", b"data", trailer=True))
        with pytest.raises(IntegrityError, match="unencrypted blob"):
            SEALED.decode("points/x", b"x", blob)

    def test_truncated_and_garbage_blobs(self) -> None:
        with pytest.raises(IntegrityError, match="truncated"):
            PLAIN.decode("chunks/00/x", b"x", b"ERB")
        with pytest.raises(IntegrityError, match="bad magic"):
            PLAIN.decode("chunks/00/x", b"x", b"NOPE" + bytes(40))

    @settings(max_examples=60, deadline=None)
    @given(data=st.binary(max_size=200_000), encrypted=st.booleans(), level=st.sampled_from([None, 1, 3]))
    def test_round_trip_of_random_data(self, data: bytes, encrypted: bool, level: int | None) -> None:
        codec = BlobCodec(KEY if encrypted else None, level)
        enc = codec.encode_chunk(data)
        assert codec.decode_chunk(enc.id, join(enc.parts)) == data


class TestDiskIndex:
    def test_new_index_is_all_holes(self) -> None:
        index = DiskIndex(3 * (1 << 20) + 5)
        assert index.count == 4
        assert index.holes() == 4
        assert index.chunk_length(3) == 5
        assert index.referenced() == set()

    def test_round_trip(self) -> None:
        index = DiskIndex(5 << 20, digest_map=b"\x07" * 32)
        index[1] = b"\x01" * 32
        index[4] = b"\x02" * 32
        decoded = DiskIndex.decode("indexes/x", index.encode())
        assert decoded == index
        assert decoded[1] == b"\x01" * 32 and decoded[0] == HOLE
        assert decoded.digest_map == b"\x07" * 32

    def test_layout_matches_the_format_document(self) -> None:
        payload = DiskIndex(3 << 20).encode()
        magic, version, _, chunk_size, capacity, count = struct.unpack_from("<4sHHIQQ", payload)
        assert (magic, version, chunk_size, capacity, count) == (b"ERIX", 1, 1 << 20, 3 << 20, 3)
        assert len(payload) == 60 + 3 * 32

    def test_truncated_index_is_an_error(self) -> None:
        payload = DiskIndex(4 << 20).encode()
        with pytest.raises(FormatError, match="truncated index"):
            DiskIndex.decode("indexes/x", payload[:-1])
        with pytest.raises(FormatError, match="truncated index header"):
            DiskIndex.decode("indexes/x", payload[:10])

    def test_unknown_index_version_is_rejected(self) -> None:
        payload = bytearray(DiskIndex(1 << 20).encode())
        payload[4] = 9
        with pytest.raises(FormatError, match="unsupported index version 9"):
            DiskIndex.decode("indexes/x", bytes(payload))


class TestDigestMap:
    def test_round_trip(self) -> None:
        dm = DigestMap("sha1", 65536, 200_000, 20, os.urandom(4 * 20))
        decoded = DigestMap.decode("digests/x", dm.encode())
        assert decoded == dm
        assert decoded.digest(3) == dm.digests[60:80]

    def test_wrong_digest_length_is_refused(self) -> None:
        with pytest.raises(ValueError, match="expected 80 digest bytes"):
            DigestMap("sha1", 65536, 200_000, 20, bytes(79))

    def test_unknown_version_and_truncation(self) -> None:
        payload = bytearray(DigestMap("md5", 65536, 65536, 16, bytes(16)).encode())
        with pytest.raises(FormatError, match="truncated digest map"):
            DigestMap.decode("digests/x", bytes(payload[:-1]))
        payload[4] = 7
        with pytest.raises(FormatError, match="unsupported digest map version 7"):
            DigestMap.decode("digests/x", bytes(payload))


def make_point(policy: str = "nightly", vm: str = "web01", when: datetime | None = None) -> RestorePoint:
    moment = when or datetime(2026, 11, 26, 2, 0, tzinfo=timezone.utc)
    return RestorePoint(
        id=new_point_id(moment),
        policy=policy,
        vm=VmRef(vm, f"uuid-{vm}", "esxi1", "12"),
        started=moment,
        snapshot_time=moment,
        finished=moment,
        status="success",
        mode="cbt",
        config_revision="git:abc",
        files=(StoredFile("web01.vmx", 3, ("ab" * 32,)),),
        disks=(DiskRecord(2000, "Hard disk 1", "[ds1] web01/web01.vmdk", 1 << 30, "cd" * 32, "52 de/17"),),
    )


class TestManifest:
    def test_point_ids_sort_by_time(self) -> None:
        early = new_point_id(datetime(2026, 1, 1, tzinfo=timezone.utc))
        late = new_point_id(datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc))
        assert early < late
        assert early.startswith("20260101T000000000000Z-")

    def test_round_trip_keeps_unknown_keys(self) -> None:
        point = make_point()
        doc = json.loads(encode_manifest(point))
        doc["future_field"] = {"x": 1}
        decoded = decode_manifest(point.name, json.dumps(doc).encode())
        assert decoded == point
        assert decoded.extra == {"future_field": {"x": 1}}
        assert json.loads(encode_manifest(decoded))["future_field"] == {"x": 1}

    def test_each_disks_mode_and_reasons_round_trip(self) -> None:
        point = make_point()
        disk = replace(point.disks[0], mode="full", reasons=("CBT was reset", "no digest map"))
        point = replace(point, mode="full", disks=(disk,))
        doc = json.loads(encode_manifest(point))
        assert doc["disks"][0]["mode"] == "full"
        assert doc["disks"][0]["reasons"] == ["CBT was reset", "no digest map"]
        assert decode_manifest(point.name, encode_manifest(point)) == point

    def test_a_manifest_written_before_per_disk_reasons_reads(self) -> None:
        point = make_point()
        doc = json.loads(encode_manifest(point))
        for d in doc["disks"]:
            del d["mode"], d["reasons"]
        decoded = decode_manifest(point.name, json.dumps(doc).encode())
        assert decoded.disks[0].mode is None and decoded.disks[0].reasons == ()
        assert decoded == point

    @pytest.mark.parametrize(("key", "value"), [("mode", "fast"), ("reasons", "not a list")])
    def test_a_bad_disk_mode_or_reasons_names_the_manifest(self, key: str, value: str) -> None:
        doc = json.loads(encode_manifest(make_point()))
        doc["disks"][0][key] = value
        with pytest.raises(FormatError, match="points/x: malformed manifest"):
            decode_manifest("points/x", json.dumps(doc).encode())

    def test_unknown_manifest_version_is_rejected(self) -> None:
        doc = json.loads(encode_manifest(make_point()))
        doc["version"] = 2
        with pytest.raises(FormatError, match="unsupported manifest version 2"):
            decode_manifest("points/x", json.dumps(doc).encode())

    def test_malformed_manifest_names_the_object(self) -> None:
        doc = json.loads(encode_manifest(make_point()))
        del doc["vm"]
        with pytest.raises(FormatError, match="points/x: malformed manifest"):
            decode_manifest("points/x", json.dumps(doc).encode())

    def test_satisfies_the_retention_protocol_and_groups(self) -> None:
        a, b = make_point(vm="a"), make_point(vm="b")
        c = make_point(vm="a", when=datetime(2026, 11, 27, tzinfo=timezone.utc))
        assert a.time == a.snapshot_time and a.status == "success" and not a.protected
        groups = group_points([c, b, a])
        assert groups[("nightly", "uuid-a")] == [a, c]
        assert groups[("nightly", "uuid-b")] == [b]


class TestFormatDocument:
    """The JSON examples in docs/repository-format.md are accepted by the code that reads them."""

    DOC = Path(__file__).parents[2] / "docs" / "repository-format.md"

    def examples(self) -> list[dict[str, object]]:
        blocks = re.findall(r"```json\n(.*?)```", self.DOC.read_text(encoding="utf-8"), re.S)
        return [json.loads(block) for block in blocks]

    def test_every_example_has_version_1(self) -> None:
        examples = self.examples()
        assert len(examples) == 4
        assert all(doc["version"] == 1 for doc in examples)

    def test_config_manifest_and_lock_examples_parse(self) -> None:
        config, manifest, _key, lock = self.examples()
        parsed = RepositoryConfig.from_json(json.dumps(config).encode())
        assert parsed.chunk_size == 1 << 20 and parsed.encryption == "aes-256-gcm"
        point = decode_manifest(f"points/{manifest['id']}", json.dumps(manifest).encode())
        assert point.mode == "cbt" and len(point.files) == 3 and point.disks[0].capacity == 4 << 30
        info = LockInfo.from_json("locks/x.json", json.dumps(lock).encode())
        assert not info.exclusive and info.purpose == "backup nightly/web01"


# -- found by the reliability suite's fuzzing (tests/reliability/test_fuzz_parsers.py) ------------------


def test_damaged_manifests_and_key_files_are_format_errors() -> None:
    """Numbers JSON reads as infinity, nesting deeper than the reader recurses, a key file without its
    salt, and Argon2id costs no real key file has: each a FormatError naming the object."""
    import json

    from reconciler.repository.crypto import KdfParams, KeyFile, MasterKey
    from reconciler.repository.errors import FormatError
    from reconciler.repository.manifest import decode_manifest

    with pytest.raises(FormatError, match="points/x: manifest is not valid JSON"):
        decode_manifest("points/x", b"[" * 100_000)
    key = json.loads(KeyFile.create(MasterKey.generate(), "r", "pw", KdfParams(64, 1, 1)).to_json())
    for field, value in (("salt", None), ("iterations", float("inf")), ("memory_kib", 1 << 40)):
        doc = json.loads(json.dumps(key))
        if value is None:
            del doc["kdf"][field]
        else:
            doc["kdf"][field] = value
        with pytest.raises(FormatError, match=r"keys/k\.json: malformed key file"):
            KeyFile.from_json(json.dumps(doc).encode(), "keys/k.json")
