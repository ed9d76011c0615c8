"""The blob envelope (docs/repository-format.md §4.2) and chunk encoding.

:class:`BlobCodec` is pure and thread-safe: bytes in, parts out, no I/O. The backup engine may call
:meth:`BlobCodec.encode_chunk` from a thread pool; hashlib, zstandard and cryptography release the GIL on
large buffers, so encoding scales with cores. Each thread gets its own zstd (de)compressor.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from dataclasses import dataclass

import zstandard

from reconciler.repository.backend import Data
from reconciler.repository.crypto import NONCE_SIZE, TAG_SIZE, MasterKey, chunk_id_function
from reconciler.repository.errors import FormatError, IntegrityError

MAGIC = b"ERB\x00"
BLOB_VERSION = 1
FLAG_ZSTD = 0x01
FLAG_AEAD = 0x02
FLAG_TRAILER = 0x04
KNOWN_FLAGS = FLAG_ZSTD | FLAG_AEAD | FLAG_TRAILER
HEADER = struct.Struct("<4sBBH")
HEADER_SIZE = HEADER.size
TRAILER_SIZE = 32

CHUNK_SIZE = 1024 * 1024
ID_SIZE = 32
HOLE = bytes(ID_SIZE)
"""The index entry of an all-zero chunk (never stored)."""

_ZEROS = bytes(CHUNK_SIZE)
SAMPLE_FROM = 256 * 1024
SAMPLES = 4
SAMPLE_SIZE = 16 * 1024
SAMPLE_RATIO = 0.97
"""A chunk whose four 16 KiB samples do not compress below 97 % is stored uncompressed."""
MAX_DECOMPRESSED = 64 * 1024 * 1024


def is_zero(data: Data) -> bool:
    """Whether ``data`` is all zero bytes: a memcmp against a static zero buffer, no copy.

    (``bytes.startswith`` accepts any buffer and compares with memcmp; comparing memoryviews with ``==``
    goes item by item and is ~50x slower.)
    """
    view = memoryview(data).cast("B")
    for offset in range(0, len(view), CHUNK_SIZE):
        if not _ZEROS.startswith(view[offset : offset + CHUNK_SIZE]):
            return False
    return True


def chunk_name(chunk_id: bytes) -> str:
    """Object name of a chunk: ``chunks/<first byte hex>/<id hex>``."""
    hexid = chunk_id.hex()
    return f"chunks/{hexid[:2]}/{hexid}"


@dataclass(frozen=True, slots=True)
class EncodedChunk:
    """A chunk ready to store: its id and the blob as parts (header, [nonce,] body).

    A part may be the caller's buffer itself (incompressible data in a plain repository is not copied),
    so the buffer must not be modified until the chunk is stored.
    """

    id: bytes
    parts: tuple[Data, ...]

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts)


class BlobCodec:
    """Encode and decode blobs for one repository (its key and compression level)."""

    def __init__(self, key: MasterKey | None, compression_level: int | None = 1) -> None:
        if compression_level is not None and not -7 <= compression_level <= 22:
            raise ValueError(f"zstd level {compression_level} out of range")
        self.key = key
        self.level = compression_level
        self.id_of = chunk_id_function(key)
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"BlobCodec(encrypted={self.key is not None}, level={self.level})"

    def _compressor(self) -> zstandard.ZstdCompressor:
        comp: zstandard.ZstdCompressor | None = getattr(self._local, "comp", None)
        if comp is None:
            comp = zstandard.ZstdCompressor(level=self.level or 1, write_content_size=True)
            self._local.comp = comp
        return comp

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dec: zstandard.ZstdDecompressor | None = getattr(self._local, "dec", None)
        if dec is None:
            dec = zstandard.ZstdDecompressor()
            self._local.dec = dec
        return dec

    def _worth_compressing(self, data: Data) -> bool:
        """Whether to compress ``data``: chunks of :data:`SAMPLE_FROM` bytes and more are compressed
        only when :data:`SAMPLES` slices of :data:`SAMPLE_SIZE` bytes spread over them compress below
        :data:`SAMPLE_RATIO` (already compressed or encrypted data, media, random: stored as they are
        without a full compression pass; about 1/16 of the work of compressing them)."""
        if len(data) < SAMPLE_FROM:
            return True
        view = memoryview(data).cast("B")
        step = len(view) // SAMPLES
        sample = b"".join(view[i * step : i * step + SAMPLE_SIZE] for i in range(SAMPLES))
        return len(self._compressor().compress(sample)) < len(sample) * SAMPLE_RATIO

    # -- generic blobs -------------------------------------------------------------------------------

    def encode(
        self, identity: bytes, data: bytes | bytearray | memoryview, *, trailer: bool = True
    ) -> tuple[Data, ...]:
        """Blob parts for ``data`` stored under ``identity`` (compressed when that helps)."""
        flags = 0
        payload: bytes | bytearray | memoryview = data
        if self.level is not None and len(data) > 0 and self._worth_compressing(data):
            compressed = self._compressor().compress(data)
            if len(compressed) < len(data):
                payload = compressed
                flags |= FLAG_ZSTD
        if self.key is not None:
            flags |= FLAG_AEAD
            header = HEADER.pack(MAGIC, BLOB_VERSION, flags, 0)
            nonce, sealed = self.key.seal(payload, header + identity)
            return (header, nonce, sealed)
        if trailer:
            flags |= FLAG_TRAILER
            header = HEADER.pack(MAGIC, BLOB_VERSION, flags, 0)
            digest = hashlib.sha256(header)
            digest.update(identity)
            digest.update(payload)
            return (header, payload, digest.digest())
        header = HEADER.pack(MAGIC, BLOB_VERSION, flags, 0)
        return (header, payload)

    def decode(self, name: str, identity: bytes, blob: bytes) -> bytes:
        """The plaintext of a blob; :class:`FormatError`/:class:`IntegrityError` naming ``name``."""
        if len(blob) < HEADER_SIZE:
            raise IntegrityError(name, f"truncated blob ({len(blob)} bytes)")
        magic, version, flags, reserved = HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise IntegrityError(name, "not a repository blob (bad magic)")
        if version != BLOB_VERSION:
            raise FormatError(f"{name}: unsupported blob version {version}")
        if flags & ~KNOWN_FLAGS or reserved:
            raise IntegrityError(name, f"unknown blob flags {flags:#04x}")
        view = memoryview(blob)
        header = bytes(view[:HEADER_SIZE])
        payload: bytes | memoryview
        if flags & FLAG_AEAD:
            if self.key is None:
                raise FormatError(f"{name}: encrypted blob in an unencrypted repository")
            if len(blob) < HEADER_SIZE + NONCE_SIZE + TAG_SIZE:
                raise IntegrityError(name, "truncated encrypted blob")
            nonce = view[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE]
            payload = self.key.open(name, nonce, view[HEADER_SIZE + NONCE_SIZE :], header + identity)
        else:
            if self.key is not None:
                raise IntegrityError(name, "unencrypted blob in an encrypted repository")
            if flags & FLAG_TRAILER:
                if len(blob) < HEADER_SIZE + TRAILER_SIZE:
                    raise IntegrityError(name, "truncated blob")
                payload = view[HEADER_SIZE:-TRAILER_SIZE]
                digest = hashlib.sha256(header)
                digest.update(identity)
                digest.update(payload)
                if digest.digest() != view[-TRAILER_SIZE:]:
                    raise IntegrityError(name, "checksum mismatch (damaged or truncated)")
            else:
                payload = view[HEADER_SIZE:]
        if flags & FLAG_ZSTD:
            try:
                return self._decompressor().decompress(payload, max_output_size=MAX_DECOMPRESSED)
            except zstandard.ZstdError as exc:
                raise IntegrityError(name, f"cannot decompress ({exc})") from None
        return bytes(payload)

    def readable_prefix(self, blob: bytes, payload_size: int) -> int | None:
        """How many bytes of its payload (``payload_size`` bytes when whole) a blob that failed to
        decode still holds if it was cut short; None if it is damaged otherwise (or cannot be told
        apart: an unknown envelope).

        Compressed, what is left is decompressed as a stream: a cut frame yields less than the whole
        payload without an error (whole zstd blocks only, so it is a lower bound). Encrypted and
        compressed, the prefix is first decrypted without authentication, only to measure a length.
        """
        if len(blob) < HEADER_SIZE:
            return 0
        magic, _version, flags, _reserved = HEADER.unpack_from(blob)
        if magic != MAGIC:
            return None
        body = blob[HEADER_SIZE:]
        suffix = TRAILER_SIZE if flags & FLAG_TRAILER else 0  # what follows the payload
        if flags & FLAG_AEAD:
            if self.key is None or len(body) < NONCE_SIZE:
                return None
            nonce, body, suffix = body[:NONCE_SIZE], body[NONCE_SIZE:], TAG_SIZE
            if flags & FLAG_ZSTD:
                body = self.key.open_unauthenticated(nonce, body)
        present = len(body)
        if flags & FLAG_ZSTD:
            stream = zstandard.ZstdDecompressor().decompressobj()
            try:
                payload = stream.decompress(body)
            except zstandard.ZstdError:
                return None
            if stream.eof and len(payload) != payload_size:
                return None
            # a whole frame: was what follows it (checksum or tag) cut?
            present = payload_size + len(stream.unused_data) if stream.eof else len(payload)
        if present >= payload_size + suffix:
            return None
        return min(present, payload_size)

    # -- chunks --------------------------------------------------------------------------------------

    def encode_chunk(self, data: Data, chunk_id: bytes | None = None) -> EncodedChunk:
        """Encode one chunk (``chunk_id`` if already computed). Pure: safe in a thread pool."""
        cid = chunk_id if chunk_id is not None else self.id_of(data)
        return EncodedChunk(cid, self.encode(cid, data, trailer=False))

    def decode_chunk(self, chunk_id: bytes, blob: bytes) -> bytes:
        """Decode a chunk blob and check that its content matches ``chunk_id``."""
        name = chunk_name(chunk_id)
        data = self.decode(name, chunk_id, blob)
        if self.id_of(data) != chunk_id:
            raise IntegrityError(name, "content does not match the chunk id")
        return data
