"""Opening a configured repository: the one place a :class:`Repository` is built from a config
``Repository`` (its passphrase revealed from the secret reference only here).

Every verb that reads or writes a repository (backup, points, restore, export, verify, repo, observe,
apply) opens it through :func:`open_repository`; a new backend (S3, SFTP, ...) is chosen here.
"""

from __future__ import annotations

from reconciler.config.model import Repository as RepositoryConfig
from reconciler.repository import Repository


def open_repository(config: RepositoryConfig) -> Repository:
    """Open the configured repository with its passphrase (the encryption key secret)."""
    key = config.encryption.key
    passphrase = key.reveal() if config.encryption.enabled and key is not None else None
    return Repository.open(
        str(config.backend.path),
        passphrase,
        compression_level=config.compression.level if config.compression.algorithm == "zstd" else None,
        expect_encrypted=config.encryption.enabled,
        expect_id=config.id,
        label=config.name,
    )
