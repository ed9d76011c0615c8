"""Keys: the master key, key files wrapped with Argon2id, keyed chunk ids, AES-256-GCM sealing.

The master key is 64 random bytes: 32 for AES-256-GCM, 32 for the HMAC-SHA256 chunk-id key. A key file
(docs/repository-format.md §4.6) wraps it under a key derived from a passphrase with Argon2id, whose
parameters are stored in the file. Nothing here ever puts key material or a passphrase in a ``repr`` or
an error message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from reconciler.repository.errors import FormatError, IntegrityError, WrongKeyError

KEY_FILE_VERSION = 1
MASTER_KEY_SIZE = 64
NONCE_SIZE = 12
TAG_SIZE = 16
SALT_SIZE = 16

Passphrase = str | bytes

MAX_KDF_MEMORY_KIB = 4 * 1024 * 1024
MAX_KDF_ITERATIONS = 64
MAX_KDF_LANES = 64
"""Limits on Argon2id costs: a key file is read before anything in the repository is authenticated, so a
damaged or planted one must not make opening it allocate 1 PiB or run for years (the defaults, 64 MiB,
3 iterations and 4 lanes, are far below)."""


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Argon2id cost parameters (defaults: RFC 9106's second recommended option, 64 MiB)."""

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def __post_init__(self) -> None:
        if self.lanes < 1 or self.iterations < 1 or self.memory_kib < 8 * self.lanes:
            raise ValueError(f"invalid Argon2id parameters {self}")
        for field, value, limit in (
            ("memory_kib", self.memory_kib, MAX_KDF_MEMORY_KIB),
            ("iterations", self.iterations, MAX_KDF_ITERATIONS),
            ("lanes", self.lanes, MAX_KDF_LANES),
        ):
            if value > limit:
                raise ValueError(f"Argon2id {field} {value} is above the limit of {limit}")


class MasterKey:
    """The repository's secret keys. ``repr`` never shows them."""

    __slots__ = ("_aead", "_id_key", "material")

    def __init__(self, material: bytes) -> None:
        if len(material) != MASTER_KEY_SIZE:
            raise ValueError("master key must be 64 bytes")
        self.material = material
        self._aead = AESGCM(material[:32])
        self._id_key = material[32:]

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(os.urandom(MASTER_KEY_SIZE))

    def __repr__(self) -> str:
        return "MasterKey(<hidden>)"

    def chunk_id(self, data: bytes | bytearray | memoryview) -> bytes:
        """HMAC-SHA256 of ``data`` under the id key (reveals nothing about ``data`` without the key)."""
        return hmac.digest(self._id_key, data, "sha256")

    def seal(self, plaintext: bytes | bytearray | memoryview, aad: bytes) -> tuple[bytes, bytes]:
        """Encrypt with a fresh random 96-bit nonce; returns ``(nonce, ciphertext ‖ tag)``."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce, self._aead.encrypt(nonce, plaintext, aad)

    def open(self, name: str, nonce: bytes | memoryview, sealed: bytes | memoryview, aad: bytes) -> bytes:
        """Decrypt and authenticate; :class:`IntegrityError` naming ``name`` if it fails."""
        try:
            return self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise IntegrityError(name, "authentication failed (damaged or tampered)") from None

    def open_unauthenticated(self, nonce: bytes | memoryview, sealed: bytes | memoryview) -> bytes:
        """The plaintext of a prefix of ``ciphertext ‖ tag`` without authenticating it: AES-GCM is
        counter mode underneath (counter 2 onwards for a 96-bit nonce). Only for measuring what a
        blob that was cut short still holds (verify); never for data that is used."""
        counter = modes.CTR(bytes(nonce) + (2).to_bytes(4, "big"))
        return Cipher(algorithms.AES(self.material[:32]), counter).decryptor().update(bytes(sealed))


def plain_chunk_id(data: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of ``data`` (chunk ids of an unencrypted repository)."""
    return hashlib.sha256(data).digest()


def chunk_id_function(key: MasterKey | None) -> Callable[[bytes | bytearray | memoryview], bytes]:
    """The id function of a repository: keyed HMAC when encrypted, SHA-256 otherwise."""
    return key.chunk_id if key is not None else plain_chunk_id


def _passphrase_bytes(passphrase: Passphrase) -> bytes:
    data = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    if not data:
        raise ValueError("the passphrase is empty")
    return data


_KDF_LOCK = threading.Lock()
"""Argon2id derivations run one at a time: two at once in one process deadlock inside cryptography 50
(OpenSSL's Argon2; seen when the daemon opened a repository for two hosts' backups in parallel)."""


_DERIVED: dict[bytes, bytes] = {}
"""Wrapping keys derived in this process, by a digest of (salt, cost, passphrase): a daemon opens the
same repository for every policy in every cycle, and each Argon2id derivation costs 64 MiB and a few
hundred ms of CPU. The wrapping key opens nothing the master key it unwraps (held in memory while the
repository is open anyway) does not; a new passphrase or key file has a new salt, so a new entry."""
_DERIVED_MAX = 16


def _derive(passphrase: Passphrase, salt: bytes, params: KdfParams) -> bytes:
    ident = hashlib.sha256(
        b"esxi-reconciler kdf cache\0%s\0%d %d %d\0"
        % (salt, params.memory_kib, params.iterations, params.lanes)
        + _passphrase_bytes(passphrase)
    ).digest()
    with _KDF_LOCK:
        derived = _DERIVED.get(ident)
        if derived is None:
            derived = _derive_now(passphrase, salt, params)
            if len(_DERIVED) >= _DERIVED_MAX:
                _DERIVED.pop(next(iter(_DERIVED)))
            _DERIVED[ident] = derived
        return derived


def _derive_now(passphrase: Passphrase, salt: bytes, params: KdfParams) -> bytes:
    kdf = Argon2id(
        salt=salt,
        length=32,
        iterations=params.iterations,
        lanes=params.lanes,
        memory_cost=params.memory_kib,
    )
    return kdf.derive(_passphrase_bytes(passphrase))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, what: str, name: str) -> bytes:
    if not isinstance(value, str):
        raise FormatError(f"{name}: {what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{name}: {what} is not valid base64") from None


@dataclass(frozen=True, slots=True)
class KeyFile:
    """A wrapped master key (``keys/<id>.json``); holds no secret in the clear."""

    id: str
    repository: str
    created: str
    kdf: KdfParams
    salt: bytes
    nonce: bytes
    wrapped: bytes

    @property
    def name(self) -> str:
        return f"keys/{self.id}.json"

    def _aad(self) -> bytes:
        return f"key:{self.id}:{self.repository}".encode("ascii")

    @classmethod
    def create(
        cls, master: MasterKey, repository: str, passphrase: Passphrase, kdf: KdfParams | None = None
    ) -> KeyFile:
        """Wrap ``master`` under ``passphrase`` with fresh salt, nonce and key id."""
        params = kdf or KdfParams()
        salt = os.urandom(SALT_SIZE)
        key_id = secrets.token_hex(8)
        created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        nonce = os.urandom(NONCE_SIZE)
        aad = f"key:{key_id}:{repository}".encode("ascii")
        wrapped = AESGCM(_derive(passphrase, salt, params)).encrypt(nonce, master.material, aad)
        return cls(key_id, repository, created, params, salt, nonce, wrapped)

    def unwrap(self, passphrase: Passphrase) -> MasterKey:
        """The master key; :class:`WrongKeyError` if the passphrase (or the file) is wrong."""
        wrapping = _derive(passphrase, self.salt, self.kdf)
        try:
            material = AESGCM(wrapping).decrypt(self.nonce, self.wrapped, self._aad())
        except InvalidTag:
            raise WrongKeyError(f"wrong passphrase for repository key {self.id}") from None
        return MasterKey(material)

    def to_json(self) -> bytes:
        doc = {
            "version": KEY_FILE_VERSION,
            "id": self.id,
            "repository": self.repository,
            "created": self.created,
            "kdf": {
                "algorithm": "argon2id",
                "salt": _b64(self.salt),
                "memory_kib": self.kdf.memory_kib,
                "iterations": self.kdf.iterations,
                "lanes": self.kdf.lanes,
            },
            "wrap": {"algorithm": "aes-256-gcm", "nonce": _b64(self.nonce), "data": _b64(self.wrapped)},
        }
        return (json.dumps(doc, indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, name: str = "key file") -> KeyFile:
        """Parse a key file; :class:`FormatError` naming ``name`` for anything unexpected."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
            raise FormatError(f"{name}: not valid JSON") from None
        if not isinstance(doc, dict):
            raise FormatError(f"{name}: not a JSON object")
        if doc.get("version") != KEY_FILE_VERSION:
            raise FormatError(f"{name}: unsupported key file version {doc.get('version')!r}")
        try:
            kdf, wrap = doc["kdf"], doc["wrap"]
            if kdf["algorithm"] != "argon2id":
                raise FormatError(f"{name}: unsupported KDF {kdf['algorithm']!r}")
            if wrap["algorithm"] != "aes-256-gcm":
                raise FormatError(f"{name}: unsupported key wrapping {wrap['algorithm']!r}")
            params = KdfParams(int(kdf["memory_kib"]), int(kdf["iterations"]), int(kdf["lanes"]))
            key_id, repository, created = str(doc["id"]), str(doc["repository"]), str(doc["created"])
            salt, nonce, wrapped = kdf["salt"], wrap["nonce"], wrap["data"]
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(1e400)
            raise FormatError(f"{name}: malformed key file ({exc.__class__.__name__}: {exc})") from None
        if not key_id.isalnum():
            raise FormatError(f"{name}: invalid key id")
        return cls(
            key_id,
            repository,
            created,
            params,
            _unb64(salt, "kdf.salt", name),
            _unb64(nonce, "wrap.nonce", name),
            _unb64(wrapped, "wrap.data", name),
        )
