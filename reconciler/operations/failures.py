"""Expected failures in words: the one place an exception of the lower layers becomes one line for people
(the object, the cause, the fix) and a short machine word, or is recognised as a bug.

Used by the command line (:mod:`reconciler.commands.common` turns a :class:`Failure` into an exit code and,
with ``--json``, an error object) and by observation (an unreachable host is a notice in the plan, in the
same words). An exception this module does not know is a bug: :func:`explain` returns None and the caller
asks for ``-v``, which shows the traceback.
"""

from __future__ import annotations

import errno
import getpass
import os
import socket
import ssl
from typing import Literal

from reconciler.config.errors import ConfigError
from reconciler.config.secrets import SecretError
from reconciler.esxi.errors import (
    ApiError,
    EsxiError,
    NotPinnedError,
    PinMismatchError,
    ShellAuthError,
    ShellError,
)
from reconciler.repository.errors import (
    FormatError,
    LockedError,
    NotARepositoryError,
    RepositoryError,
    StorageError,
    WrongKeyError,
)
from reconciler.status.store import StatusStoreError

FailureKind = Literal["failed", "config", "usage", "incomplete"]
"""What kind of failure it is, which decides the exit code: ``failed`` (the operation could not be done),
``config`` (the configuration is wrong: fix a file, not the world), ``usage`` (the command line is wrong),
``incomplete`` (there was nothing to look at: ``status`` without status data)."""

_UNREACHABLE = {
    errno.ECONNREFUSED: "connection refused",
    errno.EHOSTUNREACH: "no route to the host",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "connection timed out",
    errno.ECONNRESET: "connection reset",
}


class Failure(Exception):
    """An expected failure, said in one line. ``code`` is a stable word for scripts (``wrong-passphrase``,
    ``not-a-repository``, ``host-unreachable`` ...), ``kind`` decides the exit code."""

    def __init__(self, message: str, code: str = "failed", kind: FailureKind = "failed") -> None:
        self.message = message
        self.code = code
        self.kind: FailureKind = kind
        super().__init__(message)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in a container
        return str(os.getuid())


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _host_prefix(host: str | None, address: str | None) -> str:
    if host and address and address != host:
        return f"host {host} ({address})"
    if host:
        return f"host {host}"
    return address or "the host"


def _os_error(exc: OSError, what: str | None) -> Failure:
    """A local file or directory the operating system refused, named with its path."""
    path = exc.filename or what or "a file"
    cause = exc.strerror or str(exc)
    code = {
        errno.EACCES: "permission-denied",
        errno.EPERM: "permission-denied",
        errno.ENOSPC: "disk-full",
        errno.EDQUOT: "disk-full",
        errno.EROFS: "read-only",
        errno.ENOENT: "not-found",
        errno.ENOTDIR: "not-a-directory",
        errno.EISDIR: "is-a-directory",
        errno.EEXIST: "exists",
    }.get(exc.errno or 0, "os-error")
    fix = {
        "permission-denied": f"give user {_user()} access to it (or run as a user who has)",
        "disk-full": "free space on that volume, then run again",
        "read-only": "remount the volume read-write, then run again",
        "not-found": "check the path (is the volume mounted?)",
        "not-a-directory": "a part of the path is a file: give a directory",
        "is-a-directory": "give a file, not a directory",
        "exists": "remove it or choose another name",
    }.get(code, "check the path and the volume")
    return Failure(f"{path}: {cause}; {fix}", code)


def explain(
    exc: BaseException,
    *,
    host: str | None = None,
    address: str | None = None,
    path_is: str | None = None,
) -> Failure | None:
    """``exc`` as an expected failure in one line, or None when it is not one we expect (a bug).

    ``host``/``address`` name the host an ``OSError`` or host error came from when its message does not;
    ``path_is`` says what a bare ``OSError``'s path is (``state directory``) when it has no file name.
    """
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, ConfigError):
        first = exc.issues[0] if exc.issues else None
        more = ""
        if len(exc.issues) > 1:
            more = f" (and {len(exc.issues) - 1} more; `esxi-reconciler validate` lists them)"
        return Failure(f"the configuration is invalid: {first}{more}", "config-invalid", "config")
    if isinstance(exc, SecretError):
        return Failure(
            f"{exc}; fix the secret reference in the configuration or the secret itself", "secret", "config"
        )
    if isinstance(exc, RepositoryError):
        return _repository_failure(exc)
    if isinstance(exc, PinMismatchError):
        who = f"{_host_prefix(host, address)}: " if host and host not in str(exc) else ""
        return Failure(
            _one_line(
                f"{who}{exc}. If the host's certificate or key was replaced on purpose (reinstall, renewed"
                " certificate), check the presented value on the host's console and pin it in its Host"
                " document (api.thumbprint or ssh.host_key); otherwise someone may be intercepting"
            ),
            "pin-mismatch",
            "failed",
        )
    if isinstance(exc, NotPinnedError):
        return Failure(_one_line(str(exc)), "not-pinned", "config")
    if isinstance(exc, ShellAuthError):
        return Failure(
            _one_line(f"{exc}; check the credentials in the Host document"), "authentication-failed"
        )
    if isinstance(exc, StatusStoreError):
        return Failure(_one_line(str(exc)), "state-directory")
    reach = _unreachable(exc)
    if reach is not None and isinstance(exc, ShellError):
        who = f"host {host}: " if host else ""
        return Failure(
            f"{who}{_one_line(str(exc))}; is SSH enabled on the host (TSM-SSH), is ssh.port in the Host"
            " document right, and does the firewall let this machine through?",
            "host-unreachable",
        )
    if reach is not None:
        return Failure(
            f"{_host_prefix(host, address)}: {reach}; is the host up, are its address and port in the Host"
            " document right, and does the firewall let this machine through?",
            "host-unreachable",
        )
    if isinstance(exc, ShellError | ApiError | EsxiError):
        text = _one_line(str(exc) or type(exc).__name__)
        who = f"{_host_prefix(host, address)}: " if host and host not in text else ""
        return Failure(f"{who}{text}", "host-error")
    if isinstance(exc, OSError):
        if exc.filename is None and path_is is None:
            return None
        return _os_error(exc, path_is)
    return None


def _repository_failure(exc: RepositoryError) -> Failure:
    """A repository's error in one line, with its fix when there is one."""
    if isinstance(exc, WrongKeyError):
        return Failure(_one_line(str(exc)), "wrong-passphrase")
    if isinstance(exc, NotARepositoryError):
        return Failure(_one_line(str(exc)), "not-a-repository")
    if isinstance(exc, StorageError):
        code = {errno.ENOSPC: "disk-full", errno.EDQUOT: "disk-full", errno.EROFS: "read-only"}
        return Failure(_one_line(str(exc)), code.get(exc.errno, "permission-denied"))
    if isinstance(exc, LockedError):
        return Failure(
            _one_line(f"{exc}; wait for it to finish (or stop it), then run again"), "repository-locked"
        )
    if isinstance(exc, FormatError):
        return Failure(
            _one_line(f"{exc}; run `esxi-reconciler verify` to see which restore points are affected"),
            "repository-damaged",
        )
    return Failure(_one_line(str(exc)), "repository")


def _unreachable(exc: BaseException) -> str | None:
    """Why a connection failed when it is a network fault (the exception or one it was raised from)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return None  # a TLS fault is not reachability (pins are checked separately)
        if isinstance(seen, socket.timeout | TimeoutError):
            return "no answer (timed out)"
        if isinstance(seen, socket.gaierror):
            return f"the address does not resolve ({seen.strerror})"
        if isinstance(seen, OSError) and seen.errno in _UNREACHABLE:
            return _UNREACHABLE[seen.errno]
        text = str(seen)
        for number, words in _UNREACHABLE.items():
            if f"[Errno {number}]" in text:
                return words
        seen = seen.__cause__ or seen.__context__
    return None
