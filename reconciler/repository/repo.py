"""The :class:`Repository` facade: init/open, chunks, indexes, digest maps, restore points, keys, check.

The backup engine's view::

    repo = Repository.open(path, passphrase, compression_level=1, expect_encrypted=True)
    with repo.lock(purpose="backup nightly/web01"):
        writer = repo.chunk_writer(capacity, base=previous_index)   # base: incremental; None: full
        writer.write(offset, data)            # from any number of threads; offset chunk-aligned
        index_id = writer.finish(digest_map)  # flushes chunks, writes digest map and index
        vmx = repo.write_file("web01.vmx", data)
        repo.write_point(RestorePoint(...))   # last; the point is listed from now on

Thread-safe: several VMs may back up concurrently through one :class:`Repository` object (or several
processes, each with a shared lock).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from reconciler.facts.points import POINT_ID_RE, RestorePoint, StoredFile, point_name
from reconciler.repository.backend import Data, LocalBackend, ObjectInfo, fsync_dir
from reconciler.repository.chunks import (
    CHUNK_SIZE,
    HOLE,
    ID_SIZE,
    BlobCodec,
    EncodedChunk,
    chunk_name,
    is_zero,
)
from reconciler.repository.crypto import KdfParams, KeyFile, MasterKey, Passphrase
from reconciler.repository.errors import (
    FormatError,
    IntegrityError,
    MissingObjectError,
    NotARepositoryError,
    ProtectedPointError,
    RepositoryError,
    WrongKeyError,
)
from reconciler.repository.index import DigestMap, DiskIndex
from reconciler.repository.lock import RepositoryLock, stale_staged_files
from reconciler.repository.manifest import decode_manifest, encode_manifest

CONFIG_VERSION = 1
QUARANTINE_DIR = "quarantine"
"""Where :meth:`Repository.quarantine_chunk` sets bad chunks aside."""
CONFIG_NAME = "config"
DIRECTORIES = ("keys", "chunks", "indexes", "digests", "points", "locks", "tmp")
ENCRYPTION_NONE = "none"
ENCRYPTION_AES = "aes-256-gcm"


@dataclass(frozen=True)
class RepositoryConfig:
    """The ``config`` object (docs/repository-format.md §4.1)."""

    id: str
    created: str
    chunk_size: int
    compression: str
    compression_level: int
    encryption: str

    def to_json(self) -> bytes:
        doc = {
            "version": CONFIG_VERSION,
            "id": self.id,
            "created": self.created,
            "chunk_size": self.chunk_size,
            "compression": {"algorithm": self.compression, "level": self.compression_level},
            "encryption": self.encryption,
        }
        return (json.dumps(doc, indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> RepositoryConfig:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise TypeError("not an object")
        except (ValueError, TypeError, UnicodeDecodeError):
            raise FormatError("config: not a JSON object") from None
        if doc.get("version") != CONFIG_VERSION:
            raise FormatError(f"config: unsupported repository version {doc.get('version')!r}")
        try:
            comp = doc["compression"]
            config = cls(
                str(doc["id"]),
                str(doc["created"]),
                int(doc["chunk_size"]),
                str(comp["algorithm"]),
                int(comp["level"]),
                str(doc["encryption"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"config: malformed ({exc.__class__.__name__}: {exc})") from None
        if config.chunk_size != CHUNK_SIZE:
            raise FormatError(f"config: unsupported chunk size {config.chunk_size}")
        if config.compression not in ("zstd", "none"):
            raise FormatError(f"config: unsupported compression {config.compression!r}")
        if config.encryption not in (ENCRYPTION_NONE, ENCRYPTION_AES):
            raise FormatError(f"config: unsupported encryption {config.encryption!r}")
        return config


@dataclass(frozen=True, slots=True)
class ChunkWrite:
    """Result of writing one chunk: its id (``HOLE`` for zeros) and the bytes newly stored (0 if deduped)."""

    id: bytes
    stored: int
    new: bool


@dataclass(frozen=True)
class PassphraseChange:
    """What :meth:`Repository.change_passphrase` did."""

    key_id: str
    """The new key file (``keys/<id>.json``)."""
    removed: tuple[str, ...]
    """Key files deleted: those of the old passphrase, and duplicates an interrupted run left."""
    others: tuple[str, ...]
    """Key files of other passphrases, kept: they still open the repository."""


@dataclass(frozen=True)
class KeyInfo:
    """One key file, as ``repo key list`` shows it (no secret)."""

    id: str
    created: str
    opens: bool | None
    """Whether the passphrase given to :func:`list_keys` opens it (None: not asked)."""


@dataclass(frozen=True)
class RepositoryStats:
    points: int
    chunks: int
    chunk_bytes: int
    indexes: int
    digest_maps: int


def _not_a_repository(backend: LocalBackend) -> NotARepositoryError:
    """Why the path of ``backend`` holds no repository, and what to do: for a missing path or an empty
    directory the likely cause is a volume that is not mounted, and nothing must be created there."""
    root, where = backend.root, backend.describe()
    init = f"`esxi-reconciler repo init {backend.label}`" if backend.label else "`esxi-reconciler repo init`"
    if not root.exists():
        cause = "the path does not exist"
    elif not root.is_dir():
        cause = "the path is not a directory"
    else:
        try:
            empty = not any(root.iterdir())
        except OSError:
            empty = False
        cause = "the directory is empty" if empty else "the directory holds no repository (no config file)"
    return NotARepositoryError(
        f"{where}: not a repository: {cause}; if it lives on a volume, mount it; to create a new repository"
        f" there, run {init}. Nothing was written"
    )


def _now_text() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _passphrase_text(passphrase: Passphrase) -> bytes:
    return passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)


def _parse_hex_id(value: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise FormatError(f"invalid {what} id {value!r}") from None
    if len(raw) != ID_SIZE:
        raise FormatError(f"invalid {what} id {value!r}")
    return raw


class Repository:
    """One opened repository. Use :meth:`init` or :meth:`open`."""

    def __init__(
        self,
        backend: LocalBackend,
        config: RepositoryConfig,
        key: MasterKey | None,
        key_id: str | None,
        compression_level: int | None,
    ) -> None:
        self.backend = backend
        self.config = config
        self.key_id = key_id
        self._key = key
        level = compression_level if compression_level is not None else config.compression_level
        self.codec = BlobCodec(key, None if config.compression == "none" else level)

    def __repr__(self) -> str:
        return f"Repository({str(self.backend.root)!r}, id={self.config.id}, encrypted={self.encrypted})"

    @property
    def path(self) -> Path:
        return self.backend.root

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def encrypted(self) -> bool:
        return self._key is not None

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    # -- init / open ---------------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str],
        passphrase: Passphrase | None = None,
        *,
        compression: str = "zstd",
        compression_level: int = 1,
        kdf: KdfParams | None = None,
    ) -> Repository:
        """Create a repository in an empty (or missing) directory; encrypted iff ``passphrase`` is given.

        Losing the key file(s) or the passphrase of an encrypted repository loses its data.
        """
        if compression not in ("zstd", "none"):
            raise ValueError(f"unsupported compression {compression!r}")
        root = Path(path)
        if root.exists() and any(root.iterdir()):
            raise RepositoryError(f"{root}: directory is not empty")
        root.mkdir(parents=True, exist_ok=True)
        for directory in DIRECTORIES:
            (root / directory).mkdir(exist_ok=True)
        for byte in range(256):
            (root / "chunks" / f"{byte:02x}").mkdir(exist_ok=True)
        fsync_dir(root / "chunks")
        encryption = ENCRYPTION_AES if passphrase is not None else ENCRYPTION_NONE
        config = RepositoryConfig(
            os.urandom(16).hex(), _now_text(), CHUNK_SIZE, compression, compression_level, encryption
        )
        backend = LocalBackend(root)
        key = None
        key_id = None
        if passphrase is not None:
            key = MasterKey.generate()
            keyfile = KeyFile.create(key, config.id, passphrase, kdf)
            backend.put(keyfile.name, [keyfile.to_json()])
            key_id = keyfile.id
        backend.put(CONFIG_NAME, [config.to_json()])  # last: its presence means "initialised"
        fsync_dir(root)
        return cls(backend, config, key, key_id, None)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        passphrase: Passphrase | None = None,
        *,
        compression_level: int | None = None,
        expect_encrypted: bool | None = None,
        expect_id: str | None = None,
        label: str | None = None,
    ) -> Repository:
        """Open a repository; ``compression_level`` overrides the stored default for new chunks.

        ``expect_encrypted`` (the configuration's ``encryption.enabled``) guards against a ``config`` edited
        to store plaintext. Raises :class:`WrongKeyError` if no key file opens with ``passphrase``.
        ``label`` (the configured name) names the repository in messages, next to its path.
        ``expect_id`` (the configuration's pinned ``id``) refuses a path that holds another repository.
        A path without a repository raises :class:`NotARepositoryError`; nothing is written to it.
        """
        backend = LocalBackend(path, label=label)
        try:
            with backend.volume_errors("reading config"):  # e.g. a directory the service user cannot read
                config = RepositoryConfig.from_json(backend.get(CONFIG_NAME))
        except MissingObjectError:
            raise _not_a_repository(backend) from None
        if expect_id is not None and config.id != expect_id:
            raise RepositoryError(
                f"{backend.describe()}: holds repository {config.id}, but the configuration pins id"
                f" {expect_id}: another volume is mounted there, or the repository was created anew; mount"
                " the right volume, or set the Repository's id to the new one if it was replaced on purpose"
            )
        key_names = sorted(n for n in backend.list("keys") if n.endswith(".json"))
        encrypted = config.encryption == ENCRYPTION_AES
        if not encrypted and key_names:
            raise RepositoryError(f"{path}: config says unencrypted but key files exist; refusing to open")
        if expect_encrypted is not None and expect_encrypted != encrypted:
            state = "encrypted" if encrypted else "not encrypted"
            raise RepositoryError(f"{path}: repository is {state}, but the configuration says otherwise")
        if not encrypted:
            if passphrase is not None:
                raise RepositoryError(f"{path}: repository is not encrypted but a passphrase was given")
            return cls(backend, config, None, None, compression_level)
        if passphrase is None:
            raise WrongKeyError(
                f"{backend.describe()}: the repository is encrypted; a passphrase is required"
                " (set encryption.key in the Repository document)"
            )
        tried = []
        for name in key_names:
            keyfile = KeyFile.from_json(backend.get(name), name)
            if keyfile.repository != config.id:
                continue
            tried.append(keyfile.id)
            try:
                key = keyfile.unwrap(passphrase)
            except WrongKeyError:
                continue
            return cls(backend, config, key, keyfile.id, compression_level)
        where = backend.describe()
        if not tried:
            raise WrongKeyError(
                f"{where}: no key file for this repository in keys/; import the key file saved with"
                " `repo key-export` into keys/"
            )
        raise WrongKeyError(
            f"{where}: wrong passphrase: it opens none of the repository's keys ({', '.join(tried)});"
            " check the secret named by the Repository's encryption.key"
        )

    # -- locks ---------------------------------------------------------------------------------------

    def lock(
        self, *, exclusive: bool = False, purpose: str = "", remove_stale: bool = True
    ) -> RepositoryLock:
        """A lock object (not yet acquired); use as a context manager. ``remove_stale=False``: an
        exclusive lock that leaves stale lock files in place (a dry run changes nothing)."""
        return RepositoryLock(self.backend, exclusive=exclusive, purpose=purpose, remove_stale=remove_stale)

    def remove_stale_staged(self, *, own: RepositoryLock | None = None) -> list[ObjectInfo]:
        """Delete the files in ``tmp/`` that no live writer owns — the leftovers of killed or failed runs
        (docs/repository-format.md §7.1) — and return them. Safe without a lock and beside running
        writers: a file is removed only when the lock rules say its writer is gone. ``own``: the caller's
        lock, which does not count as another writer."""
        stale = stale_staged_files(self.backend, own=own.info if own is not None else None)
        for info in stale:
            self.backend.delete(info.name)
        return stale

    # -- chunks --------------------------------------------------------------------------------------

    def chunk_id(self, data: Data) -> bytes:
        return self.codec.id_of(data)

    def has_chunk(self, chunk_id: bytes) -> bool:
        return chunk_id == HOLE or self.backend.exists(chunk_name(chunk_id))

    def quarantine_chunk(self, chunk_id: bytes) -> None:
        """Set a damaged or missing chunk aside (``quarantine/<id hex>``: its blob, or empty when there
        was none): the chunk no longer counts as stored, so the next backup that meets its content stores
        it again — which heals every point referencing it — and backups know to read in full
        (:meth:`quarantined`). Like Proxmox Backup Server's ``.bad`` chunks."""
        name = chunk_name(chunk_id)
        try:
            blob = self.backend.get(name)
        except (MissingObjectError, OSError):
            blob = b""
        (self.path / QUARANTINE_DIR).mkdir(exist_ok=True)
        self.backend.put(f"{QUARANTINE_DIR}/{chunk_id.hex()}", [blob])
        self.backend.delete(name)

    def quarantined(self) -> set[bytes]:
        """Ids of the chunks verify set aside (see :meth:`quarantine_chunk`)."""
        out = set()
        for name in self.backend.list(QUARANTINE_DIR):
            with contextlib.suppress(ValueError):
                out.add(bytes.fromhex(name.rsplit("/", 1)[-1]))
        return out

    def write_chunk(self, data: Data) -> ChunkWrite:
        """Store one chunk unless it is all zeros (a hole) or already present (dedup). Thread-safe.

        Visible and durable after :meth:`flush` (called by :meth:`write_index` and :meth:`write_point`).
        """
        if len(data) > self.chunk_size:
            raise ValueError(f"chunk of {len(data)} bytes exceeds the chunk size")
        if is_zero(data):
            return ChunkWrite(HOLE, 0, False)
        cid = self.codec.id_of(data)
        if self.backend.exists(chunk_name(cid)):
            return ChunkWrite(cid, 0, False)
        return self.store_encoded(self.codec.encode_chunk(data, cid))

    def store_encoded(self, chunk: EncodedChunk) -> ChunkWrite:
        """Store a chunk encoded elsewhere (e.g. by :meth:`BlobCodec.encode_chunk` in a worker thread)."""
        if self.backend.put_deferred(chunk_name(chunk.id), chunk.parts):
            return ChunkWrite(chunk.id, chunk.size, True)
        return ChunkWrite(chunk.id, 0, False)

    def read_chunk(self, chunk_id: bytes) -> bytes:
        """The plaintext of a chunk (zeros of ``chunk_size`` for a hole), verified against its id."""
        if chunk_id == HOLE:
            return bytes(self.chunk_size)
        return self.codec.decode_chunk(chunk_id, self.backend.get(chunk_name(chunk_id)))

    def flush(self) -> None:
        """Make every chunk written so far durable and visible."""
        self.backend.flush()

    def discard_pending(self) -> None:
        """Forget chunks not yet flushed (after a failed backup); their temp files are removed."""
        self.backend.discard_pending()

    @contextlib.contextmanager
    def discard_pending_on_exit(self) -> Iterator[None]:
        """A scope of writes (a backup run) that leaves nothing staged behind, however it ends: chunks
        not flushed by then (no point references them) are discarded on the way out."""
        try:
            yield
        finally:
            self.discard_pending()

    def write_file(self, name: str, data: bytes) -> StoredFile:
        """Store a small file (``.vmx``, ``.nvram``, descriptor) as chunks."""
        ids = []
        for start in range(0, len(data), self.chunk_size):
            ids.append(self.write_chunk(data[start : start + self.chunk_size]).id.hex())
        return StoredFile(name, len(data), tuple(ids))

    def read_file(self, stored: StoredFile) -> bytes:
        parts = []
        remaining = stored.size
        for hexid in stored.chunks:
            data = self.read_chunk(_parse_hex_id(hexid, "chunk"))
            parts.append(data[: min(remaining, len(data))])
            remaining -= len(parts[-1])
        result = b"".join(parts)
        if len(result) != stored.size:
            raise FormatError(f"{stored.name}: stored {len(result)} bytes, manifest says {stored.size}")
        return result

    # -- indexes and digest maps ---------------------------------------------------------------------

    def _write_meta(self, directory: str, payload: bytes) -> str:
        hexid = self.codec.id_of(payload).hex()
        identity = f"{directory}:{hexid}".encode("ascii")
        self.backend.put(f"{directory}/{hexid}", self.codec.encode(identity, payload, trailer=True))
        return hexid

    def _read_meta(self, directory: str, hexid: str) -> bytes:
        raw = _parse_hex_id(hexid, directory)
        name = f"{directory}/{hexid}"
        payload = self.codec.decode(name, f"{directory}:{hexid}".encode("ascii"), self.backend.get(name))
        if self.codec.id_of(payload) != raw:
            raise IntegrityError(name, "content does not match its id")
        return payload

    def write_index(self, index: DiskIndex) -> str:
        """Flush chunks, then store the index durably; returns its id (hex)."""
        self.flush()
        return self._write_meta("indexes", index.encode())

    def read_index(self, index_id: str) -> DiskIndex:
        return DiskIndex.decode(f"indexes/{index_id}", self._read_meta("indexes", index_id))

    def write_digest_map(self, digest_map: DigestMap) -> str:
        return self._write_meta("digests", digest_map.encode())

    def read_digest_map(self, digest_map_id: str) -> DigestMap:
        return DigestMap.decode(f"digests/{digest_map_id}", self._read_meta("digests", digest_map_id))

    def chunk_writer(self, capacity: int, base: DiskIndex | None = None) -> ChunkWriter:
        """A :class:`ChunkWriter` for one disk; ``base`` (the previous point's index) for incrementals."""
        return ChunkWriter(self, capacity, base)

    # -- restore points ------------------------------------------------------------------------------

    def write_point(self, point: RestorePoint) -> None:
        """Flush chunks, then write the manifest (last): from now on the point is listed."""
        self.flush()
        name = point_name(point.id)
        parts = self.codec.encode(f"point:{point.id}".encode("ascii"), encode_manifest(point), trailer=True)
        if not self.backend.put(name, parts):
            raise RepositoryError(f"{name}: a restore point with this id exists")

    def read_point(self, point_id: str) -> RestorePoint:
        name = point_name(point_id)
        payload = self.codec.decode(name, f"point:{point_id}".encode("ascii"), self.backend.get(name))
        return decode_manifest(name, payload)

    def point_ids(self) -> list[str]:
        """Ids of all complete restore points, oldest first."""
        ids = []
        for name in self.backend.list("points"):
            point_id = name.rpartition("/")[2]
            if POINT_ID_RE.match(point_id):
                ids.append(point_id)
        return sorted(ids)

    def list_points(self, *, policy: str | None = None, vm: str | None = None) -> list[RestorePoint]:
        """Complete restore points, oldest first, optionally filtered by policy and VM name."""
        points = []
        for point_id in self.point_ids():
            try:
                point = self.read_point(point_id)
            except MissingObjectError:
                continue  # pruned or forgotten by another process between the listing and the read
            if (policy is None or point.policy == policy) and (vm is None or point.vm.name == vm):
                points.append(point)
        return points

    def set_protected(self, point_id: str, protected: bool) -> RestorePoint:
        """Change a point's ``protected`` flag (the manifest is replaced atomically)."""
        point = self.read_point(point_id).with_protected(protected)
        parts = self.codec.encode(f"point:{point.id}".encode("ascii"), encode_manifest(point), trailer=True)
        self.backend.replace(point.name, parts)
        return point

    def delete_point(self, point_id: str, *, force: bool = False) -> None:
        """Remove a point's manifest (its data becomes garbage for GC); protected points need ``force``."""
        point = self.read_point(point_id)
        if point.protected and not force:
            raise ProtectedPointError(f"restore point {point_id} is protected")
        self.backend.delete(point.name)
        fsync_dir(self.path / "points")

    # -- keys ----------------------------------------------------------------------------------------

    def add_key(self, passphrase: Passphrase, kdf: KdfParams | None = None) -> str:
        """Wrap the master key under another passphrase; returns the new key id."""
        if self._key is None:
            raise RepositoryError("repository is not encrypted")
        keyfile = KeyFile.create(self._key, self.id, passphrase, kdf)
        self.backend.put(keyfile.name, [keyfile.to_json()])
        return keyfile.id

    def change_passphrase(
        self, old_passphrase: Passphrase, new_passphrase: Passphrase, kdf: KdfParams | None = None
    ) -> PassphraseChange:
        """Replace the key files ``old_passphrase`` opens by one for ``new_passphrase``, crash-safe.

        1. the new key file is written durably (``put``: fsync, link, directory fsync);
        2. it is read back from the volume and unwrapped with the new passphrase, and must give this
           repository's master key;
        3. only then the key files the old passphrase opens are deleted (and duplicates for the new
           passphrase an interrupted earlier run left), then ``keys/`` is fsynced.

        Killed at any moment, one of the two opens the repository: the old passphrase until its key
        files are deleted in step 3, the new one from the end of step 1 on. Running it again completes
        it. Key files of other passphrases are kept (``others``). The repository must have been opened
        with ``old_passphrase`` (checked).
        """
        if self._key is None or self.key_id is None:
            raise RepositoryError(f"{self.path}: repository is not encrypted; it has no passphrase")
        if _passphrase_text(old_passphrase) == _passphrase_text(new_passphrase):
            raise ValueError("the new passphrase is the same as the current one")
        current = next((k for k in _key_files(self.backend, self.id) if k.id == self.key_id), None)
        if current is None or not self._opens(current, old_passphrase):
            raise WrongKeyError(f"the old passphrase does not open repository key {self.key_id}")
        new_id = self.add_key(new_passphrase, kdf)
        written = KeyFile.from_json(self.backend.get(f"keys/{new_id}.json"), f"keys/{new_id}.json")
        if written.repository != self.id or written.unwrap(new_passphrase).material != self._key.material:
            raise IntegrityError(f"keys/{new_id}.json", "the new key file does not open this repository")
        removed: list[str] = []
        others: list[str] = []
        for keyfile in _key_files(self.backend, self.id):
            if keyfile.id == new_id:
                continue
            if keyfile.id == current.id or self._opens(keyfile, old_passphrase, new_passphrase):
                self.backend.delete(keyfile.name)
                removed.append(keyfile.id)
            else:
                others.append(keyfile.id)
        fsync_dir(self.path / "keys")
        self.key_id = new_id
        return PassphraseChange(new_id, tuple(removed), tuple(others))

    def _opens(self, keyfile: KeyFile, *passphrases: Passphrase) -> bool:
        """Whether one of ``passphrases`` unwraps ``keyfile`` to this repository's master key."""
        for passphrase in passphrases:
            try:
                material = keyfile.unwrap(passphrase).material
            except WrongKeyError:
                continue
            if self._key is not None and material == self._key.material:
                return True
        return False

    # -- inspection ----------------------------------------------------------------------------------

    def iter_chunk_ids(self) -> Iterator[bytes]:
        """Ids of every stored chunk."""
        for name in self.backend.list("chunks"):
            hexid = name.rpartition("/")[2]
            if len(hexid) == 2 * ID_SIZE:
                try:
                    yield bytes.fromhex(hexid)
                except ValueError:
                    continue

    def stats(self) -> RepositoryStats:
        chunks = 0
        size = 0
        for name in self.backend.list("chunks"):
            chunks += 1
            try:
                size += self.backend.stat(name).size
            except MissingObjectError:
                continue
        return RepositoryStats(
            points=len(self.point_ids()),
            chunks=chunks,
            chunk_bytes=size,
            indexes=sum(1 for _ in self.backend.list("indexes")),
            digest_maps=sum(1 for _ in self.backend.list("digests")),
        )

    def referenced(self, points: list[RestorePoint]) -> tuple[set[bytes], set[str], set[str]]:
        """Chunk ids, index names and digest map names used by ``points`` (raises on unreadable objects)."""
        chunks: set[bytes] = set()
        indexes: set[str] = set()
        digests: set[str] = set()
        for point in points:
            for stored in point.files:
                chunks.update(_parse_hex_id(c, "chunk") for c in stored.chunks)
            for disk in point.disks:
                indexes.add(f"indexes/{disk.index}")
                index = self.read_index(disk.index)
                chunks.update(index.referenced())
                for dm in (disk.digest_map, index.digest_map.hex() if index.digest_map else None):
                    if dm:
                        digests.add(f"digests/{dm}")
        chunks.discard(HOLE)
        return chunks, indexes, digests


def _key_files(backend: LocalBackend, repository_id: str) -> list[KeyFile]:
    """The key files of the repository ``repository_id`` (those of another repository are skipped)."""
    found = []
    for name in sorted(n for n in backend.list("keys") if n.endswith(".json")):
        keyfile = KeyFile.from_json(backend.get(name), name)
        if keyfile.repository == repository_id:
            found.append(keyfile)
    return found


def list_keys(path: str | os.PathLike[str], passphrase: Passphrase | None = None) -> list[KeyInfo]:
    """The repository's key files, oldest first, without opening it (so also when no passphrase
    works); with ``passphrase``, which ones it opens (one key derivation per file)."""
    backend = LocalBackend(path)
    config = RepositoryConfig.from_json(backend.get(CONFIG_NAME))
    infos = []
    for keyfile in _key_files(backend, config.id):
        opens = None
        if passphrase is not None:
            try:
                keyfile.unwrap(passphrase)
                opens = True
            except WrongKeyError:
                opens = False
        infos.append(KeyInfo(keyfile.id, keyfile.created, opens))
    return sorted(infos, key=lambda k: (k.created, k.id))


def export_key(path: str | os.PathLike[str], key_id: str | None = None) -> bytes:
    """The key file's bytes (still wrapped by its passphrase), for the user to keep safe elsewhere."""
    backend = LocalBackend(path)
    names = sorted(n for n in backend.list("keys") if n.endswith(".json"))
    if key_id is not None:
        names = [n for n in names if n == f"keys/{key_id}.json"]
    if not names:
        raise MissingObjectError(f"keys/{key_id}.json" if key_id else "keys/*.json")
    return backend.get(names[0])


def import_key(path: str | os.PathLike[str], data: bytes, passphrase: Passphrase) -> str:
    """Put an exported key file back after checking it opens with ``passphrase`` and fits this repository."""
    backend = LocalBackend(path)
    config = RepositoryConfig.from_json(backend.get(CONFIG_NAME))
    keyfile = KeyFile.from_json(data, "imported key file")
    if keyfile.repository != config.id:
        raise RepositoryError(f"key {keyfile.id} belongs to repository {keyfile.repository}, not {config.id}")
    keyfile.unwrap(passphrase)
    backend.put(keyfile.name, [keyfile.to_json()])
    return keyfile.id


class ChunkWriter:
    """Builds one disk's index from ``(offset, data)`` writes; memory is the index (32 B per MiB).

    Without ``base`` every slot starts as a hole (a full backup writes every non-zero chunk); with the
    previous point's index, slots start as the previous ids and writes replace the changed ones (an
    incremental). ``write`` may be called from several threads at once.
    """

    def __init__(self, repo: Repository, capacity: int, base: DiskIndex | None = None) -> None:
        if base is not None and (base.capacity != capacity or base.chunk_size != repo.chunk_size):
            raise ValueError(
                f"previous index is for {base.capacity} bytes / {base.chunk_size}-byte chunks, the disk has"
                f" {capacity} bytes: a full read is needed"
            )
        self.repo = repo
        ids = bytearray(base.ids) if base is not None else bytearray()
        self.index = DiskIndex(capacity, repo.chunk_size, ids)
        self._lock = threading.Lock()
        self.bytes_written = 0
        self.bytes_stored = 0
        self.new_chunks = 0
        self.dedup_chunks = 0
        self.holes = 0
        self.finished = False

    def __repr__(self) -> str:
        return f"ChunkWriter({self.index!r}, written={self.bytes_written}, stored={self.bytes_stored})"

    def write(self, offset: int, data: Data) -> ChunkWrite:
        """Store the chunk at ``offset`` (chunk-aligned; exactly the chunk's length, shorter at the end)."""
        slot, rest = divmod(offset, self.index.chunk_size)
        if rest:
            raise ValueError(f"offset {offset} is not aligned to {self.index.chunk_size}")
        expected = self.index.chunk_length(slot)
        if len(data) != expected:
            raise ValueError(f"chunk at offset {offset} must be {expected} bytes, got {len(data)}")
        result = self.repo.write_chunk(data)
        with self._lock:
            if self.finished:
                raise RuntimeError("writer already finished")
            self.index[slot] = result.id
            self.bytes_written += len(data)
            self.bytes_stored += result.stored
            if result.id == HOLE:
                self.holes += 1
            elif result.new:
                self.new_chunks += 1
            else:
                self.dedup_chunks += 1
        return result

    def finish(self, digest_map: DigestMap | None = None) -> str:
        """Flush the chunks, store the digest map (if any) and the index; returns the index id (hex)."""
        with self._lock:
            self.finished = True
        if digest_map is not None:
            if digest_map.capacity != self.index.capacity:
                raise ValueError("digest map capacity differs from the disk's")
            self.index.digest_map = bytes.fromhex(self.repo.write_digest_map(digest_map))
        return self.repo.write_index(self.index)
