"""The backup repository: fixed 1 MiB content-addressed chunks, zstd, optional AES-256-GCM, restore points.

The on-disk format is specified in ``docs/repository-format.md``. Entry points: :class:`Repository`
(``init``/``open``), :class:`ChunkWriter`, :func:`collect_garbage`. The restore point records it stores
are plain values in :mod:`reconciler.facts.points`; :mod:`.manifest` is their JSON codec.
"""

from reconciler.repository.backend import Backend, LocalBackend
from reconciler.repository.chunks import CHUNK_SIZE, HOLE, BlobCodec, EncodedChunk
from reconciler.repository.crypto import KdfParams
from reconciler.repository.errors import (
    FormatError,
    IntegrityError,
    LockedError,
    MissingObjectError,
    NotARepositoryError,
    ProtectedPointError,
    RepositoryError,
    StorageError,
    WrongKeyError,
)
from reconciler.repository.gc import GarbageSigns, GcReport, collect_garbage, garbage_signs
from reconciler.repository.index import DigestMap, DiskIndex
from reconciler.repository.lock import LockInfo, RepositoryLock, remove_stale_locks, stale_staged_files
from reconciler.repository.reader import ChunkReadError, DiskReader, open_disk
from reconciler.repository.repo import (
    ChunkWrite,
    ChunkWriter,
    KeyInfo,
    PassphraseChange,
    Repository,
    RepositoryStats,
    export_key,
    import_key,
    list_keys,
)
from reconciler.repository.verify import Defect, VerifyReport, verify_repository

__all__ = [
    "CHUNK_SIZE",
    "HOLE",
    "Backend",
    "BlobCodec",
    "ChunkReadError",
    "ChunkWrite",
    "ChunkWriter",
    "Defect",
    "DigestMap",
    "DiskIndex",
    "DiskReader",
    "EncodedChunk",
    "FormatError",
    "GarbageSigns",
    "GcReport",
    "IntegrityError",
    "KdfParams",
    "KeyInfo",
    "LocalBackend",
    "LockInfo",
    "LockedError",
    "MissingObjectError",
    "NotARepositoryError",
    "PassphraseChange",
    "ProtectedPointError",
    "Repository",
    "RepositoryError",
    "RepositoryLock",
    "RepositoryStats",
    "StorageError",
    "VerifyReport",
    "WrongKeyError",
    "collect_garbage",
    "export_key",
    "garbage_signs",
    "import_key",
    "list_keys",
    "open_disk",
    "remove_stale_locks",
    "stale_staged_files",
    "verify_repository",
]
