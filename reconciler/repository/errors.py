"""Repository errors. Messages name objects, keys and lock holders, never secret values.

::

    RepositoryError
    ├── FormatError          an object or config is malformed or has an unknown version
    │   └── IntegrityError   an object fails authentication / its id (damage or tampering)
    ├── MissingObjectError   a referenced object does not exist
    ├── NotARepositoryError  the path holds no repository (missing, empty: an unmounted volume?)
    ├── WrongKeyError        no key file opens with the passphrase given
    ├── LockedError          another process holds a conflicting lock
    ├── ProtectedPointError  a protected restore point was asked to be deleted
    └── StorageError         the volume refused a write: full, over quota, read-only, no permission

``transient`` says whether another try may succeed without anyone acting: only for
:class:`LockedError` (the other process finishes); the retry logic of ``apply`` reads it.
"""

from __future__ import annotations

from typing import ClassVar


class RepositoryError(Exception):
    """Base of all repository errors."""

    transient: ClassVar[bool] = False


class FormatError(RepositoryError):
    """An object is malformed, truncated or has a version this code does not know."""


class IntegrityError(FormatError):
    """An object fails authentication or does not match its id."""

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        super().__init__(f"{name}: {detail}")


class MissingObjectError(RepositoryError):
    """A referenced object does not exist."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"{name}: object does not exist")


class NotARepositoryError(RepositoryError):
    """The path is not an initialised repository: it does not exist, is an empty directory (typically the
    mount point of a volume that is not mounted) or holds something else. Nothing is ever written there:
    only ``repo init`` creates a repository."""


class WrongKeyError(RepositoryError):
    """The passphrase opens none of the repository's key files."""


class LockedError(RepositoryError):
    """A conflicting lock is held; the message names the holder."""

    transient = True


class ProtectedPointError(RepositoryError):
    """The restore point is protected and was not deleted."""


class StorageError(RepositoryError):
    """The repository's volume refused a write (``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EACCES``, ``EPERM``).

    An expected failure, not a bug: the message is one line naming the repository (its configured name
    and path), the cause, the space needed and free where known, and the fix. ``errno`` is the
    operating system's code; the ``OSError`` is the ``__cause__`` (so retry logic sees it as terminal).
    """

    def __init__(self, message: str, errno: int) -> None:
        self.errno = errno
        super().__init__(message)
