"""Opening a configured repository: the one place a :class:`Repository` is built from a config
``Repository`` (its passphrase and object-store credentials revealed from the secret references only here).

Every verb that reads or writes a repository (backup, points, restore, export, verify, repo, copy, observe,
apply) opens it through :func:`open_repository`; the backend (a local directory, S3) is chosen here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reconciler.config.model import LocalBackendConfig, RepositoryConfig, S3BackendConfig
from reconciler.repository import Backend, LocalBackend, Repository

if TYPE_CHECKING:
    from reconciler.repository.s3 import S3Location


def repository_backend(config: RepositoryConfig) -> Backend:
    """The storage of the configured repository (object-store credentials revealed now)."""
    backend = config.backend
    if isinstance(backend, LocalBackendConfig):
        return LocalBackend(str(backend.path), label=config.name)
    # imported here: boto3 costs 0.1 s of every command's start, and most repositories are directories
    from reconciler.repository.s3 import S3Backend

    return S3Backend(s3_location(backend), label=config.name)


def s3_location(backend: S3BackendConfig) -> S3Location:
    """The configured bucket, endpoint and TLS settings, with the credentials read from their secrets."""
    from reconciler.repository.s3 import S3Location

    creds = backend.credentials
    verify: bool | str = True
    if backend.ca_file is not None:
        verify = str(backend.ca_file)
    elif backend.insecure_skip_tls_verify:
        verify = False
    return S3Location(
        bucket=backend.bucket,
        prefix=backend.prefix,
        endpoint=backend.endpoint,
        region=backend.region,
        path_style=backend.path_style,
        verify=verify,
        access_key_id=creds.access_key_id.reveal() if creds else None,
        secret_access_key=creds.secret_access_key.reveal() if creds else None,
        session_token=creds.session_token.reveal() if creds and creds.session_token else None,
    )


def open_repository(config: RepositoryConfig) -> Repository:
    """Open the configured repository with its passphrase (the encryption key secret)."""
    key = config.encryption.key
    passphrase = key.reveal() if config.encryption.enabled and key is not None else None
    return Repository.open(
        repository_backend(config),
        passphrase,
        compression_level=config.compression.level if config.compression.algorithm == "zstd" else None,
        expect_encrypted=config.encryption.enabled,
        expect_id=config.id,
        label=config.name,
    )
